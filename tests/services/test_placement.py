"""The one placement policy (services/common/placement.py) over fake Stats stubs: picks spread by
polled load plus in-flight work, dead peers are skipped while another answers, slow Stats never
fail a pick, and `ranked` orders every peer for a caller that retries down the list."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from services.common.placement import Placement
from services.pb.k2.v1 import decode_pb2, decode_pb2_grpc

PEERS = [(f"d{i}", f"127.0.0.1:{1010 + i}") for i in range(3)]


class _StatsStub:
    def __init__(self, stats: decode_pb2.DecodeStats | None, delay_s: float = 0.0) -> None:
        self.stats, self.delay_s = stats, delay_s

    async def Stats(self, request: Any, timeout: float) -> decode_pb2.DecodeStats:
        await asyncio.sleep(self.delay_s)
        if self.stats is None:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
            )
        return self.stats


def _stats(queued: int, running: int, free: int) -> decode_pb2.DecodeStats:
    return decode_pb2.DecodeStats(queued=queued, running=running, kv_blocks_free=free)


def _placement(stubs: list[_StatsStub]) -> Placement:
    placement = Placement(PEERS, decode_pb2_grpc.DecodeStub, poll_interval_s=0.01)
    for peer, stub in zip(placement.peers, stubs, strict=True):
        peer.stub = stub  # type: ignore[assignment]
    return placement


def test_picks_spread_by_load_and_skip_dead_peers() -> None:
    async def run() -> tuple[list[str], list[str]]:
        placement = _placement(
            [_StatsStub(_stats(3, 1, 10)), _StatsStub(_stats(0, 1, 10)), _StatsStub(None)]
        )
        picked = [p.name for p in await placement.pick(4, wait_s=5)]
        for peer in placement.peers:
            peer.stub = _StatsStub(None)  # type: ignore[assignment]
        await asyncio.sleep(0.1)
        # Nobody answers: every peer is still tried (the call itself then reports UNAVAILABLE).
        none_up = [p.name for p in await placement.pick(3, wait_s=5)]
        await placement.close()
        return picked, none_up

    picked, none_up = asyncio.run(run())
    assert picked == ["d1", "d1", "d1", "d0"]
    assert "d2" in none_up and len(none_up) == 3  # d2 never answered, yet is tried


def test_work_started_counts_until_a_poll_sent_after_it_answers() -> None:
    """A burst between two polls spreads: each pick's work is counted on its peer at once; once
    a poll sent after it answers, the reply's own count replaces it (never counted twice)."""

    async def run() -> tuple[list[str], list[int]]:
        stubs = [_StatsStub(_stats(0, 0, 10)) for _ in PEERS]
        placement = Placement(PEERS, decode_pb2_grpc.DecodeStub, poll_interval_s=3600)
        for peer, stub in zip(placement.peers, stubs, strict=True):
            peer.stub = stub  # type: ignore[assignment]
        await placement.polled(wait_s=5)  # one round, then no other for an hour
        picked, busy = [], contextlib.ExitStack()
        for _ in range(4):
            [peer] = await placement.pick(1, wait_s=5)
            picked.append(peer.name)
            busy.enter_context(peer.busy())
        counted = [p.rank()[1] for p in placement.peers]
        stubs[0].stats = _stats(0, 2, 8)  # d0 now reports both of its requests running
        await placement._poll_one(placement.peers[0])
        counted.append(placement.peers[0].rank()[1])
        busy.close()
        await placement.close()
        return picked, counted

    picked, counted = asyncio.run(run())
    assert picked == ["d0", "d1", "d2", "d0"]
    assert counted == [2, 1, 1, 2]  # d0: 2 started since the poll, then the reply's 2


def test_ties_go_to_the_peer_with_more_free_kv_and_ranked_puts_dead_last() -> None:
    async def run() -> tuple[str, list[str]]:
        placement = _placement(
            [_StatsStub(None), _StatsStub(_stats(1, 1, 5)), _StatsStub(_stats(2, 0, 50))]
        )
        [peer] = await placement.pick(1, wait_s=5)
        ranked = [p.name for p in placement.ranked()]
        await placement.close()
        return peer.name, ranked

    best, ranked = asyncio.run(run())
    assert best == "d2" and ranked == ["d2", "d1", "d0"]


def test_slow_stats_under_load_never_fail_a_pick() -> None:
    """Regression: each request probed every decode's Stats with a 1 s
    timeout, and under load (Stats answered after >1 s) requests failed with "no decode
    instance is reachable". Loads are polled in the background."""

    async def run() -> list[str]:
        placement = _placement([_StatsStub(_stats(q, 0, 10), delay_s=1.5) for q in (4, 0, 9)])
        picked = [p.name for p in await placement.pick(2, wait_s=30)]
        await placement.close()
        return picked

    assert asyncio.run(run()) == ["d1", "d1"]
