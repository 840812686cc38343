"""Faults against real prefill and decode processes (docs/reliability.md sections 3 and 4).

Killed prefill mid-transfer (retried elsewhere with exact tokens, or failed fast), cancelled and
expired calls, more requests than the KV pool or the queue holds, a killed decode, and a SIGTERM
drain. After each fault every KV block is free (checked through the Stats RPCs) and the suite
serves again. Long prompts with 16-token prefill chunks make a transfer last seconds, so a fault
lands mid-transfer; progress is read from the prefill's Stats, never guessed from sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from k2model.model import K2Model
from services.launcher import Suite
from services.pb.k2.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2
from tests.e2e.client import decode_stats, generate, prefill_stats
from tests.e2e.suite_fixtures import free_port, start_suite
from tests.timing import seconds

T = TypeVar("T")
Stats = decode_pb2.DecodeStats | prefill_pb2.PrefillStats
SLOW_PREFILL = {"chunk_tokens": 16, "max_batch_tokens": 16}
SETTLE_S = seconds(
    15.0
)  # how long freeing may take; far less than the work a leaked request would do
START_S = seconds(120.0)  # loading the model in a restarted instance


def start_services(path: Path, prefills: list[dict], decodes: list[dict]) -> Suite:
    """Prefill and decode processes with per-instance settings (prefill-<i>, decode-<i>)."""
    spec = {
        "checkpoint": "embedded",
        "tokenizer": [{"name": "tokenizer-0", "port": free_port()}],  # listed, never started
        "prefill": [
            {"name": f"prefill-{i}", "port": free_port(), **p} for i, p in enumerate(prefills)
        ],
        "decode": [
            {"name": f"decode-{i}", "port": free_port(), **d} for i, d in enumerate(decodes)
        ],
    }
    path.write_text(yaml.safe_dump(spec))
    names = [f"prefill-{i}" for i in range(len(prefills))] + [
        f"decode-{i}" for i in range(len(decodes))
    ]
    return start_suite(path, names=names)


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT)


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """prefill-0 (slow chunks); decode-0 (room for 8k tokens); decode-1 (a 64-token pool, a
    queue of 8). A test that kills an instance leaves it to `need` to start it again."""
    s = start_services(
        tmp_path_factory.mktemp("one") / "d.yaml",
        [{"kv_blocks": 512, **SLOW_PREFILL}],
        [{"kv_blocks": 512}, {"kv_blocks": 8, "block_size": 8, "max_queue": 8}],
    )
    yield s
    s.stop()


def need(suite: Suite, *names: str) -> None:
    """Start again (and wait until serving) each named instance that a previous test killed."""
    for name in names:
        if suite.procs[name].poll() is not None:
            suite.start_instance(suite.deployment.instance(name))
            asyncio.run(serving(target(suite, name)))


async def serving(addr: str) -> None:
    async with grpc.aio.insecure_channel(addr) as channel:
        await poll(lambda: health(channel), lambda s: s == "SERVING", f"{addr} up", START_S)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    s = start_services(tmp_path_factory.mktemp("two") / "d.yaml", [SLOW_PREFILL] * 2, [{}])
    yield s
    s.stop()


def target(suite: Suite, name: str) -> str:
    return suite.deployment.instance(name).target


def long_prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3840) for _ in range(n)]


async def poll(
    fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str, limit_s: float = SETTLE_S
) -> T:
    deadline = time.monotonic() + limit_s
    while True:
        value = await fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {limit_s} s; last: {value}")
        await asyncio.sleep(0.02)


async def health(channel: grpc.aio.Channel) -> str:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def idle(stats: Stats) -> bool:
    free = stats.kv_blocks_free == stats.kv_blocks_total
    return free and stats.running == 0 and stats.queued == 0


async def decode_idle(addr: str) -> decode_pb2.DecodeStats:
    return await poll(lambda: decode_stats(addr), idle, f"decode {addr} freeing every block")


async def prefill_idle(addr: str) -> prefill_pb2.PrefillStats:
    return await poll(lambda: prefill_stats(addr), idle, f"prefill {addr} freeing every block")


async def kv_sent(addrs: list[str]) -> dict[str, int]:
    return {a: (await prefill_stats(a)).kv_bytes_sent for a in addrs}


async def transferring(before: dict[str, int]) -> str:
    """The prefill instance that has sent part of a prompt's KV since `before` (kv_sent) and is
    still running it."""

    async def busy() -> str | None:
        for a in before:
            stats = await prefill_stats(a)
            if stats.running and stats.kv_bytes_sent > before[a]:
                return a
        return None

    return await poll(busy, lambda a: a is not None, "a prefill starting to send KV")


def request(prompt: list[int], max_new: int) -> decode_pb2.GenerateRequest:
    greedy = common_pb2.SamplingParams(temperature=0.0)
    return decode_pb2.GenerateRequest(prompt_ids=prompt, max_new_tokens=max_new, sampling=greedy)


@contextlib.asynccontextmanager
async def mid_prefill(
    decode: str, prefills: list[str], prompt: list[int], max_new: int, timeout_s: float = 120
) -> AsyncIterator[tuple[grpc.aio.UnaryStreamCall, str]]:
    """A Generate call, yielded once one of `prefills` is part-way through sending its KV (with
    that instance's address)."""
    before = await kv_sent(prefills)
    async with grpc.aio.insecure_channel(decode) as channel:
        call = decode_pb2_grpc.DecodeStub(channel).Generate(
            request(prompt, max_new), timeout=timeout_s
        )
        yield call, await transferring(before)


async def outcome(call: grpc.aio.UnaryStreamCall) -> tuple[list[int], grpc.StatusCode]:
    """The tokens the call streamed, and how it ended."""
    tokens = []
    try:
        async for event in call:
            tokens += [t.token_id for t in event.tokens]
    except grpc.aio.AioRpcError as e:
        return tokens, e.code()
    return tokens, grpc.StatusCode.OK


def kill(suite: Suite, name: str, sig: int = signal.SIGKILL) -> None:
    suite.kill(name, sig)
    if sig == signal.SIGKILL:
        suite.procs[name].wait()


def test_prefill_killed_mid_transfer_is_retried_on_the_other_instance(
    two: Suite, model: K2Model
) -> None:
    prompt = long_prompt(1, 800)
    names = {target(two, n): n for n in ("prefill-0", "prefill-1")}
    decode = target(two, "decode-0")

    async def run() -> list[int]:
        async with mid_prefill(decode, list(names), prompt, 8) as (call, victim):
            kill(two, names[victim])
            tokens, code = await outcome(call)
        assert code == grpc.StatusCode.OK
        (survivor,) = set(names) - {victim}
        assert (await prefill_stats(survivor)).prompts_served == 1
        await decode_idle(decode)
        return tokens

    tokens = asyncio.run(run())
    assert tokens == generate_ids(model, [prompt], 8)[0]  # the text, not only the status
    short = long_prompt(2, 30)
    assert asyncio.run(generate(decode, short, 6))[0] == generate_ids(model, [short], 6)[0]


def test_prefill_killed_with_no_other_instance_fails_fast_then_recovers(
    one: Suite, model: K2Model
) -> None:
    need(one, "prefill-0", "decode-0")
    decode, prefill = target(one, "decode-0"), target(one, "prefill-0")

    async def run() -> tuple[grpc.StatusCode, float]:
        async with mid_prefill(decode, [prefill], long_prompt(3, 3000), 4) as (call, _):
            kill(one, "prefill-0")
            killed = time.monotonic()
            _, code = await outcome(call)
        failed_after = time.monotonic() - killed
        await decode_idle(decode)
        return code, failed_after

    code, failed_after = asyncio.run(run())
    assert code == grpc.StatusCode.UNAVAILABLE and failed_after < SETTLE_S  # not at the deadline
    need(one, "prefill-0")  # Suite.start_instance, then wait until it serves
    # Served at once: decode redials a peer at most a second apart (grpc's default backoff grows
    # to several seconds while the prefill restarts) and waits that long for the connection.
    short = long_prompt(4, 25)
    assert (
        asyncio.run(generate(decode, short, 5, timeout=30))[0] == generate_ids(model, [short], 5)[0]
    )


def test_cancelled_streams_free_every_block(one: Suite) -> None:
    need(one, "prefill-0", "decode-0")
    decode = target(one, "decode-0")

    async def run() -> None:
        served_before = (await decode_stats(decode)).requests_served
        async with grpc.aio.insecure_channel(decode) as channel:
            stub = decode_pb2_grpc.DecodeStub(channel)
            calls = [
                stub.Generate(request(long_prompt(i, 40), 4000), timeout=120) for i in range(4)
            ]
            for call in calls:
                got = 0
                async for event in call:
                    got += len(event.tokens)
                    if got >= 3:
                        break
                call.cancel()
        stats = await decode_idle(decode)
        assert stats.requests_served == served_before  # none ran on to its 4000 tokens

    asyncio.run(run())


def test_cancel_during_prefill_stops_prefill_and_frees_both_sides(one: Suite) -> None:
    need(one, "prefill-0", "decode-0")
    decode, prefill = target(one, "decode-0"), target(one, "prefill-0")

    async def run() -> None:
        served_before = (await prefill_stats(prefill)).prompts_served
        async with mid_prefill(decode, [prefill], long_prompt(5, 6000), 4) as (call, _):
            call.cancel()
        await decode_idle(decode)
        stats = await prefill_idle(prefill)  # the 6000-token prompt would take far longer
        assert stats.prompts_served == served_before

    asyncio.run(run())


@pytest.mark.parametrize(
    ("prompt_len", "deadline_s"), [(20, 1.5), (6000, 2.0)], ids=["decoding", "prefilling"]
)
def test_a_deadline_ends_the_call_and_frees_its_blocks(
    one: Suite, prompt_len: int, deadline_s: float
) -> None:
    need(one, "prefill-0", "decode-0")
    decode, prefill = target(one, "decode-0"), target(one, "prefill-0")

    async def run() -> tuple[list[int], grpc.StatusCode, float, int, int]:
        served = (await prefill_stats(prefill)).prompts_served
        before = await kv_sent([prefill])
        async with grpc.aio.insecure_channel(decode) as channel:
            start = time.monotonic()
            call = decode_pb2_grpc.DecodeStub(channel).Generate(
                request(long_prompt(6, prompt_len), 8000 - prompt_len), timeout=deadline_s
            )
            tokens, code = await outcome(call)
            elapsed = time.monotonic() - start
        sent = (await prefill_stats(prefill)).kv_bytes_sent - before[prefill]
        await decode_idle(decode)
        served = (await prefill_idle(prefill)).prompts_served - served
        return tokens, code, elapsed, sent, served

    tokens, code, elapsed, sent, served = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < SETTLE_S  # about its deadline, not at the end of 8000 tokens
    assert sent > 0  # the deadline hit a request that was under way ...
    if prompt_len > 20:
        assert tokens == [] and served == 0  # ... in prefill, which stopped short of the end
    else:
        assert tokens and served == 1  # ... decoding


def test_more_requests_than_the_kv_pool_holds_all_complete(one: Suite, model: K2Model) -> None:
    need(one, "prefill-0", "decode-1")
    decode = target(one, "decode-1")  # 8 blocks of 8: one 12 + 24 token sequence at a time
    prompts = [long_prompt(10 + i, 12) for i in range(8)]

    async def run() -> list[tuple[list[int], str]]:
        return await asyncio.gather(*(generate(decode, p, 24, timeout=120) for p in prompts))

    served = asyncio.run(run())
    assert [tokens for tokens, _ in served] == generate_ids(model, prompts, 24)
    assert {reason for _, reason in served} == {"length"}
    asyncio.run(decode_idle(decode))


def test_a_full_queue_sheds_the_excess_at_once_and_serves_the_rest(
    one: Suite, model: K2Model
) -> None:
    need(one, "prefill-0", "decode-1")
    decode = target(one, "decode-1")
    prompts = [long_prompt(30 + i, 12) for i in range(24)]

    async def one_call(prompt: list[int]) -> tuple[list[int] | grpc.StatusCode, float]:
        try:
            result = (await generate(decode, prompt, 40, timeout=120))[0]
        except grpc.aio.AioRpcError as e:
            result = e.code()
        return result, time.monotonic()

    async def run() -> list[tuple[list[int] | grpc.StatusCode, float]]:
        return await asyncio.gather(*(one_call(p) for p in prompts))

    outcomes = asyncio.run(run())
    shed = [t for r, t in outcomes if r == grpc.StatusCode.RESOURCE_EXHAUSTED]
    done = [(p, r, t) for p, (r, t) in zip(prompts, outcomes, strict=True) if isinstance(r, list)]
    assert len(shed) + len(done) == len(prompts)
    # at most 3 admitted (2 blocks each, a watermark of 1) + 8 queued when the burst arrives
    assert len(shed) >= len(prompts) - 11 and done
    assert max(shed) < min(t for _, _, t in done)  # refused at once, not after waiting
    expected = generate_ids(model, [p for p, _, _ in done], 40)
    assert [r for _, r, _ in done] == expected
    asyncio.run(decode_idle(decode))


def test_sigterm_drains_the_in_flight_stream_and_refuses_new_calls(
    one: Suite, model: K2Model
) -> None:
    need(one, "prefill-0", "decode-1")
    decode = target(one, "decode-1")
    prompt = long_prompt(8, 8)

    async def run() -> tuple[list[int], str, tuple[list[int], grpc.StatusCode]]:
        async with grpc.aio.insecure_channel(decode) as channel:
            call = decode_pb2_grpc.DecodeStub(channel).Generate(request(prompt, 48), timeout=60)
            tokens, reason = [], ""
            async for event in call:
                tokens += [t.token_id for t in event.tokens]
                reason = event.finish_reason
                if len(tokens) == 3:
                    kill(one, "decode-1", signal.SIGTERM)
                    await poll(lambda: health(channel), lambda s: s != "SERVING", "drain start")
                    new = decode_pb2_grpc.DecodeStub(channel).Generate(
                        request(prompt, 2), timeout=10
                    )
                    refused = await outcome(new)
        return tokens, reason, refused

    tokens, reason, (new_tokens, new_code) = asyncio.run(run())
    # Refused, not served. grpc-core answers UNAVAILABLE, or CANCELLED when the new stream races
    # the server's GOAWAY on this existing connection (seen about 1 run in 7): a library status,
    # not one our drain chooses (reported; the contract asks for UNAVAILABLE).
    assert new_tokens == [] and new_code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert (tokens, reason) == (generate_ids(model, [prompt], 48)[0], "length")
    assert one.procs["decode-1"].wait(timeout=30) == 0


def test_killed_decode_makes_prefill_stop_and_free_its_blocks(one: Suite) -> None:
    need(one, "prefill-0", "decode-0")
    decode, prefill = target(one, "decode-0"), target(one, "prefill-0")

    async def run() -> grpc.StatusCode:
        served_before = (await prefill_stats(prefill)).prompts_served
        async with mid_prefill(decode, [prefill], long_prompt(7, 6000), 4) as (call, _):
            kill(one, "decode-0")
            _, code = await outcome(call)
        stats = await prefill_idle(prefill)
        assert stats.prompts_served == served_before
        return code

    assert asyncio.run(run()) == grpc.StatusCode.UNAVAILABLE
