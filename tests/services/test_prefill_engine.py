"""services.prefill.engine in one process over the embedded checkpoint: chunked KV streaming,
admission by blocks, cancellation, refusals at submit and failing steps."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, SamplingParams, generate_ids, load_model
from k2model.block_allocator import blocks_needed
from k2model.model import K2Model
from k2model.runner import ModelRunner, StepInput
from services.common.errors import InvalidArgument, OutOfRange, ResourceExhausted, ServiceError
from services.prefill.engine import (
    Failed,
    FirstToken,
    KvPart,
    PrefillEngine,
    PrefillJob,
    PrefillLimits,
)
from tests.services.engine_idle import until_idle

GREEDY = SamplingParams(temperature=0.0)
WAIT_S = 30.0  # a guard against hangs, never reached when the engine works


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT)


def prompt(seed: int, n: int, vocab: int = 3840) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


async def with_engine(
    engine: PrefillEngine, body: Callable[[PrefillEngine], Awaitable[None]]
) -> None:
    task = asyncio.create_task(engine.run())
    try:
        await asyncio.wait_for(body(engine), WAIT_S)
    finally:
        task.cancel()


async def drain(job: PrefillJob) -> tuple[list[KvPart], Any]:
    """Every KV part of the job, then its final event unwrapped: the first token (a Sampled) or
    the error."""
    parts = []
    while True:
        item = await job.out.get()
        if isinstance(item, FirstToken):
            return parts, item.sampled
        if isinstance(item, Failed):
            return parts, item.error
        parts.append(item)


def one_shot_latents(model: K2Model, ids: list[int]) -> list[torch.Tensor]:
    """Each layer's latent KV for the whole prompt from a single unchunked step."""
    runner = ModelRunner(model, blocks_needed(len(ids), 16), 16)
    got: dict[int, torch.Tensor] = {}
    blocks = list(range(blocks_needed(len(ids), 16)))
    runner.step([StepInput(ids, 0, blocks, None)], "naive", lambda i, x: got.setdefault(i, x))
    return [got[i] for i in range(model.cfg.num_hidden_layers)]


def test_chunked_kv_equals_one_shot_prefill_and_first_token_equals_generate(model: K2Model) -> None:
    prompts = [prompt(1, 21), prompt(2, 5), prompt(3, 13)]
    limits = PrefillLimits(num_blocks=16, block_size=4, chunk_tokens=8, max_batch_tokens=12)
    results = []

    async def body(engine: PrefillEngine) -> None:
        jobs = [engine.submit(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
        results.extend(await asyncio.gather(*(drain(j) for j in jobs)))
        stats = await until_idle(engine)
        assert stats["prompts_served"] == 3

    asyncio.run(with_engine(PrefillEngine(model, limits), body))
    firsts = generate_ids(model, prompts, 1)
    for ids, (parts, first), expected in zip(prompts, results, firsts, strict=True):
        assert first.token_id == expected[0]
        for layer, reference in enumerate(one_shot_latents(model, ids)):
            mine = [p for p in parts if p.layer == layer]
            starts = [p.token_start for p in mine]
            sizes = [p.latent.shape[0] for p in mine]
            assert starts == [sum(sizes[:k]) for k in range(len(sizes))]  # in order, no gaps
            assert sum(sizes) == len(ids) and max(sizes) <= limits.chunk_tokens
            got = torch.cat([p.latent for p in mine])
            torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-4)


def test_cancelling_a_running_job_stops_its_work_and_frees_its_blocks(model: K2Model) -> None:
    long, short = prompt(4, 240), prompt(5, 7)
    limits = PrefillLimits(num_blocks=32, block_size=16, chunk_tokens=8, max_batch_tokens=16)
    engine = PrefillEngine(model, limits)
    computed: list[int] = []  # token_start of every chunk of `long` a model step ran
    real_step = engine.runner.step

    def recording_step(inputs: list[StepInput], *args: Any, **kwargs: Any) -> list[Any]:
        for i in inputs:
            if list(i.tokens) == long[i.start : i.start + len(i.tokens)]:
                computed.append(i.start)
        return real_step(inputs, *args, **kwargs)

    engine.runner.step = recording_step

    async def body(engine: PrefillEngine) -> None:
        job = engine.submit("long", long, GREEDY)
        assert isinstance(await job.out.get(), KvPart)
        engine.cancel(job)
        other = engine.submit("short", short, GREEDY)
        _, first = await drain(other)
        assert first.token_id == generate_ids(engine.model, [short], 1)[0][0]
        stats = await until_idle(engine)
        assert stats["prompts_served"] == 1
        leftovers = [job.out.get_nowait() for _ in range(job.out.qsize())]
        assert all(isinstance(x, KvPart) for x in leftovers)  # never a first token

    asyncio.run(with_engine(engine, body))
    # 30 chunks long; at most the step that was running when it was cancelled came after the first
    assert 1 <= len(computed) <= 3


def test_jobs_wait_for_blocks_and_a_cancelled_waiting_job_never_runs(model: K2Model) -> None:
    prompts = [prompt(10 + i, 12) for i in range(3)]
    limits = PrefillLimits(num_blocks=4, block_size=4, chunk_tokens=16, max_batch_tokens=64)

    async def body(engine: PrefillEngine) -> None:
        jobs = [engine.submit(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
        dropped = engine.submit("dropped", prompt(20, 12), GREEDY)
        engine.cancel(dropped)
        assert engine.stats()["queued"] == 3  # the pool holds one 12-token prompt at a time
        finals = [(await drain(j))[1] for j in jobs]
        assert [f.token_id for f in finals] == [
            t[0] for t in generate_ids(engine.model, prompts, 1)
        ]
        await until_idle(engine)
        assert dropped.out.empty() and dropped.blocks == []

    asyncio.run(with_engine(PrefillEngine(model, limits), body))


def test_submit_refuses_bad_prompts_without_taking_blocks(model: K2Model) -> None:
    cfg = model.cfg
    engine = PrefillEngine(model, PrefillLimits(num_blocks=8, block_size=16, max_queue=1))
    cases: list[tuple[list[int], type[ServiceError]]] = [
        ([], InvalidArgument),
        ([1, cfg.vocab_size], InvalidArgument),
        ([1, -1], InvalidArgument),
        ([1] * (cfg.max_position_embeddings + 1), OutOfRange),
        ([1] * (8 * 16 + 1), ResourceExhausted),  # more blocks than this prefill has
    ]
    for ids, error in cases:
        with pytest.raises(error):
            engine.submit("bad", ids, GREEDY)
    engine.submit("queued", [1, 2], GREEDY)
    with pytest.raises(ResourceExhausted, match="queue"):
        engine.submit("one too many", [1, 2], GREEDY)
    assert engine.stats()["queued"] == 1 and engine.alloc.num_free == 8


def test_logit_bias_outside_the_vocabulary_is_refused_at_submit(model: K2Model) -> None:
    """Regression: a logit_bias id >= vocab_size passed validation and made the sampler raise
    inside the batched step, failing every prompt prefilled in that step (with the bad request's
    INVALID_ARGUMENT); it must be refused at submit and leave other prompts untouched."""
    vocab = model.cfg.vocab_size
    engine = PrefillEngine(model, PrefillLimits(num_blocks=8, block_size=16))
    with pytest.raises(InvalidArgument, match="logit_bias"):
        engine.submit("bad", [1, 2, 3], SamplingParams(temperature=0.0, logit_bias={vocab: 5}))
    edge = SamplingParams(temperature=0.0, logit_bias={vocab - 1: 100.0})

    async def body(engine: PrefillEngine) -> None:
        jobs = [engine.submit("edge", [1, 2, 3], edge), engine.submit("ok", [4, 5], GREEDY)]
        finals = [(await drain(j))[1] for j in jobs]
        assert finals[0].token_id == vocab - 1  # a +100 bias wins the argmax
        assert finals[1].token_id == generate_ids(engine.model, [[4, 5]], 1)[0][0]

    asyncio.run(with_engine(engine, body))


def test_a_failing_model_step_fails_its_jobs_as_internal_and_the_engine_goes_on(
    model: K2Model,
) -> None:
    """Regression: the model's own exception (a ValueError, with internal details) was handed to
    the caller, so the interceptor sent INVALID_ARGUMENT and decode blamed the request instead of
    retrying another prefill. A failing step must reach callers as an opaque INTERNAL error."""
    engine = PrefillEngine(model, PrefillLimits(num_blocks=8, block_size=16))
    real_step = engine.runner.step
    calls = []

    def flaky_step(*args: Any, **kwargs: Any) -> list[Any]:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("block table too short at /srv/secret")
        return real_step(*args, **kwargs)

    engine.runner.step = flaky_step

    async def body(engine: PrefillEngine) -> None:
        _, error = await drain(engine.submit("doomed", [1, 2, 3], GREEDY))
        assert isinstance(error, Exception)
        assert not isinstance(error, (ValueError, ServiceError))  # maps to INTERNAL
        assert "secret" not in str(error)
        _, first = await drain(engine.submit("next", [1, 2, 3], GREEDY))
        assert first.token_id == generate_ids(engine.model, [[1, 2, 3]], 1)[0][0]
        await until_idle(engine)

    asyncio.run(with_engine(engine, body))
