"""The data plane's framing over real sockets: frame sets round-trip (empty frames too), limits
are enforced before anything is allocated, a peer that closes or stalls inside a set is seen
within the deadline, two peers sending large sets at each other both finish, and a rank drops a
caller that breaks the framing while serving the others."""

from __future__ import annotations

import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT
from services.experts import dataplane, framing, wire
from services.experts.dataplane import DataPlane
from services.experts.shard import ExpertShard
from tests.services.dataplane_peer import connect, refusal

TOKEN = secrets.token_bytes(wire.TOKEN_BYTES)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_frame_sets_round_trip(pair) -> None:
    a, b = pair
    sets = [[b"head"], [b"", b"x" * 5, b""], [memoryview(bytes(range(256)) * 300), b"tail"]]
    for frames in sets:
        framing.send_frames(a, frames, 5)
        assert [bytes(f) for f in framing.recv_frames(b, 1 << 20, 5)] == [bytes(f) for f in frames]


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        (struct.pack("<I", 0), "a set of 0 frames"),
        (struct.pack("<I", framing.MAX_FRAMES + 1), f"a set of {framing.MAX_FRAMES + 1} frames"),
        (struct.pack("<IQQ", 2, 1 << 40, 1), f"of {(1 << 40) + 1} bytes"),
    ],
)
def test_a_set_over_the_limits_is_refused_before_it_is_read(pair, prefix, message) -> None:
    a, b = pair
    a.sendall(prefix)
    with pytest.raises(framing.FramingError, match=message):
        framing.recv_frames(b, 1 << 20, 5)


def test_a_peer_that_closes_or_stalls_inside_a_set_is_seen(pair) -> None:
    a, b = pair
    a.sendall(struct.pack("<IQ", 1, 100) + b"x" * 10)  # 90 bytes short
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        framing.recv_frames(b, 1 << 20, 0.3)
    assert time.monotonic() - start < 5
    c, d = socket.socketpair()
    d.setblocking(False)
    c.sendall(struct.pack("<IQ", 1, 100) + b"x" * 10)
    c.close()
    with pytest.raises(framing.Closed):
        framing.recv_frames(d, 1 << 20, 5)
    d.close()


def test_two_peers_sending_large_sets_at_each_other_both_finish(pair) -> None:
    """Each send fills the other's buffers; the side that reads while it sends unblocks both."""
    a, b = pair
    big = [bytes(32 * 2**20)]
    got_by_a: list[list[memoryview]] = []
    errors: list[BaseException] = []

    def b_side() -> None:
        try:
            framing.send_frames(b, big, 30)  # blocks until a reads
            framing.recv_frames(b, 1 << 30, 30)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=b_side)
    thread.start()
    framing.send_frames(a, big, 30, lambda: got_by_a.append(framing.recv_frames(a, 1 << 30, 30)))
    thread.join(60)
    assert not errors and not thread.is_alive()
    assert len(got_by_a) == 1 and got_by_a[0][0].nbytes == len(big[0])


def test_a_rank_drops_a_caller_that_breaks_the_framing_and_serves_the_rest(monkeypatch) -> None:
    monkeypatch.setattr(dataplane, "FRAME_TIMEOUT_S", 0.5)
    shard = ExpertShard.load(EMBEDDED_CHECKPOINT, 0, 1, torch.float32, False, torch.device("cpu"))
    plane = DataPlane(shard, TOKEN, "127.0.0.1").start()
    try:
        bad, stalled = connect(plane.endpoint), connect(plane.endpoint)
        bad.sendall(struct.pack("<I", 99))
        stalled.sendall(struct.pack("<IQ", 1, 1000) + b"x")
        for sock in (bad, stalled):
            framing.wait(sock, 1, time.monotonic() + 10)  # POLLIN: the rank closed it
            assert sock.recv(1) == b""
            sock.close()
        # The rank still answers others (here, a refusal by name: its layer is not MoE).
        header = wire.Header(wire.REQUEST, torch.float32, 0, 0, 0, 1, TOKEN).encode()
        assert "not an MoE layer" in refusal(plane.endpoint, [header, b"", b"", b""])
    finally:
        plane.stop()


def test_busy_polling_sees_what_sleeping_sees(pair) -> None:
    a, b = pair
    poller = select.poll()
    poller.register(b, select.POLLIN)
    start = time.monotonic()
    assert framing.poll_spinning(poller, 0.2, 0.05) == []  # nothing: spins, then sleeps the rest
    assert 0.15 <= time.monotonic() - start < 5
    a.sendall(b"x")
    assert framing.poll_spinning(poller, 5, 1.0) == [(b.fileno(), select.POLLIN)]
    assert framing.poll_spinning(poller, 5, 0.0) == [(b.fileno(), select.POLLIN)]
