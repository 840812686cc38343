"""The expert pool as real processes: a DeepSpeed job (gloo) behind its supervisor, with prefill
and decode calling it (`experts: remote`, rows over the data plane straight to the ranks).

Remote MoE equals the in-process MoE (1 and 2 ranks, over the data plane and over gRPC through
rank 0); a served generation equals generate();
bad input is INVALID_ARGUMENT; a killed rank makes calls fail with UNAVAILABLE until the supervisor
has restarted the job, which then serves again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2model import EMBEDDED_CHECKPOINT, K2Model, generate_ids, load_model
from services.common.errors import Unavailable
from services.common.tensor_codec import tensor_to_proto
from services.experts.client import ExpertsClient
from services.launcher import Suite
from services.pb.k2.v1 import experts_pb2, experts_pb2_grpc
from tests.e2e.client import generate
from tests.e2e.suite_fixtures import free_port

PROMPTS = [[5, 17, 300, 42, 7], list(range(200, 237)), [3000, 12, 12, 12]]


def write(path: Path, ranks: int, nodes: int = 1) -> Path:
    """A deployment whose pool has `ranks` ranks on each of `nodes` hosts (here all loopback)."""
    pool = {"name": "experts-0", "port": free_port(), "master_port": free_port()}
    hosts = {"local": "127.0.0.1"} | {f"node{k}": "127.0.0.1" for k in range(1, nodes)}
    if nodes == 1:
        pool["ranks"] = ranks
    else:
        pool["nodes"] = [{"host": h, "ranks": ranks} for h in hosts]
    spec = {
        "checkpoint": "embedded",
        "hosts": hosts,
        "tokenizer": [{"port": free_port()}],
        "prefill": [{"port": free_port(), "kv_blocks": 64}],
        "decode": [{"port": free_port(), "kv_blocks": 64}],
        "experts": "remote",
        "expert_pool": [pool],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT, torch.float32)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Iterator[tuple[Suite, Suite, Suite]]:
    """experts-0 of 2 ranks + prefill-0 + decode-0, a lone pool of 1 rank, and a pool of 1 rank
    on each of two "nodes" (two supervisors): started together, so that their start-ups
    overlap."""
    tmp = tmp_path_factory.mktemp("dep")
    two, one = Suite(write(tmp / "two.yaml", ranks=2)), Suite(write(tmp / "one.yaml", ranks=1))
    nodes = Suite(write(tmp / "nodes.yaml", ranks=1, nodes=2))
    try:
        with ThreadPoolExecutor(3) as pool:
            started = [
                pool.submit(two.start, names=["experts-0", "prefill-0", "decode-0"]),
                pool.submit(one.start, names=["experts-0"]),
                pool.submit(nodes.start, names=["experts-0"]),
            ]
            for future in started:
                future.result()
        yield two, one, nodes
    finally:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(Suite.stop, (two, one, nodes)))


@pytest.fixture(scope="module")
def suite(jobs: tuple[Suite, Suite, Suite]) -> Suite:
    return jobs[0]


@pytest.fixture(scope="module")
def single(jobs: tuple[Suite, Suite, Suite]) -> Suite:
    return jobs[1]


def pool_target(suite: Suite) -> str:
    return suite.deployment.instance("experts-0").target


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# a transport as the tests name it -> (ExpertsClient transport, shared memory)
TRANSPORTS = {"shm": ("dataplane", True), "tcp": ("dataplane", False), "grpc": ("grpc", False)}


def check_equal_to_in_process(
    target: str, model: K2Model, seed: int, transport: str = "shm"
) -> None:
    """Router-chosen and uniformly random routings, 1..64 rows, from 6 concurrent callers,
    over the data plane (straight to the ranks, through shared memory on this host or over TCP)
    or gRPC (one call through rank 0's rounds)."""
    gen = torch.Generator().manual_seed(seed)
    moes = model.moe_layers()
    cases = []
    for k, rows in enumerate([1, 3, 64, 17, 8, 33, 2, 40]):
        layer = list(moes)[k % len(moes)]
        x = torch.randn(rows, model.cfg.hidden_size, generator=gen)
        if k % 2:
            ids, w = moes[layer].router(x)
        else:
            ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(rows)])
            w = torch.rand(rows, 2, generator=gen)
        cases.append((layer, x, ids, w))
    kind, shared = TRANSPORTS[transport]
    client = ExpertsClient(target, transport=kind, shared_memory=shared)
    try:
        before = client.stats()
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda c: client.compute(*c), cases))
        stats = client.stats()
    finally:
        client.close()
    for (layer, x, ids, w), out in zip(cases, got, strict=True):
        assert rel_err(out, moes[layer].experts(x, ids, w)) < 1e-5
    calls = stats.calls - before.calls
    if transport == "grpc":
        assert calls == len(cases) and 1 <= stats.rounds - before.rounds <= calls
    else:  # no call went through rank 0's rounds; its own experts got rows directly
        assert calls == 0 and stats.dataplane_requests > before.dataplane_requests
        through_shm = stats.dataplane_shared_requests - before.dataplane_shared_requests
        assert (through_shm > 0) == shared


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_one_rank_equals_in_process_moe(single: Suite, model: K2Model, transport: str) -> None:
    check_equal_to_in_process(pool_target(single), model, seed=1, transport=transport)


def test_a_pool_on_two_nodes_equals_in_process_moe(jobs, model: K2Model) -> None:
    """`k2serve up` of a pool spanning nodes: a supervisor per node, one job of both ranks."""
    nodes = jobs[2]
    assert set(nodes.procs) == {"experts-0", "experts-0-node1"}
    assert all(len(rank_pids(p.pid)) == 1 for p in nodes.procs.values())
    check_equal_to_in_process(pool_target(nodes), model, seed=3)
    client = ExpertsClient(pool_target(nodes))
    stats = client.stats()
    client.close()
    assert (stats.ranks, stats.experts_per_rank) == (2, 4)


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_two_ranks_equal_in_process_moe(suite: Suite, model: K2Model, transport: str) -> None:
    check_equal_to_in_process(pool_target(suite), model, seed=2, transport=transport)
    client = ExpertsClient(pool_target(suite))
    stats = client.stats()
    client.close()
    assert (stats.ranks, stats.experts_per_rank) == (2, 4)


def served(suite: Suite, prompts: list[list[int]], n: int) -> list[list[int]]:
    target = suite.deployment.of_kind("decode")[0].target

    async def run() -> list[tuple[list[int], str]]:
        return await asyncio.gather(*(generate(target, p, n) for p in prompts))

    return [tokens for tokens, _ in asyncio.run(run())]


def test_served_generation_with_remote_experts_equals_generate(suite: Suite, model) -> None:
    client = ExpertsClient(pool_target(suite))
    before = client.stats()
    assert served(suite, PROMPTS, 8) == generate_ids(model, PROMPTS, 8)
    # prefill and decode really went to the ranks (3 MoE layers per model step), straight
    after = client.stats()
    assert after.calls == before.calls
    assert after.dataplane_requests - before.dataplane_requests >= 8
    # the suite's processes share this host: the rows went through shared memory
    assert after.dataplane_shared_requests - before.dataplane_shared_requests >= 8
    client.close()


@pytest.mark.parametrize(
    ("layer", "width", "dtype", "expert", "message"),
    [
        (0, 128, torch.float32, 1, "not an MoE layer"),
        (9, 128, torch.float32, 1, "not an MoE layer"),
        (1, 128, torch.float32, 8, "outside [0, 8)"),
        (1, 96, torch.float32, 1, "expected shape"),
        (1, 128, torch.float16, 1, "bfloat16 or float32"),
    ],
)
def test_bad_input_is_invalid_argument(suite: Suite, layer, width, dtype, expert, message) -> None:
    request = experts_pb2.ExpertsRequest(
        layer=layer,
        hidden=tensor_to_proto(torch.randn(2, width).to(dtype)),
        expert_ids=tensor_to_proto(torch.tensor([[0, expert], [2, 3]], dtype=torch.int32)),
        weights=tensor_to_proto(torch.rand(2, 2)),
    )
    with grpc.insecure_channel(pool_target(suite)) as channel, pytest.raises(grpc.RpcError) as err:
        experts_pb2_grpc.ExpertsStub(channel).Compute(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def rank_pids(supervisor_pid: int) -> list[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text()
    return sorted(int(p) for p in children.split())


def restarted(supervisor_pid: int, before: list[int]) -> bool:
    now = rank_pids(supervisor_pid)
    return len(now) == len(before) and set(now).isdisjoint(before)


def health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_killed_rank_fails_calls_then_the_job_restarts(suite: Suite, model: K2Model) -> None:
    target, supervisor = pool_target(suite), suite.procs["experts-0"]
    before = rank_pids(supervisor.pid)
    assert len(before) == 2
    os.kill(before[1], signal.SIGKILL)
    client = ExpertsClient(target, timeout_s=30)
    x, ids, w = torch.randn(4, 128), torch.tensor([[0, 7]] * 4), torch.rand(4, 2)
    give_up = time.monotonic() + 30
    while True:  # until rank 0 has seen rank 1 go; any failure but UNAVAILABLE fails the test
        try:
            client.compute(1, x, ids, w)
        except Unavailable:
            break
        assert time.monotonic() < give_up, "calls kept succeeding without rank 1"
    # A served request meanwhile ends: with an error (the engines fail a step whose expert call
    # failed), or with the right tokens if decode retried it until the pool was back; never a hang.
    try:
        tokens = served(suite, PROMPTS[:1], 4)
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, exc.details()
    else:
        assert tokens == generate_ids(model, PROMPTS[:1], 4)

    # The caller's data plane saw rank 1 go; rank 0 sees it at its next heartbeat (1 s), and
    # the supervisor restarts the whole job: wait for new ranks, serving.
    deadline = time.monotonic() + 120
    while not (restarted(supervisor.pid, before) and health(target) == "SERVING"):
        assert time.monotonic() < deadline, "the expert job did not come back"
        time.sleep(0.2)
    assert supervisor.poll() is None
    after = rank_pids(supervisor.pid)
    assert len(after) == 2 and set(after).isdisjoint(before)
    check_equal_to_in_process(target, model, seed=3)
    assert served_again(suite, PROMPTS, 6) == generate_ids(model, PROMPTS, 6)
    client.close()


def served_again(suite: Suite, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Prefill's and decode's channels to the pool fail fast until their next reconnect attempt
    (backoff capped at 1 s), so requests may fail for a moment after the pool is back."""
    give_up = time.monotonic() + 30
    while True:
        try:
            return served(suite, prompts, n)
        except grpc.RpcError:
            assert time.monotonic() < give_up, "prefill/decode never reached the restarted pool"
            time.sleep(0.2)
