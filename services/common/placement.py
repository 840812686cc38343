"""The one placement policy: which instance of a kind takes the next piece of work.

Used by the tokenizer service (which decode instance runs a choice) and by decode (which prefill
instance fills a prompt's KV). Load comes from one source: each instance's own `Stats` RPC, polled
in the background every `poll_interval_s`, never per request, plus the work this process started
on each instance after that poll was sent (counted here, so a burst between two polls spreads out
instead of piling onto the instance that looked idle, and work the reply already counts is not
counted twice). A slow Stats reply under load only delays the next poll; it cannot fail a request.

Rank (lower first): not healthy, then queued + running + started since the poll, then most free
KV blocks.
A peer whose last poll failed is left out of `pick` while another answers; with none answering,
every peer is tried and the call itself reports. `ranked` orders all peers for a caller that
retries down the list.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import grpc

from services.common.channel import open_channel
from services.common.security import Security
from services.pb.k2.v1 import common_pb2


class Stats(Protocol):
    queued: int
    running: int
    kv_blocks_free: int


class StatsStub(Protocol):
    def Stats(self, request: common_pb2.StatsRequest, *, timeout: float) -> Any: ...


S = TypeVar("S", bound=StatsStub)


@dataclass(eq=False)
class Peer(Generic[S]):
    name: str
    target: str
    stub: S
    channel: grpc.aio.Channel
    inflight: int = 0  # work from this process running on the peer now
    started: int = 0  # work from this process ever started on the peer
    started_at_poll: int = 0  # `started` when the last answered poll was sent
    last: Any = None  # the last Stats reply that answered
    healthy: bool | None = None  # None: not polled yet

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Counts one piece of work on this peer while the block runs."""
        self.inflight += 1
        self.started += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def rank(self) -> tuple[bool, int, int]:
        if self.last is None:
            return (self.healthy is False, self.inflight, 0)
        load = self.last.queued + self.last.running + self.started - self.started_at_poll
        return (self.healthy is False, load, -self.last.kv_blocks_free)


class Placement(Generic[S]):
    def __init__(
        self,
        peers: Sequence[tuple[str, str]],
        make_stub: type[S],
        *,
        security: Security | None = None,
        poll_interval_s: float = 0.25,
        stats_timeout_s: float = 5.0,
    ) -> None:
        """peers: (name, target) of every instance, from the deployment."""
        if not peers:
            raise ValueError("placement needs at least one peer")
        self.poll_interval_s, self.stats_timeout_s = poll_interval_s, stats_timeout_s
        self.peers: list[Peer[S]] = []
        for name, target in peers:
            channel = open_channel(target, security=security)
            self.peers.append(Peer(name, target, make_stub(channel), channel))
        self._poller: asyncio.Task | None = None
        self._first_poll: asyncio.Event | None = None

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for peer in self.peers:
            await peer.channel.close()

    async def pick(self, n: int, wait_s: float) -> list[Peer[S]]:
        """n picks, each the best-ranked counting the picks before it. The first call waits (up
        to wait_s, the caller's own budget) for the first round of Stats."""
        await self.polled(wait_s)
        candidates = [p for p in self.peers if p.healthy] or self.peers
        extra = dict.fromkeys(candidates, 0)
        picks = []
        for _ in range(n):
            peer = min(candidates, key=lambda p: _plus(p.rank(), extra[p]))
            extra[peer] += 1
            picks.append(peer)
        return picks

    def ranked(self) -> list[Peer[S]]:
        """Every peer, best first (no wait: before the first poll all rank equal)."""
        self.start()
        return sorted(self.peers, key=Peer.rank)

    async def polled(self, wait_s: float) -> None:
        """Polling runs (started on first use: grpc.aio channels live in the serving loop), and
        its first round is in, or wait_s has passed."""
        self.start()
        assert self._first_poll is not None
        if not self._first_poll.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._first_poll.wait(), wait_s)

    def answered(self) -> list[Peer[S]]:
        """The peers whose last poll answered, with their Stats."""
        return [p for p in self.peers if p.healthy and p.last is not None]

    def start(self) -> None:
        """Starts polling (in the running loop), once."""
        if self._poller is None:
            self._first_poll = asyncio.Event()
            self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        assert self._first_poll is not None
        while True:
            await asyncio.gather(*(self._poll_one(p) for p in self.peers))
            self._first_poll.set()
            await asyncio.sleep(self.poll_interval_s)

    async def _poll_one(self, peer: Peer[S]) -> None:
        sent_at = peer.started
        try:
            reply = await peer.stub.Stats(common_pb2.StatsRequest(), timeout=self.stats_timeout_s)
        except grpc.aio.AioRpcError:
            peer.healthy = False
            return
        peer.healthy, peer.last, peer.started_at_poll = True, reply, sent_at


def _plus(rank: tuple[bool, int, int], extra: int) -> tuple[bool, int, int]:
    return (rank[0], rank[1] + extra, rank[2])
