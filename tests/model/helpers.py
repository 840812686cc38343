"""Small drivers for the model in tests: prefill ragged prompts and decode through the paged cache."""

from __future__ import annotations

import torch

from k2model.batch import SeqSlice, build_batch
from k2model.block_allocator import BlockAllocator, blocks_needed
from k2model.kv_cache import PagedKVCache
from k2model.mla import AttentionForm
from k2model.model import K2Model

BLOCK = 4


class Runner:
    """Owns a cache and one block table per sequence; grows tables as sequences grow."""

    def __init__(self, model: K2Model, num_blocks: int = 256, block_size: int = BLOCK) -> None:
        self.model, self.block_size = model, block_size
        self.cache: PagedKVCache = model.new_cache(num_blocks, block_size)
        self.alloc = BlockAllocator(num_blocks)
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []

    def _grow(self, seq: int, new_len: int) -> None:
        extra = blocks_needed(new_len, self.block_size) - len(self.tables[seq])
        if extra > 0:
            self.tables[seq] += self.alloc.allocate(extra)

    def step(
        self, chunks: dict[int, list[int]], form: AttentionForm, all_logits: bool = False
    ) -> torch.Tensor:
        """Feed chunks[seq] new tokens to each listed sequence (new sequence ids are appended)."""
        slices, ids = [], []
        for seq, toks in chunks.items():
            if seq == len(self.tables):
                self.tables.append([])
                self.lengths.append(0)
            self._grow(seq, self.lengths[seq] + len(toks))
            slices.append(SeqSlice(self.lengths[seq], len(toks), list(self.tables[seq])))
            self.lengths[seq] += len(toks)
            ids += toks
        meta = build_batch(slices, self.block_size)
        return self.model(torch.tensor(ids), meta, self.cache, form, all_logits)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
