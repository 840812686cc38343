"""One round's dispatch and combine, as plain tensor math (no process group here).

Dispatch: the leader concatenates every call of the round into N round rows and, for each rank,
keeps the rows routed to at least one of that rank's experts (each row travels to a rank once,
however many of its k experts live there) plus one (local row, layer, local expert, weight) pair
per routed assignment. A rank's `Part` travels as one byte buffer (`pack` / `unpack`).
Combine: each rank returns one partial sum per row it received; the leader adds them up per round
row and cuts the result back into calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.experts.routed import PoolSpec, Routed

HEADER_FIELDS = 2  # per rank: rows, pairs


@dataclass(frozen=True)
class Part:
    """What one rank computes in a round."""

    x: torch.Tensor  # [n, D] in the pool's compute dtype
    pairs: torch.Tensor  # [p, 3] int32: local row, layer, local expert
    weights: torch.Tensor  # [p] float32
    rows: torch.Tensor  # [n] int64, round row of each local row (leader side only; empty remotely)

    @property
    def header(self) -> tuple[int, int]:
        return self.x.shape[0], self.pairs.shape[0]

    def to(self, device: torch.device) -> Part:
        return Part(*(t.to(device) for t in (self.x, self.pairs, self.weights, self.rows)))


def packed_bytes(rows: int, pairs: int, d: int, dtype: torch.dtype) -> int:
    """Size of a packed part: 3 int32 and 1 float32 per pair, then the rows."""
    return pairs * 16 + rows * d * dtype.itemsize


def split(calls: list[Routed], spec: PoolSpec, dtype: torch.dtype) -> list[Part]:
    """One Part per rank (possibly empty) for the round made of `calls`."""
    x = torch.cat([c.x for c in calls]).to(dtype)  # [N, D]
    ids = torch.cat([c.ids for c in calls])  # [N, k]
    weights = torch.cat([c.weights for c in calls]).float()  # [N, k]
    layer = torch.cat([torch.full((c.rows,), c.layer, dtype=torch.int64) for c in calls])  # [N]
    owner = ids // spec.per_rank  # [N, k]
    parts = []
    for r in range(spec.ranks):
        mine = owner == r  # [N, k]
        sent = mine.any(1)
        rows = sent.nonzero().squeeze(1)  # [n_r]
        local = sent.cumsum(0) - 1  # round row -> local row (valid where sent)
        row, col = mine.nonzero().unbind(1)  # [p_r] each
        pairs = torch.stack((local[row], layer[row], ids[row, col] - spec.first(r)), 1)
        parts.append(Part(x[rows], pairs.to(torch.int32), weights[row, col], rows))
    return parts


def combine(
    calls: list[Routed], parts: list[Part], partials: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Sum the ranks' partial rows per round row; one output per call, in that call's dtype."""
    d = calls[0].x.shape[1]
    like = partials[0]
    total = torch.zeros(sum(c.rows for c in calls), d, dtype=like.dtype, device=like.device)
    for part, partial in zip(parts, partials, strict=True):
        total.index_add_(0, part.rows, partial)
    outs = total.split([c.rows for c in calls])
    return [out.to(c.x.dtype) for out, c in zip(outs, calls, strict=True)]


def pack(part: Part) -> torch.Tensor:
    """pairs, weights, then rows, as one uint8 buffer (4-byte fields first keep every view aligned)."""
    return torch.cat(
        [t.contiguous().reshape(-1).view(torch.uint8) for t in (part.pairs, part.weights, part.x)]
    )


def unpack(buf: torch.Tensor, rows: int, pairs: int, d: int, dtype: torch.dtype) -> Part:
    """The inverse of `pack`, given the part's header and the row width and dtype."""
    sizes = [pairs * 3 * 4, pairs * 4, rows * d * dtype.itemsize]
    p, w, x = buf.split(sizes)
    return Part(
        x.view(dtype).reshape(rows, d),
        p.view(torch.int32).reshape(pairs, 3),
        w.view(torch.float32),
        torch.empty(0, dtype=torch.int64),
    )
