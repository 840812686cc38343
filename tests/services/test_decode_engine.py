"""services.decode.engine in one process over the embedded checkpoint, with in-process Prefillers
in place of the gRPC prefill pool: exact tokens under preemption, failed and cancelled handoffs,
aborts mid-decode and refusals at submit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, SamplingParams, generate_ids, load_model
from k2model.block_allocator import blocks_needed
from k2model.model import K2Model
from k2model.runner import ModelRunner, StepInput
from k2model.sampled import Sampled
from services.common.errors import (
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from services.decode.engine import DecodeEngine, DecodeLimits, Prefiller
from services.decode.scheduler import Seq
from tests.services.engine_idle import until_idle

GREEDY = SamplingParams(temperature=0.0)
WAIT_S = 30.0  # a guard against hangs, never reached when the engine works
Write = Callable[[int, int, torch.Tensor], None]


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT)


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3840) for _ in range(n)]


class LocalPrefill:
    """The prefill service's job without gRPC: one unchunked step, every layer written."""

    def __init__(self, model: K2Model) -> None:
        self.runner = ModelRunner(model, 64, 16)
        self.calls = 0

    async def __call__(self, seq: Seq, write: Write) -> Sampled:
        self.calls += 1
        latents: dict[int, torch.Tensor] = {}
        blocks = list(range(blocks_needed(len(seq.prompt), 16)))
        step = StepInput(seq.prompt, 0, blocks, seq.row())
        [first] = self.runner.step([step], "naive", lambda i, x: latents.setdefault(i, x))
        for layer, latent in latents.items():
            write(layer, 0, latent)
        return first


async def run_engine(engine: DecodeEngine, body: Callable[[DecodeEngine], Awaitable[None]]) -> None:
    task = asyncio.create_task(engine.run())
    try:
        await asyncio.wait_for(body(engine), WAIT_S)
    finally:
        task.cancel()


async def tokens_of(engine: DecodeEngine, seq: Seq) -> tuple[list[int], str | None]:
    out, reason = [], None
    async for batch in engine.events(seq):
        out += [t.token_id for t in batch.tokens]
        reason = batch.finish_reason
    return out, reason


def submit(
    engine: DecodeEngine,
    ids: list[int],
    max_new: int,
    params: SamplingParams = GREEDY,
    stop: frozenset[int] = frozenset(),
) -> Seq:
    return engine.submit("r", ids, params, max_new, stop)


def test_tokens_equal_generate_under_preemption(model: K2Model) -> None:
    """Regression: the scheduler could preempt a sequence it had already planned, and the step
    then failed ("block table too short") for every sequence in the batch."""
    prompts = [prompt(i, n) for i, n in enumerate([20, 3, 17, 9, 14, 1])]
    limits = DecodeLimits(num_blocks=10, block_size=8, max_running=8)
    engine = DecodeEngine(model, limits, LocalPrefill(model))

    async def body(engine: DecodeEngine) -> None:
        seqs = [submit(engine, p, 24) for p in prompts]
        served = await asyncio.gather(*(tokens_of(engine, s) for s in seqs))
        assert [t for t, _ in served] == generate_ids(model, prompts, 24)
        assert all(reason == "length" for _, reason in served)
        stats = await until_idle(engine)
        assert stats["preemptions"] > 0 and stats["requests_served"] == 6

    asyncio.run(run_engine(engine, body))


@pytest.mark.parametrize(
    ("raised", "status_text"),
    [
        (Unavailable("prefill failed on all 2 instance(s); try again"), "on all 2"),
        (RuntimeError("socket /srv/secret broke"), "prefill failed"),  # details stay in the log
    ],
)
def test_a_failed_handoff_fails_the_request_and_frees_its_blocks(
    model: K2Model, raised: Exception, status_text: str
) -> None:
    written: list[int] = []

    async def half_then_fail(seq: Seq, write: Write) -> Sampled:
        latent = torch.full((len(seq.prompt), model.cfg.kv_cache_dim), 1e4)
        write(0, 0, latent)  # garbage in one layer, then the stream breaks
        written.append(0)
        raise raised

    engine = DecodeEngine(model, DecodeLimits(num_blocks=16, block_size=8), half_then_fail)
    steps: list[int] = []
    engine.runner.step = lambda *a, **k: steps.append(1)  # a decode step must never run

    async def body(engine: DecodeEngine) -> None:
        seq = submit(engine, prompt(1, 20), 5)
        with pytest.raises(Unavailable) as failure:
            await tokens_of(engine, seq)
        assert status_text in failure.value.message and "secret" not in failure.value.message
        stats = await until_idle(engine)
        assert stats["requests_served"] == 0

    asyncio.run(run_engine(engine, body))
    assert written == [0] and steps == []


def test_the_engine_serves_on_after_a_failed_handoff(model: K2Model) -> None:
    local = LocalPrefill(model)
    failures = [Unavailable("prefill failed on all 1 instance(s); try again")]

    async def flaky(seq: Seq, write: Write) -> Sampled:
        if failures:
            raise failures.pop()
        return await local(seq, write)

    engine = DecodeEngine(model, DecodeLimits(num_blocks=16, block_size=8), flaky)
    ids = prompt(2, 9)

    async def body(engine: DecodeEngine) -> None:
        with pytest.raises(Unavailable):
            await tokens_of(engine, submit(engine, ids, 6))
        assert (await tokens_of(engine, submit(engine, ids, 6)))[0] == generate_ids(
            model, [ids], 6
        )[0]
        await until_idle(engine)

    asyncio.run(run_engine(engine, body))


def test_aborting_during_the_handoff_cancels_it_and_frees_blocks_at_once(model: K2Model) -> None:
    entered, cancelled = asyncio.Event(), []

    async def never_ends(seq: Seq, write: Write) -> Sampled:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(seq.request_id)
            raise
        raise AssertionError("unreachable")

    engine = DecodeEngine(model, DecodeLimits(num_blocks=16, block_size=8), never_ends)

    async def body(engine: DecodeEngine) -> None:
        seq = submit(engine, prompt(3, 30), 5)
        events = engine.events(seq)
        consumer = asyncio.create_task(anext(events))
        await entered.wait()
        assert engine.stats()["kv_blocks_free"] == 16 - 4
        consumer.cancel()  # the client went away: grpc cancels the handler like this
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await events.aclose()
        assert engine.stats()["kv_blocks_free"] == 16  # freed at once, no step involved
        await until_idle(engine)
        await asyncio.sleep(0)  # let the cancelled handoff task run its handler
        assert cancelled == ["r"]

    asyncio.run(run_engine(engine, body))


def test_aborting_mid_decode_frees_blocks_and_stops_stepping(model: K2Model) -> None:
    engine = DecodeEngine(model, DecodeLimits(num_blocks=64, block_size=8), LocalPrefill(model))
    ids = prompt(4, 10)

    async def body(engine: DecodeEngine) -> None:
        seqs = [submit(engine, ids, 400) for _ in range(3)]
        for seq in seqs:
            async with contextlib.aclosing(engine.events(seq)) as events:
                got = 0
                async for batch in events:
                    got += len(batch.tokens)
                    if got >= 3:
                        break
        stats = await until_idle(engine)
        assert stats["requests_served"] == 0
        assert all(len(s.out) < 40 for s in seqs)  # nowhere near max_new_tokens

    asyncio.run(run_engine(engine, body))


def test_a_first_token_that_is_a_stop_id_ends_the_request(model: K2Model) -> None:
    ids = prompt(5, 8)
    first = generate_ids(model, [ids], 1)[0][0]
    engine = DecodeEngine(model, DecodeLimits(num_blocks=16, block_size=8), LocalPrefill(model))

    async def body(engine: DecodeEngine) -> None:
        seq = submit(engine, ids, 50, stop=frozenset({first}))
        assert await tokens_of(engine, seq) == ([first], "stop")
        assert (await until_idle(engine))["requests_served"] == 1

    asyncio.run(run_engine(engine, body))


def test_submit_refuses_bad_requests_without_reserving_anything(model: K2Model) -> None:
    cfg = model.cfg
    unused: Prefiller = LocalPrefill(model)
    engine = DecodeEngine(model, DecodeLimits(num_blocks=8, block_size=16, max_queue=1), unused)
    context = cfg.max_position_embeddings
    cases: list[tuple[list[int], int, type[Exception]]] = [
        ([], 5, InvalidArgument),
        ([cfg.vocab_size], 5, InvalidArgument),
        ([-3], 5, InvalidArgument),
        ([1, 2], -1, InvalidArgument),
        ([1] * 128, 0, OutOfRange),  # "as many as fit": none do
        ([1] * (context + 1), 1, OutOfRange),
        ([1] * 10, context - 9, OutOfRange),
        (
            [1] * 100,
            29,
            OutOfRange,
        ),  # 129 tokens: more than this pool's 128 slots; retrying cannot help
    ]
    for ids, max_new, error in cases:
        with pytest.raises(error):
            submit(engine, ids, max_new)
    submit(engine, [1, 2], 3)
    with pytest.raises(ResourceExhausted, match="queue"):
        submit(engine, [1, 2], 3)
    stats = engine.stats()
    assert stats["queued"] == 1 and stats["kv_blocks_free"] == 8


def test_max_new_tokens_zero_is_what_the_pool_and_the_context_leave(model: K2Model) -> None:
    unused: Prefiller = LocalPrefill(model)
    small = DecodeEngine(model, DecodeLimits(num_blocks=8, block_size=16), unused)
    assert submit(small, [1] * 100, 0).max_new_tokens == 128 - 100  # the pool's 128 slots
    big = DecodeEngine(model, DecodeLimits(num_blocks=1024, block_size=16), unused)
    context = model.cfg.max_position_embeddings  # 8192 < 16384 slots
    assert submit(big, [1] * 100, 0).max_new_tokens == context - 100


def test_logit_bias_outside_the_vocabulary_is_refused_at_submit(model: K2Model) -> None:
    """Regression: a logit_bias id >= vocab_size was accepted and made the sampler raise inside
    the batched step, so one bad request failed every sequence decoding beside it."""
    engine = DecodeEngine(model, DecodeLimits(num_blocks=8, block_size=16), LocalPrefill(model))
    bad = SamplingParams(temperature=0.0, logit_bias={model.cfg.vocab_size + 7: 1.0})
    with pytest.raises(InvalidArgument, match="logit_bias") as refused:
        submit(engine, [1, 2, 3], 4, params=bad)
    assert isinstance(refused.value, ServiceError)
    assert engine.stats()["queued"] == 0


def test_a_step_failing_with_a_service_error_reaches_callers_as_that_error() -> None:
    """Regression: a step whose remote experts were down reached callers as INTERNAL; it is
    UNAVAILABLE (retryable) now, and unexpected failures stay opaque."""
    model = load_model(EMBEDDED_CHECKPOINT)
    engine = DecodeEngine(model, DecodeLimits(num_blocks=64), LocalPrefill(model))
    prefilled = asyncio.Event()

    def down(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        raise Unavailable("the expert pool is restarting")

    async def body(engine: DecodeEngine) -> None:
        seq = submit(engine, prompt(5, 8), 8)
        events = engine.events(seq)
        await anext(events)  # the first token comes from prefill, before any decode step
        prefilled.set()
        for moe in model.moe_layers().values():
            moe.remote = down
        with pytest.raises(Unavailable, match="restarting"):
            await anext(events)
        assert (await until_idle(engine))["kv_blocks_free"] == 64

    asyncio.run(run_engine(engine, body))
    assert prefilled.is_set()


def test_model_steps_run_at_the_step_nice_and_the_caller_keeps_its_own(model: K2Model) -> None:
    """The step thread is lowered (services/common/model_host.step_priority); the event loop's
    thread is not."""
    engine = DecodeEngine(
        model, DecodeLimits(num_blocks=16, block_size=8), LocalPrefill(model), step_nice=7
    )
    mine = os.getpriority(os.PRIO_PROCESS, 0)  # Linux: the calling thread's nice
    step_thread = engine._executor.submit(os.getpriority, os.PRIO_PROCESS, 0).result()
    assert (step_thread, os.getpriority(os.PRIO_PROCESS, 0)) == (mine + 7, mine)
    engine._executor.shutdown()
