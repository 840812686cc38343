"""A killed expert rank, with the expert pool on its own host (`experts: remote`).

Hosts: experts (experts-0: a 2-rank DeepSpeed job under its supervisor), prefill-a (prefill-0),
decode-a (decode-0). SIGKILL of rank 1 mid-generation: the request ends within its deadline with
a clean error after a correct prefix of the reference tokens, every KV block is freed, the
supervisor restarts the whole job, and the same request is then served with exactly the
reference tokens (routed experts in-process give the same greedy tokens).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from services.pb.k2.v1 import decode_pb2_grpc
from tests.e2e.client import generate
from tests.e2e.test_faults import decode_idle, long_prompt, outcome, prefill_idle, request
from tests.multihost.cluster import Cluster, build_network
from tests.multihost.reference import Reference
from tests.timing import seconds

SPEC = {
    "checkpoint": "embedded",
    "model": {"threads": 1},
    "tokenizer": [{"name": "tokenizer-0", "host": "decode-a", "port": 50051}],  # not started
    "prefill": [{"name": "prefill-0", "host": "prefill-a", "port": 50061, "kv_blocks": 256}],
    "decode": [{"name": "decode-0", "host": "decode-a", "port": 50071, "kv_blocks": 256}],
    "experts": "remote",
    "expert_pool": [
        {"name": "experts-0", "host": "experts", "port": 50081, "ranks": 2, "master_port": 29500}
    ],
}
DEADLINE_S = seconds(60.0)
# A failed expert call fails the prefill handoff (UNAVAILABLE) or the decode step it was in, which
# the decode engine reports as INTERNAL with no details (services/decode/engine.py).
FAILED_STEP = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
RESTART_S = seconds(
    90.0
)  # the supervisor's backoff plus two ranks loading on a busy 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    net = build_network(["experts", "prefill-a", "decode-a"])
    try:
        c = Cluster.write(net, tmp_path_factory.mktemp("experts"), SPEC)
        c.start(["experts-0", "prefill-0", "decode-0"])
        yield c
    finally:
        net.close()


def kill_a_rank_mid_stream_then_recover(cluster: Cluster, kill: Callable[[], None]) -> None:
    """`kill()` a rank while decode-0 streams a long generation: the request ends within its
    deadline with a clean error after a correct prefix of the reference tokens, every KV block
    is freed, and once the job is back (UNAVAILABLE until then) the same prompt is served with
    exactly the reference tokens."""
    ref = Reference.embedded()
    decode, prefill = cluster.target("decode-0"), cluster.target("prefill-0")
    prompt = long_prompt(5, 24)
    expected = ref.ids(prompt, 200)

    async def killed_mid_stream() -> tuple[list[int], grpc.StatusCode, float]:
        async with grpc.aio.insecure_channel(decode) as channel:
            start = time.monotonic()
            call = decode_pb2_grpc.DecodeStub(channel).Generate(
                request(prompt, 200), timeout=DEADLINE_S
            )
            first = await anext(aiter(call))
            kill()
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


def test_killed_rank_fails_calls_cleanly_and_the_job_comes_back(cluster: Cluster) -> None:
    ranks = cluster.children("experts-0")
    assert len(ranks) == 2
    kill_a_rank_mid_stream_then_recover(cluster, lambda: os.kill(ranks[1], 9))
    assert cluster.procs["experts-0"].poll() is None  # the same supervisor, a new job
    assert set(cluster.children("experts-0")).isdisjoint(ranks)
