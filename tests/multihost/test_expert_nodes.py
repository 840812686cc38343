"""An expert pool spanning two hosts: one DeepSpeed job, a supervisor per node.

Hosts: experts-a (node 0: rank 0, the gRPC port, the rendezvous), experts-b (node 1: rank 1),
prefill-a (prefill-0), decode-a (decode-0). Served tokens equal the in-process reference with the
routed experts split across the hosts. SIGKILL of the rank on experts-b mid-generation: the
request ends within its deadline with a clean error after a correct prefix, every KV block is
freed, both nodes restart into a new generation of the job (new ranks on both hosts, the same
supervisors), and the same request is then served with exactly the reference tokens.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import grpc
import pytest

from services.pb.k2.v1 import decode_pb2_grpc
from tests.e2e.client import generate
from tests.e2e.test_faults import decode_idle, long_prompt, outcome, prefill_idle, request
from tests.multihost.cluster import Cluster, build_network
from tests.multihost.reference import Reference
from tests.multihost.test_expert_rank import DEADLINE_S, FAILED_STEP, RESTART_S

SPEC = {
    "checkpoint": "embedded",
    "model": {"threads": 1},
    "tokenizer": [{"name": "tokenizer-0", "host": "decode-a", "port": 50051}],  # not started
    "prefill": [{"name": "prefill-0", "host": "prefill-a", "port": 50061, "kv_blocks": 256}],
    "decode": [{"name": "decode-0", "host": "decode-a", "port": 50071, "kv_blocks": 256}],
    "experts": "remote",
    "expert_pool": [
        {
            "name": "experts-0",
            "port": 50081,
            "master_port": 29500,
            "nodes": [{"host": "experts-a", "ranks": 1}, {"host": "experts-b", "ranks": 1}],
        }
    ],
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    net = build_network(["experts-a", "experts-b", "prefill-a", "decode-a"])
    try:
        c = Cluster.write(net, tmp_path_factory.mktemp("expert-nodes"), SPEC)
        c.start(["experts-0", "prefill-0", "decode-0"])
        yield c
    finally:
        net.close()


def test_served_tokens_with_the_experts_split_across_hosts(cluster: Cluster) -> None:
    ref = Reference.embedded()
    prompt = long_prompt(2, 12)
    served = asyncio.run(generate(cluster.target("decode-0"), prompt, 24, timeout=DEADLINE_S))[0]
    assert served == ref.ids(prompt, 24)
    assert len(cluster.children("experts-0")) == len(cluster.children("experts-0-node1")) == 1


def test_a_killed_rank_on_the_second_host_restarts_the_job_on_both(cluster: Cluster) -> None:
    ref = Reference.embedded()
    decode, prefill = cluster.target("decode-0"), cluster.target("prefill-0")
    prompt = long_prompt(5, 24)
    expected = ref.ids(prompt, 200)
    before = cluster.children("experts-0") + cluster.children("experts-0-node1")

    async def killed_mid_stream() -> tuple[list[int], grpc.StatusCode, float]:
        async with grpc.aio.insecure_channel(decode) as channel:
            start = time.monotonic()
            call = decode_pb2_grpc.DecodeStub(channel).Generate(
                request(prompt, 200), timeout=DEADLINE_S
            )
            first = await anext(aiter(call))
            os.kill(cluster.children("experts-0-node1")[0], 9)
            rest, code = await outcome(call)
            return [t.token_id for t in first.tokens] + rest, code, time.monotonic() - start

    tokens, code, took = asyncio.run(killed_mid_stream())
    assert code in FAILED_STEP and took < DEADLINE_S
    assert 0 < len(tokens) < len(expected) and tokens == expected[: len(tokens)]
    asyncio.run(decode_idle(decode))
    asyncio.run(prefill_idle(prefill))

    deadline = time.monotonic() + RESTART_S
    while True:  # UNAVAILABLE while the job restarts, then served
        try:
            served = asyncio.run(generate(decode, prompt, 40, timeout=DEADLINE_S))[0]
            break
        except grpc.aio.AioRpcError as e:
            assert e.code() in FAILED_STEP, e
            assert time.monotonic() < deadline, "the expert job did not come back"
            time.sleep(0.5)
    assert served == expected[:40]
    for name in ("experts-0", "experts-0-node1"):  # the same supervisors, new ranks on both
        assert cluster.procs[name].poll() is None
        assert cluster.children(name) and set(cluster.children(name)).isdisjoint(before)
