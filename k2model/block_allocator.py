"""Fixed-size KV block bookkeeping: plain Python, no tensors (the model runner builds those)."""

from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request needs."""


def blocks_needed(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


class BlockAllocator:
    """Hands out block ids from a pool of `num_blocks`; every id is either free or owned once."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._owned: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        got = [self._free.pop() for _ in range(n)]
        self._owned.update(got)
        return got

    def free(self, blocks: list[int]) -> None:
        unknown = [b for b in blocks if b not in self._owned]
        if unknown:
            raise ValueError(f"freeing blocks that are not allocated: {unknown}")
        self._owned.difference_update(blocks)
        self._free.extend(reversed(blocks))
