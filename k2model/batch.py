"""Per-step batch metadata: which cache slots each new token writes and what each query attends to.

A batch is a list of sequences, each contributing `n_new` consecutive tokens starting at absolute
position `start` (a prompt, a prompt chunk, or one decode token). Tokens are flattened in sequence
order into T rows. Attention works on a padded [B, Q, L] view built here once per step and shared
by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SeqSlice:
    start: int  # absolute position of the first new token (= tokens already in the cache)
    n_new: int
    block_table: list[int]


@dataclass(frozen=True)
class BatchMeta:
    positions: torch.Tensor  # [T] absolute positions of the new tokens
    write_slots: torch.Tensor  # [T] cache slot each new token is written to
    q_index: torch.Tensor  # [B, Q] row in T of each padded query (0 for padding)
    q_valid: torch.Tensor  # [B, Q] bool
    ctx_slots: torch.Tensor  # [B, L] cache slots of each sequence's whole context (0 for padding)
    mask: torch.Tensor  # [B, 1, Q, L] bool, True = may attend (causal, in-context)
    ctx_lens: torch.Tensor  # [B] tokens in each sequence's context, the new ones included
    last_rows: torch.Tensor  # [B] row in T of each sequence's last new token
    decode: bool  # one new token per sequence: rows are already the [B, 1] query view


def build_batch(
    seqs: list[SeqSlice], block_size: int, device: torch.device | str = "cpu"
) -> BatchMeta:
    if not seqs or any(s.n_new <= 0 for s in seqs):
        raise ValueError("every sequence in a batch needs at least one new token")
    starts = torch.tensor([s.start for s in seqs])
    n_new = torch.tensor([s.n_new for s in seqs])
    ctx_len = starts + n_new
    q_len, ctx_max = int(n_new.max()), int(ctx_len.max())
    width = max(len(s.block_table) for s in seqs)
    if any(len(s.block_table) * block_size < s.start + s.n_new for s in seqs):
        raise ValueError("a sequence's block table is too short for its context")
    table = torch.tensor(
        [s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.long
    )

    def slots_of(pos: torch.Tensor) -> torch.Tensor:  # pos [B, n] -> cache slots [B, n]
        blocks = table.gather(1, (pos // block_size).clamp(max=width - 1))
        return blocks * block_size + pos % block_size

    q_off = torch.arange(q_len)
    q_valid = q_off[None] < n_new[:, None]
    q_pos = starts[:, None] + q_off[None]
    first_row = torch.cumsum(n_new, 0) - n_new
    q_index = torch.where(q_valid, first_row[:, None] + q_off[None], 0)
    ctx_pos = torch.arange(ctx_max)[None]
    ctx_valid = ctx_pos < ctx_len[:, None]
    ctx_slots = torch.where(ctx_valid, slots_of(ctx_pos.expand(len(seqs), -1)), 0)
    mask = (ctx_pos[:, None, :] <= q_pos[:, :, None]) & ctx_valid[:, None, :]
    # Padded query rows attend to slot 0 only, so softmax never sees an empty row.
    mask |= ~q_valid[:, :, None] & (ctx_pos[:, None, :] == 0)
    meta = BatchMeta(
        positions=q_pos[q_valid],
        write_slots=slots_of(q_pos)[q_valid],
        q_index=q_index,
        q_valid=q_valid,
        ctx_slots=ctx_slots,
        mask=mask[:, None],
        ctx_lens=ctx_len,
        last_rows=first_row + n_new - 1,
        decode=q_len == 1,
    )
    moved = {k: v.to(device) for k, v in meta.__dict__.items() if isinstance(v, torch.Tensor)}
    return replace(meta, **moved)
