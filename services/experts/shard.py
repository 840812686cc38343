"""One rank's experts: its contiguous slice of every MoE layer's routed experts, and their math.

Loaded straight from the checkpoint (only this slice's tensors are read). The math is the model's
own grouped `LocalExperts.forward` (one matmul pair per active expert), applied per layer to the
pairs a round routed here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from k2model.checkpoint.loader import default_dtype, load_expert_slice
from k2model.config import K2Config
from k2model.kernels import cpu_ext
from k2model.moe import LocalExperts
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
    ) -> ExpertShard:
        spec = PoolSpec.of(K2Config.from_dir(checkpoint), ranks)
        dtype = dtype or default_dtype(device)
        if device.type == "cpu":
            cpu_ext.available()  # built before the pool serves, not in its first round
        _, experts = load_expert_slice(
            checkpoint, spec.first(rank), spec.per_rank, dtype, fp8_resident
        )
        return cls(rank, spec, {i: _to(ex, device) for i, ex in experts.items()})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.experts.values())).dtype

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


def _to(ex: LocalExperts, device: torch.device) -> LocalExperts:
    """Module.to moves the stacked buffers; resident fp8 parts are a plain list, moved here."""
    if ex.fp8 is not None:
        ex.fp8 = [tuple((w.to(device), sc.to(device)) for w, sc in trio) for trio in ex.fp8]
    return ex.to(device)
