"""DeepSeek-style MoE (docs/model.md, mixture of experts): sigmoid router with selection bias, routed experts, shared expert.

The routed experts are a pluggable `RoutedExperts` backend: `LocalExperts` here (grouped fast path
plus its looped slow twin), a remote expert service elsewhere. Either receives the normed hidden
rows and each row's top-k expert ids and weights, and returns the weighted sum of those experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable
from typing import Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from k2model.checkpoint.fp8 import dequantize_block_fp8
from k2model.checkpoint.int4 import dequantize_int4
from k2model.config import K2Config
from k2model.kernels.dispatch import ExpertWeights
from k2model.layers import MLP, as_dtype, as_f32
from k2model.runtime import Runtime

_STACKS = ("gate", "gate_scale", "up", "up_scale", "down", "down_scale")


class Router(nn.Module):
    """fp32 sigmoid scores; the bias only picks experts, the weights come from the unbiased scores."""

    def __init__(self, cfg: K2Config, rt: Runtime) -> None:
        super().__init__()
        self.ops = rt.ops
        self.top_k, self.n_group, self.topk_group = (
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
        )
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        # The router runs in fp32 (docs/model.md, mixture of experts): its weight is held in fp32, or as the
        # checkpoint's bf16 where the ops backend computes with it (the same fp32 product).
        self.weight = nn.Buffer(
            rt.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32)
        )
        self.bias = nn.Buffer(rt.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, k] int64, weights [T, k] fp32)."""
        scores = self.ops.linear(as_f32(x), self.weight).sigmoid()  # [T, E]
        choice = scores + self.bias
        if self.n_group > 1:
            t, e = choice.shape
            grouped = choice.view(t, self.n_group, e // self.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(e // self.n_group, 1), -1e30)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class RoutedExperts(Protocol):
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids [T, k], weights [T, k] -> sum_k weights * expert_ids(x), [T, D] in x.dtype."""
        ...


class PendingExperts(Protocol):
    def result(self) -> torch.Tensor: ...


@runtime_checkable
class SubmitsExperts(Protocol):
    """Remote experts that can start a layer's rows and return before they are done."""

    def submit(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> PendingExperts: ...


T = TypeVar("T")
ExpertSteps = Generator[PendingExperts, torch.Tensor, torch.Tensor]


def drive(steps: Generator[PendingExperts, torch.Tensor, T]) -> T:
    """Runs a generator of expert hops to its end, collecting each hop as soon as it is sent."""
    value = None
    while True:
        try:
            pending = steps.send(value)  # type: ignore[arg-type]
        except StopIteration as done:
            return done.value
        value = pending.result()


def settle(pendings: Iterable[PendingExperts | None]) -> None:
    """Collects hops whose step is being abandoned (an error elsewhere), so none stays in
    flight; their own errors are dropped (the step fails for the first one)."""
    for pending in pendings:
        if pending is not None:
            with contextlib.suppress(Exception):
                pending.result()


class LocalExperts(nn.Module):
    """The routed experts of one layer, stacked: gate_up [E, 2I, D] and down [E, D, I].

    With fp8 resident, `fp8` holds per-expert (gate, up, down) fp8 weights and scales instead, and
    only the experts a call selects are dequantised.
    """

    def __init__(
        self, n_experts: int, dim: int, inter: int, rt: Runtime, allocate: bool = True
    ) -> None:
        super().__init__()
        self.n_experts, self.dim, self.inter, self.dtype = n_experts, dim, inter, rt.dtype
        self.rt, self.ops, self.device = rt, rt.ops, rt.device
        held = n_experts if allocate else 0  # 0: hosted elsewhere (the expert service)
        self.gate_up = nn.Buffer(rt.empty(held, 2 * inter, dim))
        self.down = nn.Buffer(rt.empty(held, dim, inter))
        self.fp8 = False  # fp8 resident: the stacks are buffers fp8_gate, fp8_gate_scale, ...
        self.int4 = False  # INT4: packed stacks int4_gate, int4_gate_scale, ... (checkpoint/int4)

    def hold(self, dtype: torch.dtype) -> None:
        """Re-allocate the stacks in `dtype` (bf16 under an fp32 compute: kernels/ops.py)."""
        if dtype != self.gate_up.dtype:
            self.gate_up = nn.Buffer(
                torch.empty(self.gate_up.shape, dtype=dtype, device=self.device)
            )
            self.down = nn.Buffer(torch.empty(self.down.shape, dtype=dtype, device=self.device))

    def set_fp8(self, experts: list[tuple[tuple[torch.Tensor, torch.Tensor], ...]]) -> None:
        """experts[e] = ((gate_w, gate_s), (up_w, up_s), (down_w, down_s)), stacked over E once
        into buffers fp8_gate, fp8_gate_scale, ... on the runtime's device."""
        rows = [tuple(t for part in trio for t in part) for trio in experts]
        for name, column in zip(_STACKS, zip(*rows, strict=True), strict=True):
            self.register_buffer(f"fp8_{name}", torch.stack(column).to(self.device))
        self.fp8 = True
        self._empty_dense()

    def set_int4(self, experts: list[tuple[tuple[torch.Tensor, torch.Tensor], ...]]) -> None:
        """experts[e] = ((gate_packed, gate_scale), (up_..), (down_..)): int32 words of eight
        4-bit values and bf16 group scales, never widened, stacked like the dense weights:
        int4_gate_up [E, 2I, D/8] (gate rows then up rows), int4_down [E, D, I/8], each with
        its `_scale`."""
        fused = [
            ((torch.cat((g, u)), torch.cat((gs, us))), (d, ds))
            for (g, gs), (u, us), (d, ds) in experts
        ]
        for name, k in (("gate_up", 0), ("down", 1)):
            packed = torch.stack([pair[k][0] for pair in fused]).to(self.device)
            scale = torch.stack([pair[k][1] for pair in fused]).to(self.device)
            self.register_buffer(f"int4_{name}", packed.contiguous())
            self.register_buffer(f"int4_{name}_scale", scale.contiguous())
        self.int4 = True
        self._empty_dense()

    def _empty_dense(self) -> None:
        self.gate_up = nn.Buffer(self.gate_up.new_empty(0, 2 * self.inter, self.dim))
        self.down = nn.Buffer(self.down.new_empty(0, self.dim, self.inter))

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's gate_up [2I, D] and down [D, I]: views (in the held dtype), or dequantised
        now when fp8 or INT4."""
        if self.int4:
            gate_up = dequantize_int4(self.int4_gate_up[e], self.int4_gate_up_scale[e], self.dtype)
            return gate_up, dequantize_int4(self.int4_down[e], self.int4_down_scale[e], self.dtype)
        if not self.fp8:
            return self.gate_up[e], self.down[e]
        w = self.stacked()
        gate = dequantize_block_fp8(w.gate[e], w.gate_scale[e], self.dtype)
        up = dequantize_block_fp8(w.up[e], w.up_scale[e], self.dtype)
        return torch.cat((gate, up)), dequantize_block_fp8(w.down[e], w.down_scale[e], self.dtype)

    def stacked(self) -> ExpertWeights:
        """Every expert stacked over E, for the grouped kernels: views of gate_up / down (or of
        the INT4 words and scales), or the fp8 stacks."""
        i = self.inter
        if self.int4:
            gu, gu_s = self.int4_gate_up, self.int4_gate_up_scale
            return ExpertWeights(
                gu[:, :i], gu[:, i:], self.int4_down, gu_s[:, :i], gu_s[:, i:], self.int4_down_scale
            )
        if not self.fp8:
            return ExpertWeights(self.gate_up[:, :i], self.gate_up[:, i:], self.down)
        return ExpertWeights(**{name: getattr(self, f"fp8_{name}") for name in _STACKS})

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.ops.routed_experts(self, x, ids, weights)

    def grouped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sort assignments by expert; one matmul pair per active expert over its contiguous rows
        (the twin of csrc/routed_experts.cpp, and the path for every other input)."""
        k = ids.shape[1]
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        rows = order // k  # token of each sorted assignment
        xs = x[rows]
        active, counts = flat[order].unique_consecutive(return_counts=True)
        out = torch.empty_like(xs)
        start = 0
        for e, n in zip(active.tolist(), counts.tolist(), strict=True):
            gate_up, down = self.expert(e)
            gate, up = self.ops.linear(xs[start : start + n], gate_up).split(self.inter, -1)
            out[start : start + n] = self.ops.linear(F.silu(gate) * up, down)
            start += n
        out = out * as_dtype(weights.flatten()[order, None], out.dtype)
        return torch.zeros_like(x).index_add_(0, rows, out)

    def looped(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Slow twin: every (token, expert) pair on its own."""
        out = torch.zeros_like(x)
        for i in range(x.shape[0]):
            for e, w in zip(ids[i].tolist(), weights[i].tolist(), strict=True):
                gate_up, down = (t.to(x.dtype) for t in self.expert(e))
                gate, up = (gate_up @ x[i]).split(self.inter)
                out[i] += w * (down @ (F.silu(gate) * up))
        return out


class MoE(nn.Module):
    def __init__(self, cfg: K2Config, rt: Runtime, routed_experts: bool = True) -> None:
        super().__init__()
        self.router = Router(cfg, rt)
        self.experts = LocalExperts(
            cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, rt, routed_experts
        )
        shared = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared = MLP(cfg.hidden_size, shared, rt) if shared else None
        self.remote: RoutedExperts | None = None  # set when the expert service hosts this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drive(self.steps(x))

    def steps(self, x: torch.Tensor) -> ExpertSteps:
        """The layer as a generator: with remote experts that can be submitted it yields once,
        at the hop, after sending the rows and computing the shared expert, and is resumed with
        the routed sum (`drive` resumes at once; K2Model.forward_interleaved runs another
        micro-batch first). Otherwise it computes without yielding."""
        ids, weights = self.router(x)
        held = self.experts.gate_up.shape[0] or self.experts.fp8 or self.experts.int4
        if self.remote is None and not held:
            raise RuntimeError("this model was loaded without routed experts and has no remote")
        if isinstance(self.remote, SubmitsExperts):  # rows out while the shared expert runs
            pending = self.remote.submit(x, ids, weights)
            try:
                shared = self.shared(x) if self.shared is not None else None
            except BaseException:
                settle([pending])
                raise
            out = yield pending
            return out + shared if shared is not None else out
        out = (self.remote or self.experts)(x, ids, weights)
        return out + self.shared(x) if self.shared is not None else out
