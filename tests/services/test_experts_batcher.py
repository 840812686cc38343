"""Per-round batching on the leader: queued calls share a round; a failed round is final.

The pool's round and heartbeat are fakes here (the real ones are exercised in tests/e2e)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from services.common.errors import Unavailable
from services.experts.batcher import Batcher
from services.experts.routed import Routed


def call(layer: int, rows: int, value: float) -> Routed:
    return Routed(
        layer,
        torch.full((rows, 4), value),
        torch.zeros(rows, 2, dtype=torch.long),
        torch.ones(rows, 2),
    )


class FakePool:
    """Doubles every row; the first round can be held open to let calls queue behind it."""

    def __init__(self, hold_first: bool = False, fail_at: int | None = None) -> None:
        self.rounds: list[list[Routed]] = []
        self.heartbeats = 0
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_at = fail_at

    def round(self, calls: list[Routed]) -> list[torch.Tensor]:
        self.started.set()
        self.release.wait(10)
        self.rounds.append(calls)
        if self.fail_at == len(self.rounds):
            raise RuntimeError("Connection closed by peer")
        return [2 * c.x for c in calls]

    def heartbeat(self) -> None:
        self.heartbeats += 1


async def started(pool: FakePool) -> None:
    await asyncio.to_thread(pool.started.wait, 10)


def test_queued_calls_share_the_next_round() -> None:
    async def scenario() -> None:
        pool, batcher = FakePool(hold_first=True), Batcher(heartbeat_s=5)
        task = asyncio.create_task(batcher.run(pool.round, pool.heartbeat))
        first = asyncio.create_task(batcher.compute(call(1, 2, 1.0)))
        await started(pool)  # round 1 is running with the first call only
        rest = [asyncio.create_task(batcher.compute(call(1 + k % 3, 1 + k, k))) for k in range(6)]
        await asyncio.sleep(0.05)
        pool.release.set()
        out = await asyncio.gather(first, *rest)
        assert [len(r) for r in pool.rounds] == [1, 6]
        assert {c.layer for c in pool.rounds[1]} == {1, 2, 3}  # any layers in one round
        for k, o in enumerate(out[1:]):
            assert torch.equal(o, torch.full((1 + k, 4), 2.0 * k))
        assert (batcher.calls, batcher.rounds, batcher.rows) == (7, 2, 2 + sum(range(1, 7)))
        task.cancel()

    asyncio.run(scenario())


def test_failed_round_fails_its_calls_the_queue_and_later_calls() -> None:
    async def scenario() -> None:
        pool, batcher = FakePool(hold_first=True, fail_at=1), Batcher(heartbeat_s=5)
        task = asyncio.create_task(batcher.run(pool.round, pool.heartbeat))
        first = asyncio.create_task(batcher.compute(call(1, 1, 1.0)))
        await started(pool)
        queued = asyncio.create_task(batcher.compute(call(1, 1, 2.0)))
        await asyncio.sleep(0.05)
        pool.release.set()
        for t in (first, queued):
            with pytest.raises(Unavailable):
                await t
        await asyncio.wait_for(task, 5)  # run() returns once broken
        assert batcher.broken is not None and len(pool.rounds) == 1
        with pytest.raises(Unavailable, match="down"):
            await batcher.compute(call(1, 1, 3.0))

    asyncio.run(scenario())


def test_idle_leader_heartbeats_and_a_failed_heartbeat_breaks() -> None:
    async def scenario() -> None:
        pool, batcher = FakePool(), Batcher(heartbeat_s=0.01)
        beats = 0

        def heartbeat() -> None:
            nonlocal beats
            beats += 1
            if beats == 3:
                raise RuntimeError("peer gone")

        await asyncio.wait_for(batcher.run(pool.round, heartbeat), 5)
        assert beats == 3 and batcher.broken == "peer gone" and not pool.rounds

    asyncio.run(scenario())


def test_calls_before_start_are_unavailable_and_empty_calls_skip_the_round() -> None:
    async def scenario() -> None:
        pool, batcher = FakePool(), Batcher(heartbeat_s=5)
        with pytest.raises(Unavailable, match="starting"):
            await batcher.compute(call(1, 1, 1.0))
        task = asyncio.create_task(batcher.run(pool.round, pool.heartbeat))
        await asyncio.sleep(0)
        out = await batcher.compute(call(1, 0, 1.0))
        assert out.shape == (0, 4) and not pool.rounds
        task.cancel()

    asyncio.run(scenario())


def test_cancelled_call_is_left_out_of_the_round() -> None:
    async def scenario() -> None:
        pool, batcher = FakePool(hold_first=True), Batcher(heartbeat_s=5)
        task = asyncio.create_task(batcher.run(pool.round, pool.heartbeat))
        first = asyncio.create_task(batcher.compute(call(1, 1, 1.0)))
        await started(pool)
        gone = asyncio.create_task(batcher.compute(call(2, 1, 9.0)))
        kept = asyncio.create_task(batcher.compute(call(3, 1, 3.0)))
        await asyncio.sleep(0.01)
        gone.cancel()
        pool.release.set()
        await asyncio.gather(first, kept)
        assert [[c.layer for c in r] for r in pool.rounds] == [[1], [3]]
        task.cancel()

    asyncio.run(scenario())


def test_close_runs_the_last_step_after_the_round_in_progress() -> None:
    async def scenario() -> None:
        pool, batcher = FakePool(hold_first=True), Batcher(heartbeat_s=5)
        task = asyncio.create_task(batcher.run(pool.round, pool.heartbeat))
        first = asyncio.create_task(batcher.compute(call(1, 1, 1.0)))
        await started(pool)
        task.cancel()
        order: list[str] = []
        closing = asyncio.create_task(
            batcher.close(lambda: order.append(f"stop {len(pool.rounds)}"))
        )
        await asyncio.sleep(0.02)
        pool.release.set()
        await closing
        assert order == ["stop 1"]  # the stop waited for round 1 to finish
        first.cancel()

    asyncio.run(scenario())
