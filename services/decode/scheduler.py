"""Decode-side sequence bookkeeping: admission, KV blocks, continuous batching, preemption.

Plain Python, no tensors. A sequence moves WAITING -> PREFILLING (its prompt blocks reserved,
prefill filling them) -> RUNNING (one token per step) -> done. Under KV pressure the most
recently admitted running sequences are PREEMPTED: their blocks are freed, and they later resume
by recomputing prompt + generated tokens in one step (before any new admission).
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from k2model.block_allocator import BlockAllocator, blocks_needed
from k2model.sampling_params import SamplingParams, SamplingRow

if TYPE_CHECKING:
    from torch import Tensor

    from k2model.constraint_spec import ConstraintSpec
    from k2model.constraints import ConstraintState


class State(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    PREEMPTED = "preempted"
    DONE = "done"


@dataclass(eq=False)
class Seq:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    out: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    state: State = State.WAITING
    finish_reason: str | None = None
    constraint: ConstraintSpec | None = None  # forwarded to prefill for the first token
    guide: ConstraintState | None = None  # follows `out`; masks the next token
    min_new_tokens: int = 0  # the stop ids are masked until `out` holds this many
    unstoppable: Tensor | None = None  # bool [vocab]: False at the stop ids

    @property
    def cached_after_step(self) -> int:
        """Tokens in the cache once the next step has run (everything but the last output)."""
        return len(self.prompt) + len(self.out)

    def row(self) -> SamplingRow:
        allowed = self.guide.allowed() if self.guide is not None else None
        if len(self.out) < self.min_new_tokens and self.unstoppable is not None:
            if allowed is None:
                allowed = self.unstoppable
            elif bool((both := allowed & self.unstoppable).any()):
                allowed = both  # a grammar that can only end now ends: it outranks min_tokens
        return SamplingRow(self.params, self.seed, len(self.out), self.prompt, self.out, allowed)

    def step_tokens(self) -> tuple[list[int], int]:
        """(new tokens, start position) for the next step; a resumed sequence recomputes all."""
        if self.state is State.PREEMPTED:
            return self.prompt + self.out, 0
        return [self.out[-1]], len(self.prompt) + len(self.out) - 1

    def add_token(self, token: int) -> str | None:
        if self.guide is not None:
            self.guide.advance(token)
        self.out.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.out) >= self.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason


class Scheduler:
    def __init__(
        self, num_blocks: int, block_size: int, max_running: int, watermark_blocks: int = 1
    ):
        self.alloc = BlockAllocator(num_blocks)
        self.block_size, self.max_running, self.watermark = (
            block_size,
            max_running,
            watermark_blocks,
        )
        self.waiting: deque[Seq] = deque()
        self.preempted: deque[Seq] = deque()
        self.prefilling: list[Seq] = []
        self.running: list[Seq] = []  # in admission order
        self.preemptions = 0

    def blocks_for(self, n_tokens: int) -> int:
        return blocks_needed(n_tokens, self.block_size)

    def fits_ever(self, seq: Seq) -> bool:
        return self.blocks_for(len(seq.prompt) + seq.max_new_tokens) <= self.alloc.num_blocks

    def enqueue(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Seq]:
        """Reserve prompt blocks for waiting sequences, FIFO, while the pool allows.

        Resuming preempted sequences comes first: nothing is admitted while any wait.
        """
        admitted = []
        while self.waiting and not self.preempted and self._active() < self.max_running:
            seq = self.waiting[0]
            need = self.blocks_for(len(seq.prompt))
            if self.alloc.num_free < need + self.watermark and self._active() > 0:
                break
            if not self.alloc.can_allocate(need):
                break
            self.waiting.popleft()
            seq.blocks = self.alloc.allocate(need)
            seq.state = State.PREFILLING
            self.prefilling.append(seq)
            admitted.append(seq)
        return admitted

    def prefilled(self, seq: Seq, first_token: int) -> None:
        self.prefilling.remove(seq)
        seq.state = State.RUNNING
        if seq.add_token(first_token) is not None:
            self.finish(seq)
        else:
            self.running.append(seq)

    def plan_step(self) -> list[Seq]:
        """The sequences of the next step, each holding blocks for its new tokens."""
        self._resume()
        planned: list[Seq] = []
        for seq in list(self.running):
            if seq.state is not State.RUNNING:
                continue  # preempted below while planning an earlier one
            if self._grow(seq, planned):
                planned.append(seq)
        return planned + [s for s in self.running if s.state is State.PREEMPTED and s.blocks]

    def _grow(self, seq: Seq, planned: list[Seq]) -> bool:
        """Reserve seq's blocks for its next step, preempting unplanned sequences if needed: a
        planned one must keep its blocks. False (seq sits this step out) if that is not enough."""
        extra = self.blocks_for(seq.cached_after_step) - len(seq.blocks)
        while extra > self.alloc.num_free:
            victim = self._youngest_running(other_than=[seq, *planned])
            if victim is None:
                return False
            self._preempt(victim)
        if extra > 0:
            seq.blocks += self.alloc.allocate(extra)
        return True

    def _youngest_running(self, other_than: list[Seq]) -> Seq | None:
        for s in reversed(self.running):
            if s.state is State.RUNNING and s not in other_than:
                return s
        return None

    def _preempt(self, seq: Seq) -> None:
        self.alloc.free(seq.blocks)
        seq.blocks = []
        seq.state = State.PREEMPTED
        self.running.remove(seq)
        self.preempted.appendleft(seq)
        self.preemptions += 1

    def _resume(self) -> None:
        """Give preempted sequences their blocks back (oldest first) when the pool allows."""
        while self.preempted:
            seq = self.preempted[-1]
            need = self.blocks_for(seq.cached_after_step)
            if need + self.watermark > self.alloc.num_free and self.running:
                return
            if not self.alloc.can_allocate(need):
                return
            self.preempted.pop()
            seq.blocks = self.alloc.allocate(need)
            self.running.append(seq)  # stays PREEMPTED until this step recomputes it

    def stepped(self, seq: Seq, token: int) -> str | None:
        seq.state = State.RUNNING
        reason = seq.add_token(token)
        if reason is not None:
            self.finish(seq)
        return reason

    def finish(self, seq: Seq) -> None:
        """Remove the sequence wherever it is and free its blocks (idempotent)."""
        for pool in (self.running, self.prefilling):
            if seq in pool:
                pool.remove(seq)
        for queue in (self.waiting, self.preempted):
            if seq in queue:
                queue.remove(seq)
        if seq.blocks:
            self.alloc.free(seq.blocks)
            seq.blocks = []
        seq.state = State.DONE

    def _active(self) -> int:
        return len(self.running) + len(self.prefilling)

    def counts(self) -> dict[str, int]:
        return {
            "queued": len(self.waiting) + len(self.preempted) + len(self.prefilling),
            "running": len(self.running),
            "kv_blocks_total": self.alloc.num_blocks,
            "kv_blocks_free": self.alloc.num_free,
            "block_size": self.block_size,
            "preemptions": self.preemptions,
        }
