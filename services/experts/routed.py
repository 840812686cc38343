"""What the expert pool accepts: its shape (from the checkpoint config and rank count) and one
validated call's routed rows.

A call is checked here against the pool's own config before it joins a round, so a bad call is
refused alone (InvalidArgument) and never reaches the collectives, where it would fail everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2model.config import K2Config
from services.common.errors import InvalidArgument

# One round's collectives on the pool: a hung or dead peer fails the round (and its callers'
# calls, with UNAVAILABLE) after this.
COLLECTIVE_TIMEOUT_S = 10.0

ROW_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes hidden rows may travel in


@dataclass(frozen=True)
class PoolSpec:
    """Placement: rank r holds experts [r * per_rank, (r + 1) * per_rank) of every MoE layer."""

    hidden_size: int
    top_k: int
    n_experts: int
    moe_layers: tuple[int, ...]
    ranks: int

    @classmethod
    def of(cls, cfg: K2Config, ranks: int) -> PoolSpec:
        if ranks < 1 or cfg.n_routed_experts % ranks:
            raise ValueError(
                f"{cfg.n_routed_experts} routed experts cannot be split evenly over {ranks} ranks"
            )
        layers = tuple(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
        return cls(cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts, layers, ranks)

    @property
    def per_rank(self) -> int:
        return self.n_experts // self.ranks

    def first(self, rank: int) -> int:
        return rank * self.per_rank


@dataclass(frozen=True)
class Routed:
    """One call: rows of one MoE layer, each with its top-k expert ids and weights.

    out[i] = sum_j weights[i, j] * expert[ids[i, j]](x[i]), returned in x's dtype.
    """

    layer: int
    x: torch.Tensor  # [n, D] float32 or bfloat16
    ids: torch.Tensor  # [n, k] int64, global expert ids
    weights: torch.Tensor  # [n, k] float32

    @property
    def rows(self) -> int:
        return self.x.shape[0]


def check(call: Routed, spec: PoolSpec) -> Routed:
    """The call itself when it fits the pool, else InvalidArgument naming the offending field."""
    if call.layer not in spec.moe_layers:
        raise InvalidArgument(
            f"layer: {call.layer} is not an MoE layer (MoE layers: {list(spec.moe_layers)})"
        )
    if call.x.dtype not in ROW_DTYPES:
        raise InvalidArgument(f"hidden: dtype must be bfloat16 or float32, got {call.x.dtype}")
    if call.x.dim() != 2 or call.x.shape[1] != spec.hidden_size:
        raise InvalidArgument(
            f"hidden: expected shape [rows, {spec.hidden_size}], got {list(call.x.shape)}"
        )
    want = [call.rows, spec.top_k]
    for name, t in (("expert_ids", call.ids), ("weights", call.weights)):
        if list(t.shape) != want:
            raise InvalidArgument(f"{name}: expected shape {want}, got {list(t.shape)}")
    if call.ids.numel() and (call.ids.min() < 0 or call.ids.max() >= spec.n_experts):
        bad = call.ids[(call.ids < 0) | (call.ids >= spec.n_experts)][0].item()
        raise InvalidArgument(f"expert_ids: {bad} is outside [0, {spec.n_experts})")
    return call
