"""The decode engine: admission, KV handoff from prefill, and the continuous batch.

Runs on the asyncio loop; model steps run on one worker thread. Blocks of a sequence that is in
the step being computed are freed only when that step ends (the model thread is writing them);
every other cancellation frees them at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from k2model.constraint_spec import ConstraintSpec
from k2model.constraints import ConstraintCompiler, ConstraintState
from k2model.model import K2Model
from k2model.runner import MICRO_BATCH_MIN, ModelRunner, StepInput
from k2model.sampled import Sampled
from k2model.sampling_params import SamplingParams
from services.common.errors import (
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.decode.scheduler import Scheduler, Seq, State
from services.validation import check_prompt, check_sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeLimits:
    num_blocks: int = 1024
    block_size: int = 16
    max_running: int = 64
    max_queue: int = 256
    watermark_blocks: int = 1


@dataclass(frozen=True)
class TokenBatch:
    tokens: list[Sampled]
    finish_reason: str | None


# Fills a sequence's reserved blocks with its prompt's KV (via `write`) and returns the first
# token; raises ServiceError when the KV could not be completed.
Prefiller = Callable[[Seq, Callable[[int, int, torch.Tensor], None]], Awaitable[Sampled]]


class DecodeEngine:
    def __init__(
        self,
        model: K2Model,
        limits: DecodeLimits,
        prefiller: Prefiller,
        constraints: ConstraintCompiler | None = None,
        kv_dtype: torch.dtype | None = None,
        step_nice: int = 0,
        micro_batch_min: int = MICRO_BATCH_MIN,
    ) -> None:
        """kv_dtype: the cache's dtype (what prefill streams); None: the model's. step_nice: the
        nice increment of the thread that runs model steps and of the OpenMP threads it starts
        (they inherit it); the event loop that takes in KV and streams tokens keeps its own.
        micro_batch_min: see ModelRunner (0: steps never split)."""
        self.model, self.limits, self.prefiller = model, limits, prefiller
        self.constraints = constraints  # None: requests with a constraint are refused
        self.sched = Scheduler(
            limits.num_blocks, limits.block_size, limits.max_running, limits.watermark_blocks
        )
        self.runner = ModelRunner(
            model, limits.num_blocks, limits.block_size, kv_dtype, micro_batch_min
        )
        self.served = 0
        self._queues: dict[Seq, asyncio.Queue[TokenBatch | Exception]] = {}
        self._transfers: dict[Seq, asyncio.Task] = {}
        self._in_step: set[Seq] = set()
        self._aborted: set[Seq] = set()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="decode-model", initializer=os.nice, initargs=(step_nice,)
        )

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        constraint: ConstraintSpec | None = None,
        min_new_tokens: int = 0,
    ) -> Seq:
        """max_new_tokens 0: as many as the context and this instance's KV pool leave;
        min_new_tokens: the stop ids are not sampled before this many tokens (prefill's first
        token included)."""
        if max_new_tokens == 0:
            max_new_tokens = self._room(prompt)
        check_prompt(prompt, self.model.cfg, max_new_tokens)
        check_sampling(params, self.model.cfg)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if min_new_tokens < 0:
            raise ValueError("min_new_tokens must be >= 0")
        guide = self._guide(constraint, stop_ids)
        params, seed = params.seeded()
        seq = Seq(
            request_id,
            list(prompt),
            params,
            seed,
            max_new_tokens,
            stop_ids,
            constraint=constraint,
            guide=guide,
        )
        if min_new_tokens and stop_ids:
            seq.min_new_tokens, seq.unstoppable = min_new_tokens, self._unstoppable(stop_ids)
            first = constraint or ConstraintSpec()
            seq.constraint = replace(first, banned_ids=(*first.banned_ids, *stop_ids))
        if not self.sched.fits_ever(seq):
            # Retrying cannot help (unlike a full queue), so this is not RESOURCE_EXHAUSTED.
            most = self.sched.alloc.num_blocks * self.limits.block_size
            raise OutOfRange(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceed the "
                f"{most} tokens this decode instance can hold; lower max_new_tokens"
            )
        if len(self.sched.waiting) >= self.limits.max_queue:
            raise ResourceExhausted("decode queue is full")
        self._queues[seq] = asyncio.Queue()
        self.sched.enqueue(seq)
        self._wake.set()
        return seq

    def _unstoppable(self, stop_ids: frozenset[int]) -> torch.Tensor:
        mask = torch.ones(self.model.cfg.vocab_size, dtype=torch.bool)
        mask[[i for i in stop_ids if i < mask.numel()]] = False
        return mask

    def _room(self, prompt: list[int]) -> int:
        most = min(
            self.model.cfg.max_position_embeddings, self.limits.num_blocks * self.limits.block_size
        )
        if len(prompt) >= most:
            raise OutOfRange(
                f"the prompt ({len(prompt)} tokens) leaves no room to generate: this decode "
                f"instance holds {most} tokens per sequence"
            )
        return most - len(prompt)

    def _guide(
        self, constraint: ConstraintSpec | None, stop_ids: frozenset[int]
    ) -> ConstraintState | None:
        if constraint is None:
            return None
        if self.constraints is None:
            raise InvalidArgument("constraint: this decode instance has no vocabulary for it")
        try:
            guide = self.constraints.start(constraint)
        except ValueError as e:
            raise InvalidArgument(f"constraint: {e}") from None
        if guide.end_id is not None and guide.end_id not in stop_ids:
            raise InvalidArgument("constraint: the grammar's end id must be a stop id")
        return guide

    async def events(self, seq: Seq) -> AsyncIterator[TokenBatch]:
        """The sequence's tokens as they come; aborts it if the consumer goes away."""
        queue = self._queues[seq]
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self.abort(seq)

    def abort(self, seq: Seq) -> None:
        """Stop the sequence and free its blocks (after the running step, if it is in it)."""
        self._queues.pop(seq, None)
        task = self._transfers.pop(seq, None)
        if task is not None:
            task.cancel()
        if seq in self._in_step:
            self._aborted.add(seq)
        elif seq.state is not State.DONE:
            self.sched.finish(seq)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return self.sched.counts() | {"requests_served": self.served}

    def _emit(self, seq: Seq, item: TokenBatch | Exception) -> None:
        queue = self._queues.get(seq)
        if queue is not None:
            queue.put_nowait(item)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for seq in self.sched.admit():
                self._transfers[seq] = asyncio.create_task(self._prefill(seq))
            plan = self.sched.plan_step()
            if not plan:
                self._wake.clear()
                await self._wake.wait()
                continue
            inputs = [StepInput(*seq.step_tokens(), seq.blocks, seq.row()) for seq in plan]
            self._in_step = set(plan)
            try:
                sampled = await loop.run_in_executor(
                    self._executor, functools.partial(self.runner.step, inputs, "absorbed")
                )
            except Exception as e:
                log.exception("decode step failed")
                # A service error (e.g. the expert pool is down: UNAVAILABLE) reaches the
                # step's callers as itself; anything else is an opaque INTERNAL.
                failure = e if isinstance(e, ServiceError) else RuntimeError("decode step failed")
                sampled = [failure] * len(plan)
            finally:
                self._in_step = set()
            for seq, result in zip(plan, sampled, strict=True):
                self._after_step(seq, result)
            self._aborted.clear()

    def _after_step(self, seq: Seq, result: Sampled | Exception) -> None:
        if seq in self._aborted or seq.state is State.DONE:
            self.sched.finish(seq)
            return
        if isinstance(result, Exception):
            self.sched.finish(seq)
            self._emit(seq, result)
            return
        reason = self.sched.stepped(seq, result.token_id)
        self.served += reason is not None
        self._emit(seq, TokenBatch([result], reason))

    async def _prefill(self, seq: Seq) -> None:
        try:
            first = await self.prefiller(seq, self._writer(seq))
        except asyncio.CancelledError:
            raise
        except ServiceError as e:
            self._fail(seq, e)
            return
        except Exception:
            log.exception("prefill handoff failed for %s", seq.request_id)
            self._fail(seq, Unavailable("prefill failed"))
            return
        finally:
            self._transfers.pop(seq, None)
        if seq.state is not State.PREFILLING:
            return
        if seq.guide is not None and not seq.guide.accepts(first.token_id):
            self._fail(seq, Unavailable("prefill ignored the request's constraint"))
            return
        self.sched.prefilled(seq, first.token_id)
        reason = seq.finish_reason
        self.served += reason is not None
        self._emit(seq, TokenBatch([first], reason))
        self._wake.set()

    def _fail(self, seq: Seq, error: ServiceError) -> None:
        self.sched.finish(seq)
        self._emit(seq, error)
        self._wake.set()

    def _writer(self, seq: Seq) -> Callable[[int, int, torch.Tensor], None]:
        """Writes latents for tokens [start, start + n) of one layer into the seq's blocks."""
        bs, cache = self.limits.block_size, self.runner.cache

        def write(layer: int, start: int, latent: torch.Tensor) -> None:
            pos = torch.arange(start, start + latent.shape[0])
            slots = torch.tensor(seq.blocks)[pos // bs] * bs + pos % bs
            # straight into the pool's blocks on its device (one host-to-device copy per chunk)
            cache.write(layer, slots.to(cache.data.device), latent.to(cache.data.device))

        return write
