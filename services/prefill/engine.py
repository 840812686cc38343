"""The prefill engine: batches waiting prompts, chunks long ones, streams each layer's latent KV.

Plain asyncio + one worker thread for the model. Each job gets, in order: every layer's latents
for each chunk of its prompt (as soon as that layer is computed), then its first sampled token.
A cancelled job stops taking part in new steps and its blocks are freed once no step uses them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from k2model.block_allocator import BlockAllocator, blocks_needed
from k2model.constraint_spec import ConstraintSpec
from k2model.constraints import ConstraintCompiler
from k2model.model import K2Model
from k2model.runner import ModelRunner, StepInput
from k2model.sampled import Sampled
from k2model.sampling_params import SamplingParams, SamplingRow
from services.common.errors import InvalidArgument, ResourceExhausted, ServiceError
from services.validation import check_prompt, check_sampling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvPart:
    """One layer's latent KV for tokens [token_start, token_start + n) of the prompt."""

    layer: int
    token_start: int
    latent: torch.Tensor  # [n, kv_dim], the cache's dtype


@dataclass(frozen=True)
class FirstToken:
    """The job's last event: its first generated token (after every KvPart)."""

    sampled: Sampled


@dataclass(frozen=True)
class Failed:
    """The job's last event when its step failed: the error its caller gets."""

    error: Exception


PrefillEvent = KvPart | FirstToken | Failed


@dataclass(frozen=True)
class PrefillLimits:
    num_blocks: int = 1024
    block_size: int = 16
    chunk_tokens: int = 512  # longest slice of one prompt per step
    max_batch_tokens: int = 4096  # tokens per step over all prompts (docs/performance.md)
    max_queue: int = 256


@dataclass(eq=False)
class PrefillJob:
    request_id: str
    prompt: list[int]
    row: SamplingRow
    out: asyncio.Queue[PrefillEvent] = field(default_factory=asyncio.Queue)
    blocks: list[int] = field(default_factory=list)
    done: int = 0  # prompt tokens already prefilled
    cancelled: bool = False


class PrefillEngine:
    def __init__(
        self,
        model: K2Model,
        limits: PrefillLimits,
        constraints: ConstraintCompiler | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """kv_dtype: the cache's (and so the streamed latents') dtype; None: the model's."""
        self.model, self.limits = model, limits
        self.constraints = constraints  # None: requests with a constraint are refused
        self.alloc = BlockAllocator(limits.num_blocks)
        self.runner = ModelRunner(model, limits.num_blocks, limits.block_size, kv_dtype)
        self.waiting: deque[PrefillJob] = deque()
        self.running: list[PrefillJob] = []
        self.served = 0
        self.kv_bytes_sent = 0
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="prefill-model")

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        constraint: ConstraintSpec | None = None,
    ) -> PrefillJob:
        """A job for the prompt; its seed is resolved here (its own, or a fresh draw)."""
        check_prompt(prompt, self.model.cfg)
        check_sampling(params, self.model.cfg)
        params, seed = params.seeded()
        allowed = self._first_token_mask(constraint)
        need = blocks_needed(len(prompt), self.limits.block_size)
        if need > self.alloc.num_blocks:
            raise ResourceExhausted(
                f"prompt needs {need} KV blocks; this prefill has {self.alloc.num_blocks}"
            )
        if len(self.waiting) >= self.limits.max_queue:
            raise ResourceExhausted("prefill queue is full")
        row = SamplingRow(params, seed, 0, prompt, (), allowed)
        job = PrefillJob(request_id, list(prompt), row)
        self.waiting.append(job)
        self._wake.set()
        return job

    def _first_token_mask(self, constraint: ConstraintSpec | None) -> torch.Tensor | None:
        if constraint is None:
            return None
        if self.constraints is None:
            raise InvalidArgument("constraint: this prefill instance has no vocabulary for it")
        try:
            return self.constraints.start(constraint).allowed()
        except ValueError as e:
            raise InvalidArgument(f"constraint: {e}") from None

    def cancel(self, job: PrefillJob) -> None:
        job.cancelled = True
        if job in self.waiting:
            self.waiting.remove(job)
        self._wake.set()

    def stats(self) -> dict[str, int]:
        return {
            "queued": len(self.waiting),
            "running": len(self.running),
            "kv_blocks_total": self.alloc.num_blocks,
            "kv_blocks_free": self.alloc.num_free,
            "prompts_served": self.served,
            "kv_bytes_sent": self.kv_bytes_sent,
        }

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._reap()
            self._admit()
            plan = self._plan()
            if not plan:
                self._wake.clear()
                await self._wake.wait()
                continue
            inputs = [
                StepInput(
                    j.prompt[j.done : j.done + n],
                    j.done,
                    j.blocks,
                    j.row if j.done + n == len(j.prompt) else None,
                )
                for j, n in plan
            ]
            on_layer = self._layer_sender(loop, plan)
            try:
                sampled = await loop.run_in_executor(
                    self._executor, functools.partial(self.runner.step, inputs, "naive", on_layer)
                )
            except Exception as e:  # a model failure fails this step's jobs, not the engine
                log.exception("prefill step failed")
                # A service error (the expert pool down: UNAVAILABLE) passes as itself; anything
                # else is INTERNAL for the caller, details only in the log.
                failure = e if isinstance(e, ServiceError) else RuntimeError("prefill step failed")
                for job, _ in plan:
                    self._finish(job, Failed(failure))
                continue
            for (job, n), result in zip(plan, sampled, strict=True):
                job.done += n
                if result is not None:
                    self._finish(job, FirstToken(result))

    def _layer_sender(self, loop: asyncio.AbstractEventLoop, plan: list[tuple[PrefillJob, int]]):
        offsets = list(itertools.accumulate((n for _, n in plan), initial=0))

        def send(layer: int, latents: torch.Tensor) -> None:  # runs on the model thread
            # One device-to-host copy per layer and step (none on a CPU), made here, while the
            # layer's latents are current: the event loop encodes host memory only.
            latents = latents.to("cpu")
            for (job, n), start in zip(plan, offsets, strict=False):
                if not job.cancelled:
                    part = KvPart(layer, job.done, latents[start : start + n])
                    self.kv_bytes_sent += part.latent.nbytes
                    loop.call_soon_threadsafe(job.out.put_nowait, part)

        return send

    def _finish(self, job: PrefillJob, last: FirstToken | Failed) -> None:
        self.running.remove(job)
        self.alloc.free(job.blocks)
        job.blocks = []
        if not job.cancelled:
            self.served += isinstance(last, FirstToken)
            job.out.put_nowait(last)

    def _reap(self) -> None:
        """Free cancelled jobs (no step is running now)."""
        for job in [j for j in self.running if j.cancelled]:
            self.running.remove(job)
            self.alloc.free(job.blocks)
            job.blocks = []

    def _admit(self) -> None:
        while self.waiting:
            job = self.waiting[0]
            need = blocks_needed(len(job.prompt), self.limits.block_size)
            if not self.alloc.can_allocate(need):
                return
            self.waiting.popleft()
            job.blocks = self.alloc.allocate(need)
            self.running.append(job)

    def _plan(self) -> list[tuple[PrefillJob, int]]:
        budget, plan = self.limits.max_batch_tokens, []
        for job in self.running:
            n = min(self.limits.chunk_tokens, len(job.prompt) - job.done, budget)
            if n <= 0:
                break
            plan.append((job, n))
            budget -= n
        return plan
