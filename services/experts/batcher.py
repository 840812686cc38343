"""Per-round batching of concurrent calls on the leader (rank 0).

Calls queue while a round runs; the next round takes every queued call (any layers) at once, so
calls per round grow with concurrency and one decode step's batch costs one round per MoE layer
whatever the number of callers. Rounds run one at a time on one dedicated thread (the collectives
block and must be issued in the same order on every rank). When idle for `heartbeat_s`, an empty
round keeps the followers' collectives alive and notices a dead peer.

A failed round or heartbeat breaks the batcher for good: that round's calls, the queued ones and
every later one get UNAVAILABLE, and `run()` returns so that the process can exit and be restarted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from services.common.errors import Unavailable
from services.experts.routed import Routed

log = logging.getLogger(__name__)

RoundFn = Callable[[list[Routed]], list[torch.Tensor]]


@dataclass
class _Pending:
    call: Routed
    done: asyncio.Future[torch.Tensor]


class Batcher:
    def __init__(self, heartbeat_s: float = 1.0) -> None:
        self.heartbeat_s = heartbeat_s
        self._running = False
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="experts-round")
        self.broken: str | None = None
        self.calls = self.rows = self.rounds = 0

    async def compute(self, call: Routed) -> torch.Tensor:
        """The call's output once its round is done; Unavailable when the pool is broken."""
        if self.broken is not None:
            raise Unavailable("the expert pool is down (restarting)")
        if not self._running:
            raise Unavailable("the expert pool is starting")
        if call.rows == 0:
            return torch.empty_like(call.x)
        pending = _Pending(call, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._wake.set()
        return await pending.done  # cancelled by the caller: the round skips or drops it

    async def run(self, run_round: RoundFn, heartbeat: Callable[[], None]) -> None:
        """Serve calls with the pool's round and heartbeat until one fails (then returns, with
        `broken` set). Calls before this starts are refused as UNAVAILABLE."""
        self._running = True
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
            except TimeoutError:
                if not await self._in_thread(heartbeat):
                    return
                continue
            self._wake.clear()
            batch = [p for p in self._queue if not p.done.done()]
            self._queue = []
            if batch and not await self._round(run_round, batch):
                return

    async def _round(self, run_round: RoundFn, batch: list[_Pending]) -> bool:
        calls = [p.call for p in batch]
        outs: list[torch.Tensor] = []

        def work() -> None:
            outs.extend(run_round(calls))

        if not await self._in_thread(work, batch):
            return False
        self.rounds += 1
        self.calls += len(calls)
        self.rows += sum(c.rows for c in calls)
        for pending, out in zip(batch, outs, strict=True):
            if not pending.done.done():
                pending.done.set_result(out)
        return True

    async def _in_thread(self, fn: Callable[[], None], batch: Sequence[_Pending] = ()) -> bool:
        """Run fn on the round thread; on failure break the batcher and fail batch + queue."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, fn)
            return True
        except Exception as exc:
            log.error("expert pool broken: %s", exc)
            self.broken = str(exc)
            for pending in [*batch, *self._queue]:
                if not pending.done.done():
                    pending.done.set_exception(Unavailable("the expert pool is down (restarting)"))
            self._queue = []
            return False

    async def close(self, last: Callable[[], None] | None = None) -> None:
        """Run `last` (e.g. telling the followers to stop) after any round in progress."""
        if last is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, last)
        self._executor.shutdown(wait=False)
