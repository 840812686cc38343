"""The data plane's shared-memory path between processes on one host: micro-batches in flight
through their own segments, a rank that cannot map a segment (another host) gets bytes, a bad
segment request is refused by name, and no segment outlives its caller - closed, or killed (the
next sweep deletes it)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, K2Model, load_model
from services.common.errors import InvalidArgument
from services.experts import segment, wire
from services.experts.dataplane import DataPlane
from services.experts.dataplane_client import DataPlaneClient
from services.experts.shard import ExpertShard
from tests.services.dataplane_peer import refusal

pytestmark = pytest.mark.skipif(not segment.available(), reason="no writable /dev/shm")

TOKEN = secrets.token_bytes(wire.TOKEN_BYTES)
D = 128


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT, torch.float32)


@pytest.fixture(scope="module")
def planes() -> Iterator[list[DataPlane]]:
    cpu = torch.device("cpu")
    shards = [
        ExpertShard.load(EMBEDDED_CHECKPOINT, r, 2, torch.float32, False, cpu) for r in (0, 1)
    ]
    # rank 1 busy-polls for its next request (expert_busy_poll_us), rank 0 sleeps
    planes = [DataPlane(s, TOKEN, "127.0.0.1", 0.001 * s.rank).start() for s in shards]
    yield planes
    for p in planes:
        p.stop()


def client_for(planes: list[DataPlane], busy_poll_s: float = 0.0) -> DataPlaneClient:
    per_rank = planes[0].shard.spec.per_rank
    endpoints = [p.endpoint for p in planes]
    return DataPlaneClient(endpoints, TOKEN, per_rank, D, 10.0, busy_poll_s=busy_poll_s)


def ours() -> set[str]:
    return {p.name for p in segment.SHM_DIR.glob(f"{segment.PREFIX}*")}


@pytest.mark.parametrize("busy_poll_s", [0.0, 0.001], ids=["sleeping", "busy-polling"])
def test_steps_in_flight_each_have_their_segment(planes, model, busy_poll_s) -> None:
    layer, moe = next(iter(model.moe_layers().items()))
    client = client_for(planes, busy_poll_s)
    gen = torch.Generator().manual_seed(3)
    try:
        xs = [torch.randn(rows, D, generator=gen) for rows in (5, 40, 1)]
        routed = [moe.router(x) for x in xs]
        pending = [client.submit(layer, x, *r) for x, r in zip(xs, routed, strict=True)]
        for x, r, p in reversed(list(zip(xs, routed, pending, strict=True))):
            want = moe.experts(x, *r)
            assert ((p.result() - want).norm() / want.norm()).item() < 1e-5
        assert client.shared_ranks == [0, 1]
        assert all(p.sent and all(s.seg is not None for s in p.sent) for p in pending)
        made = {seg.name for lane in client._lanes for seg in lane.segments}
        assert 2 <= len(made) <= 2 * 3 and made <= ours()
    finally:
        client.close()
    assert not made & ours()  # closing deletes them


def test_a_rank_that_cannot_map_the_segment_is_sent_bytes(planes, model, tmp_path) -> None:
    """As a rank on another host: its /dev/shm does not hold the caller's segment."""
    layer, moe = next(iter(model.moe_layers().items()))
    elsewhere = planes[1]._maps
    planes[1]._maps = segment.Mappings(root=tmp_path)
    client = client_for(planes)
    try:
        for rows in (3, 30):
            x = torch.randn(rows, D)
            ids, w = moe.router(x)
            want = moe.experts(x, ids, w)
            got = client.submit(layer, x, ids, w).result()
            assert ((got - want).norm() / want.norm()).item() < 1e-5
        assert client.shared_ranks == [0]
        assert not client._lanes[1].segments
    finally:
        client.close()
        planes[1]._maps = elsewhere


def test_a_stale_token_still_fails_the_step(planes) -> None:
    """The segment offer is refused for the token, which is not a reason to fall back."""
    client = client_for(planes)
    client.token = bytes(wire.TOKEN_BYTES)
    try:
        with pytest.raises(InvalidArgument, match="wrong pool token"):
            client.submit(1, torch.randn(2, D), torch.tensor([[0, 1], [0, 1]]), torch.rand(2, 2))
        assert client.closed
    finally:
        client.close()


def test_a_bad_segment_request_is_refused_by_name(planes) -> None:
    seg = segment.Segment(segment.SMALLEST)
    try:
        rows, pairs = 2, 2
        layout = segment.Layout.of(rows, pairs, D, 4)
        segment.view(seg.buf, layout.pairs, torch.int32, (pairs, 2))[:] = torch.tensor(
            [[0, 1], [2, 0]]  # row 2 of 2
        )

        def request(name=seg.name, nonce=seg.nonce, rows=rows, layer=1, pairs=pairs) -> list[bytes]:
            frames = wire.encode_shm_request(
                layer, 1, TOKEN, torch.float32, rows, pairs, name, nonce
            )
            return [bytes(f) for f in frames]

        assert refusal(
            planes[0].endpoint, request(rows=0, layer=0, pairs=0)[:1] + [b"x"]
        ).startswith("segment: ")
        cases = {
            "is not a data-plane segment name": request(name="k2ex-../../etc/passwd0000000000000"),
            "nonce does not match": request(nonce=bytes(segment.NONCE_BYTES)),
            "the request needs": request(rows=1 << 20),
            "pairs: a row index outside": request(),
            "not an MoE layer": request(layer=0),
        }
        for message, frames in cases.items():
            assert message in refusal(planes[0].endpoint, frames)
        gone = segment.PREFIX + "0" * 32
        assert "cannot open" in refusal(planes[0].endpoint, request(name=gone))
    finally:
        seg.close()


_HOLD = """
import sys, time
from services.experts import segment
seg = segment.Segment(segment.SMALLEST)
print(seg.name, flush=True)
time.sleep(600)
"""


def test_a_killed_callers_segment_is_swept_and_a_live_one_is_not() -> None:
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    live = segment.Segment(segment.SMALLEST)
    try:
        name = child.stdout.readline().strip()
        assert name in ours()
        segment.sweep()
        assert name in ours()  # its caller lives
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert segment.sweep() >= 1
        assert name not in ours() and live.name in ours()
    finally:
        child.kill()
        child.wait(30)
        live.close()


def test_a_full_dev_shm_sends_that_steps_rows_as_bytes(planes, model, monkeypatch) -> None:
    layer, moe = next(iter(model.moe_layers().items()))

    def full(size: int) -> segment.Segment:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segment, "Segment", full)
    client = client_for(planes)
    try:
        x = torch.randn(6, D)
        ids, w = moe.router(x)
        want = moe.experts(x, ids, w)
        pending = client.submit(layer, x, ids, w)
        assert all(s.seg is None for s in pending.sent)
        assert ((pending.result() - want).norm() / want.norm()).item() < 1e-5
    finally:
        client.close()
