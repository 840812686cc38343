"""The Experts gRPC front and RemoteExperts client, in process, on port 0.

The pool behind the batcher is the real dispatch/compute/combine math over two in-process shards
of the embedded checkpoint, with the collectives replaced by pack/unpack, and each shard's own data
plane (the DeepSpeed job itself is exercised in tests/e2e/test_experts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, K2Model, generate_ids, load_model
from services.common.errors import Unavailable
from services.common.server import ServerOptions, start_server
from services.common.tensor_codec import tensor_to_proto
from services.experts import wire
from services.experts.batcher import Batcher
from services.experts.client import ExpertsClient, attach_remote_experts
from services.experts.dataplane import DataPlane
from services.experts.plan import combine, pack, split, unpack
from services.experts.routed import Routed
from services.experts.servicer import ExpertsServicer
from services.experts.shard import ExpertShard
from services.pb.k2.v1 import common_pb2, experts_pb2, experts_pb2_grpc

SERVICE = experts_pb2.DESCRIPTOR.services_by_name["Experts"].full_name


class InProcessPool:
    def __init__(self, ranks: int) -> None:
        cpu = torch.device("cpu")
        self.shards = [
            ExpertShard.load(EMBEDDED_CHECKPOINT, r, ranks, torch.float32, False, cpu)
            for r in range(ranks)
        ]
        self.spec = self.shards[0].spec

    def round(self, calls: list[Routed]) -> list[torch.Tensor]:
        parts = split(calls, self.spec, torch.float32)
        d = self.spec.hidden_size
        partials = [
            s.compute(unpack(pack(p), *p.header, d, torch.float32))
            for p, s in zip(parts, self.shards, strict=True)
        ]
        return combine(calls, parts, partials)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Batcher]]:
    """An Experts server on its own event loop thread; yields (target, batcher)."""
    pool = InProcessPool(2)
    loop = asyncio.new_event_loop()
    ready: dict[str, object] = {}
    started = threading.Event()
    stop = asyncio.Event()

    token = secrets.token_bytes(wire.TOKEN_BYTES)
    planes = [DataPlane(shard, token, "127.0.0.1").start() for shard in pool.shards]

    async def serve() -> None:
        batcher = Batcher(heartbeat_s=0.2)
        servicer = ExpertsServicer(batcher, pool.spec)
        servicer.endpoints, servicer.token = [p.endpoint for p in planes], token
        servicer.dataplane = planes[0]
        running = await start_server(
            "experts-test",
            [lambda s: experts_pb2_grpc.add_ExpertsServicer_to_server(servicer, s)],
            [SERVICE],
            ServerOptions(),
        )
        ready.update(target=running.address, batcher=batcher)
        rounds = asyncio.create_task(batcher.run(pool.round, lambda: None))
        started.set()
        await stop.wait()
        await running.drain(0.5)
        rounds.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rounds

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(30)
    yield ready["target"], ready["batcher"]
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()
    for plane in planes:
        plane.stop()


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT, torch.float32)


@pytest.mark.parametrize("transport", ["dataplane", "grpc"])
def test_remote_equals_local_experts_per_layer(server, model: K2Model, transport: str) -> None:
    client = ExpertsClient(server[0], transport=transport)
    gen = torch.Generator().manual_seed(0)
    try:
        for layer, moe in model.moe_layers().items():
            x = torch.randn(11, 128, generator=gen)
            ids, w = moe.router(x)
            got = client.compute(layer, x, ids, w)
            want = moe.experts(x, ids, w)
            assert got.dtype == torch.float32 and got.is_contiguous()
            assert ((got - want).norm() / want.norm()).item() < 1e-5
    finally:
        client.close()


@pytest.mark.parametrize("transport", ["dataplane", "grpc"])
def test_generation_with_remote_experts_equals_local(server, model: K2Model, transport) -> None:
    """Over the data plane, each MoE layer's shared expert runs while its rows are out."""
    prompts = [[5, 17, 300, 42], list(range(100, 130))]
    want = generate_ids(model, prompts, 6)
    remote_model = load_model(EMBEDDED_CHECKPOINT, torch.float32)
    client = attach_remote_experts(remote_model, server[0], transport=transport)
    # only data-plane rows can be sent before they are collected (gRPC answers in the call)
    assert remote_model.submits_experts == (transport == "dataplane")
    try:
        before = client.stats()
        assert generate_ids(remote_model, prompts, 6) == want
        after = client.stats()
        if transport == "grpc":
            assert after.calls > before.calls and after.rounds <= after.calls
        else:
            assert after.calls == before.calls
            assert after.dataplane_requests > before.dataplane_requests
        assert (after.ranks, after.experts_per_rank) == (2, 4)
    finally:
        client.close()


def bad_requests() -> list[tuple[str, experts_pb2.ExpertsRequest]]:
    x, ids, w = torch.randn(3, 128), torch.tensor([[0, 7]] * 3, dtype=torch.int32), torch.rand(3, 2)

    def req(layer=1, x=x, ids=ids, w=w) -> experts_pb2.ExpertsRequest:
        return experts_pb2.ExpertsRequest(
            layer=layer, hidden=tensor_to_proto(x), expert_ids=tensor_to_proto(ids),
            weights=tensor_to_proto(w),
        )  # fmt: skip

    return [
        ("not an MoE layer", req(layer=0)),
        ("not an MoE layer", req(layer=4)),
        ("not an MoE layer", req(layer=-1)),
        ("8 is outside", req(ids=torch.tensor([[0, 1], [2, 8], [3, 4]], dtype=torch.int32))),
        ("-1 is outside", req(ids=torch.tensor([[0, 1], [-1, 2], [3, 4]], dtype=torch.int32))),
        ("hidden: expected shape", req(x=torch.randn(3, 64))),
        ("bfloat16 or float32", req(x=torch.randn(3, 128).half())),
        ("bfloat16 or float32", req(x=torch.zeros(3, 128, dtype=torch.int32))),
        ("expert_ids: expected shape", req(ids=ids[:2])),
        ("expert_ids: expected shape", req(ids=torch.zeros(3, 3, dtype=torch.int32))),
        ("expert_ids: expected dtype int32", req(ids=ids.long())),
        ("weights: expected shape", req(w=torch.rand(3, 1))),
        ("weights: expected dtype float32", req(w=w.double().float().bfloat16())),
    ]


@pytest.mark.parametrize(("message", "request_"), bad_requests())
def test_bad_input_is_invalid_argument(server, message: str, request_) -> None:
    with grpc.insecure_channel(server[0]) as channel, pytest.raises(grpc.RpcError) as err:
        experts_pb2_grpc.ExpertsStub(channel).Compute(request_, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


@pytest.mark.parametrize("transport", ["dataplane", "grpc"])
def test_bf16_rows_on_the_wire(server, model: K2Model, transport: str) -> None:
    client = ExpertsClient(server[0], transport=transport)
    try:
        moe = model.moe_layers()[2]
        x = torch.randn(4, 128)
        ids, w = moe.router(x)
        got = client.compute(2, x.bfloat16(), ids, w)
        want = moe.experts(x.bfloat16().float(), ids, w)
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
    finally:
        client.close()


@pytest.mark.parametrize(("transport", "what"), [("dataplane", "endpoints"), ("grpc", "layer 1")])
def test_unreachable_pool_fails_fast_as_unavailable(transport: str, what: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        client = ExpertsClient(f"127.0.0.1:{port}", timeout_s=30, transport=transport)
        with pytest.raises(Unavailable, match=rf"unavailable \({what}\)"):
            client.compute(
                1, torch.randn(2, 128), torch.zeros(2, 2, dtype=torch.long), torch.rand(2, 2)
            )
        client.close()


def test_stats_count_calls_and_rows(server) -> None:
    with grpc.insecure_channel(server[0]) as channel:
        stub = experts_pb2_grpc.ExpertsStub(channel)
        before = stub.Stats(common_pb2.StatsRequest(), timeout=5)
        x, ids = torch.randn(5, 128), torch.zeros(5, 2, dtype=torch.int32)
        req = experts_pb2.ExpertsRequest(
            layer=3, hidden=tensor_to_proto(x), expert_ids=tensor_to_proto(ids),
            weights=tensor_to_proto(torch.rand(5, 2)),
        )  # fmt: skip
        reply = stub.Compute(req, timeout=10)
        after = stub.Stats(common_pb2.StatsRequest(), timeout=5)
    assert list(reply.out.shape) == [5, 128] and reply.out.dtype == "float32"
    assert (after.calls - before.calls, after.rows - before.rows) == (1, 5)
    assert after.rounds - before.rounds == 1


def test_micro_batches_over_the_data_plane_equal_local(server, model: K2Model, monkeypatch) -> None:
    """18 sequences: decode steps run as two interleaved halves, both halves' rows in flight on
    one client at once (replies matched by step), to the tokens of the in-process model."""
    prompts = [[21 + k, 400 + 5 * k, 9, 3000 - k] for k in range(18)]
    want = generate_ids(model, prompts, 5)
    remote_model = load_model(EMBEDDED_CHECKPOINT, torch.float32)
    client = attach_remote_experts(remote_model, server[0], transport="dataplane")
    split = []
    real = type(remote_model).forward_interleaved
    monkeypatch.setattr(
        type(remote_model),
        "forward_interleaved",
        lambda self, *a, **kw: split.append(1) or real(self, *a, **kw),
    )
    try:
        assert generate_ids(remote_model, prompts, 5) == want
        assert split
    finally:
        client.close()
