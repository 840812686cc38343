"""Bad input at every RPC gets a clear status and never a crash; the suite serves on afterwards.

Two halves. A real suite (prefill and decode processes) gets malformed requests at Decode.Generate,
Prefill.Prefill and both Stats RPCs. Then a decode server in this process gets bad KV streams from
scripted fake prefill servers (wrong dtype or shape, chunks out of order, a missing layer, an early
first token): each request fails with UNAVAILABLE, its blocks are freed, the fake sees the call
cancelled, and a retry on a good instance rewrites the whole cache (exact tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import grpc
import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, SamplingParams, generate_ids, load_model
from k2model.model import K2Model
from services.common.errors import Unavailable
from services.common.server import RunningServer, ServerOptions, start_server
from services.common.tensor_codec import tensor_to_proto
from services.decode.engine import DecodeEngine, DecodeLimits
from services.decode.prefill_client import PrefillPool
from services.decode.scheduler import Seq
from services.decode.servicer import DecodeServicer
from services.launcher import Suite
from services.pb.k2.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.prefill.engine import PrefillEngine, PrefillLimits
from services.prefill.servicer import PrefillServicer
from tests.e2e.client import decode_stats, generate
from tests.e2e.suite_fixtures import free_port, start_suite, write_deployment
from tests.timing import seconds

INVALID, RANGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE
VOCAB, CONTEXT, KV_DIM, LAYERS = 4096, 8192, 80, 4  # the embedded checkpoint (docs/model.md)
PROMPT = [5, 17, 99, 1024, 3000, 42, 7, 256, 2048, 11]
S = common_pb2.SamplingParams
RPC_S = seconds(30.0)
DOWN_S = 4.0  # a prefill unreachable this long (+ one failed handoff) while decode redials
# (case, prompt, max_new_tokens, sampling, status, a word the details must contain)
Case = tuple[str, list[int], int, common_pb2.SamplingParams | None, grpc.StatusCode, str]


@pytest.fixture(scope="module")
def model() -> K2Model:
    return load_model(EMBEDDED_CHECKPOINT)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    path = write_deployment(tmp_path_factory.mktemp("bad") / "d.yaml")
    s = start_suite(path, names=["prefill-0", "decode-0"])
    yield s
    s.stop()


BAD_REQUESTS: list[Case] = [
    ("empty prompt", [], 4, None, INVALID, "prompt_ids"),
    ("id = vocab size", [1, VOCAB], 4, None, INVALID, "vocabulary"),
    ("negative id", [1, -5], 4, None, INVALID, "vocabulary"),
    ("prompt over the context", [1] * (CONTEXT + 1), 1, None, RANGE, "context"),
    ("prompt + new over the context", PROMPT, CONTEXT, None, RANGE, "context"),
    # max_new_tokens 0 is "as many as fit": 4096 prompt tokens fill this decode's 256 x 16 slots
    ("max_new_tokens 0 with no room", [1] * 4096, 0, None, RANGE, "no room"),
    ("max_new_tokens -1", PROMPT, -1, None, INVALID, "max_new_tokens"),
    ("top_p 0", PROMPT, 4, S(top_p=0.0), INVALID, "top_p"),
    ("temperature -1", PROMPT, 4, S(temperature=-1.0), INVALID, "temperature"),
    ("temperature NaN", PROMPT, 4, S(temperature=float("nan")), INVALID, "temperature"),
    ("top_logprobs 50", PROMPT, 4, S(logprobs=True, top_logprobs=50), INVALID, "top_logprobs"),
    ("top_logprobs without logprobs", PROMPT, 4, S(top_logprobs=3), INVALID, "top_logprobs"),
    ("top_k -1", PROMPT, 4, S(top_k=-1), INVALID, "top_k"),
    ("presence_penalty 3", PROMPT, 4, S(presence_penalty=3.0), INVALID, "presence_penalty"),
    ("repetition_penalty 0", PROMPT, 4, S(repetition_penalty=0.0), INVALID, "repetition"),
    ("logit_bias id out of vocab", PROMPT, 4, S(logit_bias={VOCAB: 1.0}), INVALID, "logit_bias"),
    ("logit_bias negative id", PROMPT, 4, S(logit_bias={-1: 1.0}), INVALID, "logit_bias"),
    ("logit_bias 1000", PROMPT, 4, S(logit_bias={3: 1000.0}), INVALID, "logit_bias"),
]
# Prefill has no max_new_tokens: the cases about it do not apply there.
PREFILL_BAD = [c for c in BAD_REQUESTS if "new" not in c[0]]


def ids(case: Case) -> str:
    return case[0]


async def decode_call(
    target: str, prompt: list[int], max_new: int, sampling: common_pb2.SamplingParams | None
) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        request = decode_pb2.GenerateRequest(
            prompt_ids=prompt, max_new_tokens=max_new, sampling=sampling or S(temperature=0.0)
        )
        async for _ in decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=RPC_S):
            pass


async def prefill_call(
    target: str, prompt: list[int], sampling: common_pb2.SamplingParams | None
) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        request = prefill_pb2.PrefillRequest(prompt_ids=prompt, sampling=sampling or S())
        async for _ in prefill_pb2_grpc.PrefillStub(channel).Prefill(request, timeout=RPC_S):
            pass


def expect_status(call: Coroutine[Any, Any, None], status: grpc.StatusCode, word: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        asyncio.run(call)
    assert failure.value.code() == status, failure.value.details()
    assert word in failure.value.details()


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=ids)
def test_decode_generate_refuses(suite: Suite, case: Case) -> None:
    _, prompt, max_new, sampling, status, word = case
    target = suite.deployment.instance("decode-0").target
    expect_status(decode_call(target, prompt, max_new, sampling), status, word)


@pytest.mark.parametrize("case", PREFILL_BAD, ids=ids)
def test_prefill_refuses(suite: Suite, case: Case) -> None:
    _, prompt, _, sampling, status, word = case
    target = suite.deployment.instance("prefill-0").target
    expect_status(prefill_call(target, prompt, sampling), status, word)


@pytest.mark.parametrize(
    "method",
    [
        "/k2.v1.Decode/Stats",
        "/k2.v1.Prefill/Stats",
        "/k2.v1.Decode/Generate",
        "/k2.v1.Prefill/Prefill",
    ],
)
def test_undecodable_request_bytes_are_refused(suite: Suite, method: str) -> None:
    target = suite.deployment.instance("decode-0" if "Decode" in method else "prefill-0").target

    async def call() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            streaming = not method.endswith("Stats")
            kind = channel.unary_stream if streaming else channel.unary_unary
            rpc = kind(method, request_serializer=bytes, response_deserializer=bytes)
            reply = rpc(b"\xff\xff\xff\xff", timeout=RPC_S)
            if streaming:
                [_ async for _ in reply]
            else:
                await reply

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        asyncio.run(call())
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not this method's message" in failure.value.details()


def test_suite_serves_exact_tokens_while_bad_requests_fly(suite: Suite, model: K2Model) -> None:
    decode = suite.deployment.instance("decode-0").target
    prefill = suite.deployment.instance("prefill-0").target
    prompt = [random.Random(9).randrange(3840) for _ in range(60)]

    async def storm() -> tuple[list[int], str]:
        good = asyncio.create_task(generate(decode, prompt, 40))
        bad = [decode_call(decode, p, m, s) for _, p, m, s, _, _ in BAD_REQUESTS]
        bad += [prefill_call(prefill, p, s) for _, p, _, s, _, _ in PREFILL_BAD]
        outcomes = await asyncio.gather(*bad, return_exceptions=True)
        assert all(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)
        assert {o.code() for o in outcomes} <= {INVALID, RANGE}
        return await good

    assert asyncio.run(storm()) == (generate_ids(model, [prompt], 40)[0], "length")
    stats = asyncio.run(decode_stats(decode))
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == stats.queued == 0


# ---- bad KV streams from a prefill peer, seen by a decode server in this process ----


def kv(layer: int, start: int, n: int, **tweak: Any) -> prefill_pb2.PrefillChunk:
    latent = tensor_to_proto(tweak.pop("tensor", torch.zeros(n, KV_DIM)))
    for name, value in tweak.items():
        if name == "shape":
            del latent.shape[:]
            latent.shape.extend(value)
        else:
            setattr(latent, name, value)
    return prefill_pb2.PrefillChunk(
        kv=prefill_pb2.KvChunk(layer=layer, token_start=start, latent=latent)
    )


def first(token_id: int = 1, **fields: Any) -> prefill_pb2.PrefillChunk:
    return prefill_pb2.PrefillChunk(
        first_token=common_pb2.SampledToken(token_id=token_id, **fields)
    )


FIRST = first()


def every_layer(n: int, but: int = -1) -> list[prefill_pb2.PrefillChunk]:
    return [kv(layer, 0, n) for layer in range(LAYERS) if layer != but]


N = len(PROMPT)
NAN = torch.full((N, KV_DIM), float("nan"))
BAD_STREAMS: dict[str, list[prefill_pb2.PrefillChunk]] = {
    "wrong dtype": [kv(0, 0, N, tensor=torch.zeros(N, KV_DIM, dtype=torch.float16))],
    "unknown dtype": [kv(0, 0, N, dtype="pickle")],
    "wrong width": [kv(0, 0, N, tensor=torch.zeros(N, KV_DIM - 1))],
    "three dims": [kv(0, 0, N, shape=[N, KV_DIM, 1])],
    "short data": [kv(0, 0, N, data=bytes(4 * KV_DIM * (N - 1)))],
    "out of order": [kv(0, 4, 2)],
    "duplicate chunk": [kv(0, 0, 4), kv(0, 0, 4)],
    "layer out of range": [kv(LAYERS, 0, N)],
    "negative layer": [kv(-1, 0, N)],
    "past the prompt": [kv(0, 0, N + 1, tensor=torch.zeros(N + 1, KV_DIM))],
    "missing layer": [*every_layer(N, but=2), FIRST],
    "first token first": [FIRST],
    "half a layer": [
        *every_layer(N, but=1),
        kv(1, 0, N - 1, tensor=torch.zeros(N - 1, KV_DIM)),
        FIRST,
    ],
    # Regression: decode trusted these. An id of 1e9 raised IndexError in the
    # decode step and failed unrelated streams sharing it; -1 was wrapped by the embedding
    # lookup; NaN / Inf KV was decoded into garbage.
    "token id past the vocabulary": [*every_layer(N), first(10**9)],
    "token id just past the vocabulary": [*every_layer(N), first(VOCAB)],
    "negative token id": [*every_layer(N), first(-1)],
    "top logprob id outside": [
        *every_layer(N),
        first(1, logprob=-0.5, top_logprobs=[common_pb2.TokenLogprob(token_id=VOCAB, logprob=-1)]),
    ],
    "NaN logprob": [*every_layer(N), first(1, logprob=float("nan"))],
    "NaN KV": [*every_layer(N, but=0), kv(0, 0, N, tensor=NAN), FIRST],
    "Inf KV": [kv(0, 0, N, tensor=torch.full((N, KV_DIM), float("inf"))), *every_layer(N, but=0)],
}


class ScriptedPrefill(prefill_pb2_grpc.PrefillServicer):
    """Sends `chunks`, then ends the stream (`then` = "end"), fails it ("abort"), or waits for the
    caller to cancel ("wait"), noting that it was cancelled."""

    def __init__(self, chunks: list[prefill_pb2.PrefillChunk], then: str = "wait") -> None:
        self.chunks, self.then = chunks, then
        self.calls, self.cancelled = 0, asyncio.Event()

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
        self.calls += 1
        try:
            for chunk in self.chunks:
                yield chunk
            if self.then == "wait":
                await asyncio.Event().wait()
        except BaseException:  # cancelled, also while suspended at a yield above (grpc may
            self.cancelled.set()  # raise other than CancelledError there once the call is gone)
            raise
        if self.then == "abort":
            raise Unavailable("prefill instance broke")

    async def Stats(
        self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillStats:
        return prefill_pb2.PrefillStats()


async def serve_prefill(servicer: prefill_pb2_grpc.PrefillServicer) -> RunningServer:
    running = await start_server(
        "prefill-under-test",
        [lambda s: prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, s)],
        ["k2.v1.Prefill"],
        ServerOptions(),
    )
    running.set_serving()
    return running


@contextlib.asynccontextmanager
async def decode_over(
    model: K2Model, peers: list[prefill_pb2_grpc.PrefillServicer]
) -> AsyncIterator[str]:
    """A decode server in this process whose prefill pool is `peers`, tried in that order."""
    servers = [await serve_prefill(p) for p in peers]
    pool = PrefillPool([s.address for s in servers], model.cfg, model.dtype)
    engine = DecodeEngine(model, DecodeLimits(num_blocks=32, block_size=16), pool.prefill)
    servicer = DecodeServicer(engine)
    decode = await start_server(
        "decode-under-test",
        [lambda s: decode_pb2_grpc.add_DecodeServicer_to_server(servicer, s)],
        ["k2.v1.Decode"],
        ServerOptions(),
    )
    task = asyncio.create_task(engine.run())
    try:
        yield decode.address
    finally:
        task.cancel()
        await decode.server.stop(None)
        await pool.close()
        for s in servers:
            await s.server.stop(None)


async def failed_generate(target: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await generate(target, PROMPT, 4, timeout=RPC_S)
    return failure.value


async def all_free(target: str) -> None:
    stats = await decode_stats(target)
    assert stats.kv_blocks_free == stats.kv_blocks_total == 32
    assert stats.running == stats.queued == 0


@pytest.mark.parametrize("name", list(BAD_STREAMS))
def test_a_bad_kv_stream_fails_the_request_frees_blocks_and_cancels_the_transfer(
    model: K2Model, name: str
) -> None:
    fake = ScriptedPrefill(BAD_STREAMS[name])

    async def body() -> None:
        async with decode_over(model, [fake]) as target:
            error = await failed_generate(target)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "prefill failed on all 1 instance(s)" in error.details()
            await all_free(target)
            await asyncio.wait_for(fake.cancelled.wait(), RPC_S)  # prefill told to stop

    asyncio.run(body())
    assert fake.calls == 1


@pytest.mark.parametrize("then", ["end", "abort"])
def test_a_stream_that_stops_before_the_first_token_fails_the_request(
    model: K2Model, then: str
) -> None:
    fake = ScriptedPrefill(every_layer(N), then=then)

    async def body() -> None:
        async with decode_over(model, [fake]) as target:
            assert (await failed_generate(target)).code() == grpc.StatusCode.UNAVAILABLE
            await all_free(target)

    asyncio.run(body())


def test_prefill_refusing_the_prompt_is_passed_on_not_retried(model: K2Model) -> None:
    class Refusing(ScriptedPrefill):
        async def Prefill(
            self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
            self.calls += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_ids: no thanks")
            yield FIRST

    first, second = Refusing([]), ScriptedPrefill([])

    async def body() -> None:
        async with decode_over(model, [first, second]) as target:
            error = await failed_generate(target)
            assert error.code() == INVALID and "no thanks" in error.details()
            await all_free(target)

    asyncio.run(body())
    assert (first.calls, second.calls) == (1, 0)


def test_a_broken_transfer_is_retried_elsewhere_and_rewrites_the_whole_cache(
    model: K2Model,
) -> None:
    """The first peer sends garbage KV for two layers and breaks; the second is a real prefill.
    Decoding from any of the first peer's KV would change the tokens."""
    garbage = torch.full((N, KV_DIM), 30.0)
    broken = ScriptedPrefill([kv(0, 0, N, tensor=garbage), kv(1, 0, N, tensor=garbage)], "abort")
    engine = PrefillEngine(model, PrefillLimits(num_blocks=16, block_size=16, chunk_tokens=4))
    real = PrefillServicer(engine)

    async def body() -> list[int]:
        prefill_task = asyncio.create_task(engine.run())
        try:
            async with decode_over(model, [broken, real]) as target:
                tokens, _ = await generate(target, PROMPT, 12, timeout=RPC_S)
                await all_free(target)
                return tokens
        finally:
            prefill_task.cancel()

    assert asyncio.run(body()) == generate_ids(model, [PROMPT], 12)[0]
    assert broken.calls == 1 and engine.served == 1


def test_a_prefill_that_comes_back_serves_the_next_request_at_once(
    model: K2Model,
) -> None:
    """Regression: after failed dials (decode started before its prefill, or the prefill was
    restarted) the channel sat in reconnect backoff - grpc's default grows it to 2.5-4 s after 6 s
    down - and every handoff in that window failed at once with UNAVAILABLE although the prefill
    was up. Now redials are at most 1 s apart and the pool waits up to 2 s for the connection."""
    address = f"127.0.0.1:{free_port()}"
    seq = Seq("r", PROMPT, SamplingParams(), 0, 4, frozenset())
    written: list[int] = []

    def write(layer: int, start: int, latent: torch.Tensor) -> None:
        written.append(layer)

    async def body() -> int:
        pool = PrefillPool([address], model.cfg, model.dtype)
        pool.start()  # its Stats polls redial the peer every 0.25 s
        with pytest.raises(Unavailable):  # nothing listens yet
            await pool.prefill(seq, write)
        await asyncio.sleep(DOWN_S)
        fake = ScriptedPrefill([*every_layer(N), FIRST])
        running = await start_server(
            "late-prefill",
            [lambda s: prefill_pb2_grpc.add_PrefillServicer_to_server(fake, s)],
            ["k2.v1.Prefill"],
            ServerOptions(bind=address),
        )
        try:
            return (await pool.prefill(seq, write)).token_id
        finally:
            await pool.close()
            await running.server.stop(None)

    assert asyncio.run(body()) == 1
    assert sorted(written) == list(range(LAYERS))


def test_a_bad_first_token_fails_only_its_own_request(model: K2Model) -> None:
    """Regression: a first token id of 1e9 made the decode step raise and
    failed the unrelated streams sharing it with INTERNAL. One prefill serves two requests: the
    good one is real, the other's first token is outside the vocabulary."""
    engine = PrefillEngine(model, PrefillLimits(num_blocks=16, block_size=16, chunk_tokens=4))
    real = PrefillServicer(engine)
    bad_prompt = [9, *PROMPT[1:]]

    class Selective(ScriptedPrefill):
        async def Prefill(
            self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
            if list(request.prompt_ids) == bad_prompt:
                for chunk in [*every_layer(N), first(10**9)]:
                    yield chunk
                return
            async for chunk in real.Prefill(request, context):
                yield chunk

    async def body() -> list[int]:
        prefill_task = asyncio.create_task(engine.run())
        try:
            async with decode_over(model, [Selective([])]) as target:
                good = asyncio.create_task(generate(target, PROMPT, 24, timeout=RPC_S))
                await asyncio.sleep(0.2)
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await generate(target, bad_prompt, 4, timeout=RPC_S)
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
                tokens, _ = await good
                await all_free(target)
                return tokens
        finally:
            prefill_task.cancel()

    assert asyncio.run(body()) == generate_ids(model, [PROMPT], 24)[0]
