"""The expert data plane in process: frames checked against their header and the pool, M2N rows
straight to each rank's shard equal to the in-process MoE (1, 2 and 4 ranks), and the failure
semantics (a rank that goes away or stays silent fails the step in bounded time, a refused
frame is named, a stale reply is dropped)."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, K2Model, load_model
from services.common.errors import InvalidArgument, Unavailable
from services.experts import wire
from services.experts.dataplane import DataPlane, Endpoint
from services.experts.dataplane_client import DataPlaneClient
from services.experts.shard import ExpertShard
from tests.services.dataplane_peer import SilentRank, ask

TOKEN = secrets.token_bytes(wire.TOKEN_BYTES)
D = 128


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT, torch.float32)


def start_planes(ranks: int) -> list[DataPlane]:
    cpu = torch.device("cpu")
    shards = [
        ExpertShard.load(EMBEDDED_CHECKPOINT, r, ranks, torch.float32, False, cpu)
        for r in range(ranks)
    ]
    return [DataPlane(s, TOKEN, "127.0.0.1").start() for s in shards]


@pytest.fixture(scope="module", params=[1, 2, 4])
def planes(request) -> Iterator[list[DataPlane]]:
    planes = start_planes(request.param)
    yield planes
    for p in planes:
        p.stop()


def client_for(planes: list[DataPlane], timeout_s: float = 10.0, shared: bool = True):
    endpoints = [p.endpoint for p in planes]
    per_rank = planes[0].shard.spec.per_rank
    return DataPlaneClient(endpoints, TOKEN, per_rank, D, timeout_s, shared_memory=shared)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-memory", "tcp"])
def test_m2n_equals_in_process_moe(planes, model, shared) -> None:
    gen = torch.Generator().manual_seed(len(planes))
    client = client_for(planes, shared=shared)
    try:
        for layer, moe in model.moe_layers().items():
            for rows in (1, 7, 64):
                x = torch.randn(rows, D, generator=gen)
                ids, w = moe.router(x)
                got = client.submit(layer, x, ids, w).result()
                want = moe.experts(x, ids, w)
                assert ((got - want).norm() / want.norm()).item() < 1e-5
        x = torch.randn(5, D, generator=gen).bfloat16()  # bf16 rows travel as bf16
        ids, w = next(iter(model.moe_layers().values())).router(x.float())
        assert client.submit(1, x, ids, w).result().dtype == torch.bfloat16
        assert client.shared_ranks == (list(range(len(planes))) if shared else [])
    finally:
        client.close()
    assert sum(p.served for p in planes) > 0


def test_rows_go_only_to_the_ranks_that_hold_their_experts(model) -> None:
    planes = start_planes(4)  # 2 experts each
    try:
        client = client_for(planes)
        before = [p.served for p in planes]
        x = torch.randn(3, D)
        ids = torch.tensor([[0, 1], [1, 0], [0, 1]])  # all on rank 0
        client.submit(1, x, ids, torch.rand(3, 2)).result()
        assert [p.served - b for p, b in zip(planes, before, strict=True)] == [1, 0, 0, 0]
        client.close()
    finally:
        for p in planes:
            p.stop()


def decode(frames: list[bytes]) -> wire.Request:
    """As a rank decodes what it received (into a writable buffer)."""
    got = [bytearray(f) for f in frames]
    return wire.decode_request(wire.decode_header(got, TOKEN, frozenset({2})), got, D, 4)


def test_frames_round_trip_any_layout() -> None:
    """Strided views, one-element views of any stride, bf16, and empty tensors."""
    wide = torch.randn(3, 2 * D)
    for x, w in (
        (wide[:, ::2], torch.rand(3, 2)[:, 0]),
        (wide[:1, :D].bfloat16(), torch.rand(1, 2)[:, 1]),
    ):
        pairs = torch.zeros(len(w), 2, dtype=torch.long)
        frames = [bytes(f) for f in wire.encode_request(2, 5, TOKEN, x, pairs, w)]
        got = decode(frames)
        assert torch.equal(got.x, x) and torch.equal(got.weights, w) and got.header.step == 5
    empty = wire.encode_request(2, 6, TOKEN, torch.empty(0, D), torch.empty(0, 2), torch.empty(0))
    got = decode([bytes(f) for f in empty])
    assert got.x.shape == (0, D) and got.pairs.shape == (0, 2)


def _frames(x, pairs, weights, token=TOKEN, layer=1) -> list[bytes]:
    return [bytes(f) for f in wire.encode_request(layer, 9, token, x, pairs, weights)]


def bad_frames() -> list[tuple[str, list[bytes]]]:
    x, pairs, w = torch.randn(2, D), torch.tensor([[0, 1], [1, 0]]), torch.rand(2)
    good = _frames(x, pairs, w)
    return [
        ("wrong pool token", _frames(x, pairs, w, token=bytes(16))),
        ("not an MoE layer", _frames(x, pairs, w, layer=0)),
        ("rows: ", [good[0], good[1][:-2], *good[2:]]),
        ("pairs: a row index", _frames(x, torch.tensor([[0, 1], [2, 0]]), w)),
        ("pairs: an expert outside", _frames(x, torch.tensor([[0, 1], [1, 99]]), w)),
        ("weights: ", [*good[:3], good[3] + b"\0\0\0\0"]),
        ("header: ", [good[0][:-1], *good[1:]]),
        ("not a version-1", [b"XXXX" + good[0][4:], *good[1:]]),
        ("3 frames", good[:3]),
    ]


@pytest.mark.parametrize(("message", "frames"), bad_frames())
def test_a_frame_that_does_not_fit_is_refused_by_name(planes, message, frames) -> None:
    reply = ask(planes[0].endpoint, frames)
    header = wire.Header.decode(reply[0])
    assert header.kind == wire.ERROR and message in reply[1].decode()


def test_a_refusal_reaches_the_caller_as_invalid_argument(planes) -> None:
    client = client_for(planes)
    client.token = bytes(16)  # as after a restart, with old endpoints
    try:
        with pytest.raises(InvalidArgument, match="wrong pool token"):
            client.submit(
                1, torch.randn(2, D), torch.tensor([[0, 1], [0, 1]]), torch.rand(2, 2)
            ).result()
        assert client.closed  # the caller fetches fresh endpoints next
    finally:
        client.close()


def test_a_rank_that_goes_away_fails_the_step_at_once() -> None:
    planes = start_planes(2)
    client = client_for(planes, timeout_s=30)
    x, ids, w = torch.randn(2, D), torch.tensor([[0, 7], [1, 6]]), torch.rand(2, 2)
    try:
        client.submit(1, x, ids, w).result()  # connected to both
        planes[1].stop()
        start = time.monotonic()
        with pytest.raises(Unavailable, match="rank 1"):
            client.submit(1, x, ids, w).result()
        assert time.monotonic() - start < 10  # the disconnect, not the 30 s deadline
        assert client.closed
        with pytest.raises(Unavailable, match="closed"):
            client.submit(1, x, ids, w)
    finally:
        client.close()
        planes[0].stop()


def test_a_refused_connection_fails_the_step_at_once() -> None:
    """A stale endpoint (its rank is gone, nothing listens there)."""
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    client = DataPlaneClient([Endpoint(0, f"tcp://127.0.0.1:{port}")], TOKEN, 8, D, 30, False)
    start = time.monotonic()
    try:
        with pytest.raises(Unavailable, match="rank 0 is unreachable"):
            client.submit(1, torch.randn(1, D), torch.tensor([[0, 1]]), torch.rand(1, 2)).result()
    finally:
        client.close()
    assert time.monotonic() - start < 10


def test_a_silent_rank_times_out_and_a_late_reply_is_dropped() -> None:
    rank = SilentRank()
    client = DataPlaneClient([rank.endpoint], TOKEN, 8, D, timeout_s=0.5, shared_memory=False)
    x, ids, w = torch.randn(2, D), torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2)
    try:
        with pytest.raises(Unavailable, match=r"ranks \[0\] did not answer"):
            client.submit(1, x, ids, w).result()
        request = rank.take()
        header = wire.Header.decode(request[0])
        assert (header.layer, header.rows, header.pairs) == (1, 2, 4)
    finally:
        client.close()
        rank.close()
    # A fresh client (as the caller builds after a failure) ignores an answer to an old step.
    rank = SilentRank()
    client = DataPlaneClient([rank.endpoint], TOKEN, 8, D, timeout_s=10, shared_memory=False)
    try:
        pending = client.submit(1, x, ids, w)
        request = rank.take()
        header = wire.Header.decode(request[0])
        stale = wire.Header(wire.REPLY, x.dtype, 1, 2, 0, header.step - 1, TOKEN)
        rank.send([stale.encode(), bytes(2 * D * 4)])
        partial = torch.full((2, D), 3.0)
        rank.send(wire.encode_reply(header, partial))
        assert torch.equal(pending.result(), partial)
    finally:
        client.close()
        rank.close()
