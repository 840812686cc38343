"""Faults across hosts: every service in its own network namespace, the gateway in front.

Hosts: front (tokenizer-0, gateway-0), prefill-a/-b (prefill-0/-1, 16-token chunks so a long
prompt's transfer lasts seconds), decode-a/-b (decode-0/-1). One deployment for the module; each
test first restarts what an earlier one killed and heals the network.

Every scenario checks the text (each token's bytes against the in-process greedy reference),
that every request ends well before its deadline with either that text or a clean error, and
that every KV block is free afterwards. A bounded load run through the gateway comes first,
while the deployment is fresh, and checks that no service grows once idle again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from bench.load import StreamResult, chat_body, measured_load, stream_chat
from tests.e2e.client import decode_stats, generate, prefill_stats
from tests.e2e.test_faults import (
    decode_idle,
    long_prompt,
    mid_prefill,
    outcome,
    poll,
    prefill_idle,
)
from tests.multihost.cluster import Cluster, build_network
from tests.multihost.reference import Reference
from tests.timing import seconds

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-k2serve-dev-key"  # deploy/gateway.yaml's dev key
MODEL = "kimi-k2-thinking"
HOSTS = ["front", "prefill-a", "prefill-b", "decode-a", "decode-b"]
SLOW_PREFILL = {"kv_blocks": 512, "chunk_tokens": 16, "max_batch_tokens": 16}
SPEC = {
    "checkpoint": "embedded",
    "model": {"threads": 1},
    "tokenizer": [{"name": "tokenizer-0", "host": "front", "port": 50051}],
    "prefill": [
        {"name": "prefill-0", "host": "prefill-a", "port": 50061, **SLOW_PREFILL},
        {"name": "prefill-1", "host": "prefill-b", "port": 50061, **SLOW_PREFILL},
    ],
    "decode": [
        {"name": "decode-0", "host": "decode-a", "port": 50071, "kv_blocks": 512},
        {"name": "decode-1", "host": "decode-b", "port": 50071, "kv_blocks": 512},
    ],
    "gateway": [
        {
            "name": "gateway-0",
            "host": "front",
            "port": 8000,
            "config": "gateway.yaml",  # deploy/gateway.yaml with a timeout inside DEADLINE_S
        }
    ],
}
NAMES = ["tokenizer-0", "prefill-0", "prefill-1", "decode-0", "decode-1", "gateway-0"]
DEADLINE_S = seconds(60.0)  # every client call's own deadline
# The gateway's own bound: a stream stalled by retransmissions (30% loss) ends with a clean
# timeout error well before the client would give up on it.
REQUEST_TIMEOUT_S = seconds(30.0)
LONG = 400  # tokens: a stream still running when a fault hits it (160 ran out under load)
# Decode marks a prefill it cannot reach unhealthy within a Stats poll (1 s timeout) and then
# tries it last; sooner, a call to it waits for keepalive (~15 s) before going elsewhere.
POLL_S = 1.5
REJOIN_S = seconds(
    10.0
)  # a restarted instance is back in rotation once its callers' channels redial
PROMPTS = ["Hello there, who are you?", "Tell me about the sea.", "Count to ten.", "Why?"]


@pytest.fixture(scope="module")
def ref() -> Reference:
    return Reference.embedded()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    net = build_network(HOSTS)
    try:
        folder = tmp_path_factory.mktemp("hosts")
        gateway = yaml.safe_load((ROOT / "deploy" / "gateway.yaml").read_text())
        gateway["limits"]["request_timeout_s"] = int(REQUEST_TIMEOUT_S)
        (folder / "gateway.yaml").write_text(yaml.safe_dump(gateway))
        c = Cluster.write(net, folder, SPEC)
        c.start(NAMES)
        yield c
    finally:
        net.close()


@pytest.fixture(autouse=True)
def whole(cluster: Cluster) -> Cluster:
    """Every instance running and the network healed, before each test."""
    cluster.net.heal()
    for name in NAMES:
        if cluster.procs[name].poll() is not None:
            cluster.restart(name)
    return cluster


def chat(cluster: Cluster, bodies: list[dict]) -> list[StreamResult]:
    async def run() -> list[StreamResult]:
        async with httpx.AsyncClient(timeout=DEADLINE_S, trust_env=False) as client:
            url = cluster.url("gateway-0")
            return await asyncio.gather(*(stream_chat(client, url, KEY, b) for b in bodies))

    return asyncio.run(run())


def assert_right_or_clean(result: StreamResult, expected: list[bytes]) -> bool:
    """A finished stream has the reference's tokens; a failed one a clean error. True if right."""
    assert result.elapsed_s < DEADLINE_S
    if result.error_kind is None:
        assert result.pieces[0] == expected  # (the reference ends before a stop id too)
        return True
    assert result.error is not None, result  # an error body, not a dropped connection
    assert result.error["type"] == "server_error"
    assert result.status in (200, 502, 503, 504)
    return False


def all_idle(cluster: Cluster, names: list[str]) -> None:
    async def run() -> None:
        for name in names:
            idle = decode_idle if name.startswith("decode") else prefill_idle
            await idle(cluster.target(name))

    asyncio.run(run())


def fault_mid_transfer(
    cluster: Cluster, prompt: list[int], fault: Callable[[str], None]
) -> tuple[list[int], grpc.StatusCode, str, float]:
    """Generate 8 tokens of `prompt` on decode-0 and apply `fault` to the prefill instance that
    is part-way through sending its KV. (tokens, status, that prefill, seconds taken)"""
    prefills = {cluster.target(n): n for n in ("prefill-0", "prefill-1")}

    async def run() -> tuple[list[int], grpc.StatusCode, str, float]:
        start = time.monotonic()
        decode = cluster.target("decode-0")
        async with mid_prefill(decode, list(prefills), prompt, 8, DEADLINE_S) as (call, victim):
            fault(prefills[victim])
            tokens, code = await outcome(call)
        return tokens, code, prefills[victim], time.monotonic() - start

    return asyncio.run(run())


async def started(cluster: Cluster) -> int:
    """Requests the decode instances have begun decoding (running or served)."""
    stats = [await decode_stats(cluster.target(n)) for n in ("decode-0", "decode-1")]
    return sum(s.running + s.requests_served for s in stats)


def test_bounded_load_serves_everything_and_memory_settles(cluster: Cluster) -> None:
    pids = cluster.pids()
    report = asyncio.run(measured_load(cluster.url("gateway-0"), KEY, pids, 4, 5.0, 16, MODEL))
    assert report.errors == {} and report.served >= 4
    assert 0 < report.tokens <= 16 * report.served
    assert 0 < report.ttft_p50_ms <= report.ttft_p99_ms
    assert 0 < report.itl_p50_ms <= report.itl_p99_ms
    assert set(report.rss_after_mib) == set(pids)
    for name, before in report.rss_before_mib.items():
        assert report.rss_after_mib[name] - before < 32, (name, report)  # MiB
    all_idle(cluster, ["decode-0", "decode-1", "prefill-0", "prefill-1"])


def test_killed_decode_fails_its_streams_cleanly_then_rejoins(
    cluster: Cluster, ref: Reference
) -> None:
    expected = dict(zip(PROMPTS, ref.chat_pieces(PROMPTS, LONG), strict=True))

    async def run() -> tuple[list[StreamResult], int]:
        async with httpx.AsyncClient(timeout=DEADLINE_S, trust_env=False) as client:
            url = cluster.url("gateway-0")
            streams, base = [], await started(cluster)
            for i, p in enumerate(PROMPTS):  # one at a time: the gateway sees the last one's load
                body = chat_body(p, LONG, MODEL)
                streams.append(asyncio.create_task(stream_chat(client, url, KEY, body)))
                await poll(lambda: started(cluster), lambda n, i=i: n == base + i + 1, "decoding")
            on_victim = (await decode_stats(cluster.target("decode-0"))).running
            cluster.kill("decode-0")
            return list(await asyncio.gather(*streams)), on_victim

    results, on_victim = asyncio.run(run())
    right = [assert_right_or_clean(r, expected[p]) for r, p in zip(results, PROMPTS, strict=True)]
    assert on_victim >= 1 and right.count(False) == on_victim
    all_idle(cluster, ["decode-1", "prefill-0", "prefill-1"])

    served = asyncio.run(decode_stats(cluster.target("decode-1"))).requests_served
    after = chat(cluster, [chat_body(p, 12, MODEL) for p in PROMPTS[:2]])
    for result, pieces in zip(after, ref.chat_pieces(PROMPTS[:2], 12), strict=True):
        assert result.error_kind is None and result.pieces[0] == pieces
    assert asyncio.run(decode_stats(cluster.target("decode-1"))).requests_served == served + 2

    cluster.restart("decode-0")  # and the gateway sends it work again
    (short,) = ref.chat_pieces(PROMPTS[:1], 12)
    rejoin_by = time.monotonic() + REJOIN_S
    while asyncio.run(decode_stats(cluster.target("decode-0"))).requests_served == 0:
        assert time.monotonic() < rejoin_by, "the gateway never sent decode-0 a request"
        (both,) = chat(cluster, [chat_body(PROMPTS[0], 12, MODEL, n=2)])  # a choice per instance
        assert both.error_kind is None
        assert both.pieces[0] == both.pieces[1] == short


def test_sigterm_drains_the_in_flight_streams_before_exit(cluster: Cluster, ref: Reference) -> None:
    (expected,) = ref.chat_pieces(PROMPTS[1:2], LONG)

    async def run() -> StreamResult:
        async with httpx.AsyncClient(timeout=DEADLINE_S, trust_env=False) as client:
            body = chat_body(PROMPTS[1], LONG, MODEL, n=2)  # choice 1 runs on decode-1
            stream = asyncio.create_task(stream_chat(client, cluster.url("gateway-0"), KEY, body))
            target = cluster.target("decode-1")
            await poll(lambda: decode_stats(target), lambda s: s.running == 1, "decoding")
            cluster.kill("decode-1", signal.SIGTERM)
            return await stream

    result = asyncio.run(run())
    assert result.error_kind is None
    assert result.pieces[0] == result.pieces[1] == expected
    assert cluster.procs["decode-1"].wait(timeout=30) == 0

    (after,) = chat(cluster, [chat_body(PROMPTS[2], 8, MODEL)])
    assert after.error_kind is None and [after.pieces[0]] == ref.chat_pieces(PROMPTS[2:3], 8)
    all_idle(cluster, ["decode-0", "prefill-0", "prefill-1"])


def test_prefill_killed_mid_transfer_is_retried_on_the_other_host(
    cluster: Cluster, ref: Reference
) -> None:
    prompt = long_prompt(1, 800)
    decode = cluster.target("decode-0")
    tokens, code, victim, took = fault_mid_transfer(cluster, prompt, cluster.kill)
    assert code == grpc.StatusCode.OK and took < DEADLINE_S
    assert tokens == ref.ids(prompt, 8)
    survivor = ({"prefill-0", "prefill-1"} - {victim}).pop()
    all_idle(cluster, ["decode-0", survivor])

    cluster.restart(victim)  # rejoins: the only prefill left to decode-0 when the other is cut
    cluster.net.partition(cluster.instance(survivor).host, "decode-a")
    time.sleep(POLL_S)  # not needed for the outcome; spares a keepalive timeout on the cut peer
    short = long_prompt(2, 40)
    served = asyncio.run(prefill_stats(cluster.target(victim))).prompts_served
    assert asyncio.run(generate(decode, short, 6, timeout=DEADLINE_S))[0] == ref.ids(short, 6)
    assert asyncio.run(prefill_stats(cluster.target(victim))).prompts_served == served + 1
    all_idle(cluster, ["decode-0", "prefill-0", "prefill-1"])


def test_partition_mid_transfer_then_heal(cluster: Cluster, ref: Reference) -> None:
    """The prefills' links are capped (~1 MB of KV then takes seconds), so the partition lands
    mid-transfer however fast or loaded the machine: the fault is certain, not a race (once, the
    transfer had finished in 0.39 s before the partition and no packet was dropped)."""
    prompt = long_prompt(3, 800)
    decode = cluster.target("decode-0")
    for prefill in ("prefill-0", "prefill-1"):
        cluster.net.throttle(cluster.instance(prefill).host, "decode-a", "2mbit")

    def cut_off(prefill: str) -> None:
        cluster.net.partition(cluster.instance(prefill).host, "decode-a")

    tokens, code, cut, took = fault_mid_transfer(cluster, prompt, cut_off)
    assert took < DEADLINE_S and cluster.net.dropped(cluster.instance(cut).host) > 0
    if code == grpc.StatusCode.OK:  # retried on the other prefill
        assert tokens == ref.ids(prompt, 8)
    else:
        assert code == grpc.StatusCode.UNAVAILABLE and tokens == []
    # The cut-off prefill notices its caller is gone (keepalive) and frees the prompt's blocks.
    all_idle(cluster, ["decode-0", "prefill-0", "prefill-1"])

    cluster.net.heal()
    other = ({"prefill-0", "prefill-1"} - {cut}).pop()
    cluster.net.partition(cluster.instance(other).host, "decode-a")
    time.sleep(POLL_S)
    served = asyncio.run(prefill_stats(cluster.target(cut))).prompts_served
    short = long_prompt(4, 40)
    assert asyncio.run(generate(decode, short, 6, timeout=DEADLINE_S))[0] == ref.ids(short, 6)
    assert asyncio.run(prefill_stats(cluster.target(cut))).prompts_served == served + 1
    all_idle(cluster, ["decode-0", "prefill-0", "prefill-1"])


def test_packet_loss_between_gateway_and_decode(cluster: Cluster, ref: Reference) -> None:
    for decode_host in ("decode-a", "decode-b"):
        cluster.net.lose("front", decode_host, 0.3)
    results = chat(cluster, [chat_body(p, 24, MODEL) for p in PROMPTS])
    expected = ref.chat_pieces(PROMPTS, 24)
    right = [assert_right_or_clean(r, e) for r, e in zip(results, expected, strict=True)]
    assert any(right)  # TCP retransmits what was lost: most streams get through
    assert cluster.net.dropped("front") > 0  # and packets were lost
    cluster.net.heal()
    all_idle(cluster, ["decode-0", "decode-1", "prefill-0", "prefill-1"])
