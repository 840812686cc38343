"""One rank's experts: its contiguous slice of every MoE layer's routed experts, and their math.

Loaded straight from the checkpoint (only this slice's tensors are read). The math is the model's
own grouped `LocalExperts.forward` (one matmul pair per active expert), applied per layer to the
pairs a round routed here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from k2model.checkpoint.loader import load_expert_slice
from k2model.config import K2Config
from k2model.moe import LocalExperts
from services.experts import wire
from services.experts.plan import Part
from services.experts.routed import PoolSpec


class ExpertShard:
    def __init__(self, rank: int, spec: PoolSpec, experts: dict[int, LocalExperts]) -> None:
        self.rank, self.spec, self.experts = rank, spec, experts

    @classmethod
    def load(
        cls,
        checkpoint: Path,
        rank: int,
        ranks: int,
        dtype: torch.dtype | None,
        fp8_resident: bool,
        device: torch.device,
        ops: str = "auto",
    ) -> ExpertShard:
        spec = PoolSpec.of(K2Config.from_dir(checkpoint), ranks)
        _, experts = load_expert_slice(
            checkpoint, spec.first(rank), spec.per_rank, dtype, fp8_resident, device=device, ops=ops
        )
        return cls(rank, spec, experts)

    @property
    def describe(self) -> str:
        return next(iter(self.experts.values())).rt.describe()

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.experts.values())).dtype

    @torch.inference_mode()
    def partial(self, request: wire.Request, out: torch.Tensor | None = None) -> torch.Tensor:
        """Partial sums [rows, D] of one data-plane request (its pairs name local experts),
        in the request's dtype; written into `out` (CPU, that shape and dtype) when given."""
        layer, x = request.header.layer, request.x
        device = next(iter(self.experts.values())).device
        rows, local = request.pairs.to(device, torch.long).unbind(1)
        direct = out is not None and out.device == device and out.dtype == self.dtype
        acc = out.zero_() if direct else torch.zeros(x.shape, dtype=self.dtype, device=device)
        if rows.numel():
            xs = x.to(device, self.dtype)[rows]
            weights = request.weights.to(device)[:, None]
            acc.index_add_(0, rows, self.experts[layer](xs, local[:, None], weights))
        if direct:
            return acc
        if out is None:
            return acc.to(x.dtype).cpu()
        return out.copy_(acc)

    @torch.inference_mode()
    def compute(self, part: Part) -> torch.Tensor:
        """Partial sums [n, D] over this rank's experts for every row of the part."""
        out = torch.zeros_like(part.x)
        rows, layers, local = part.pairs.long().unbind(1)
        for layer in layers.unique().tolist():
            sel = (layers == layer).nonzero().squeeze(1)
            r = rows[sel]
            y = self.experts[layer](part.x[r], local[sel, None], part.weights[sel, None])
            out.index_add_(0, r, y)
        return out
