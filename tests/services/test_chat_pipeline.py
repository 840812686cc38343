"""services.tokenizer.chat_pipeline against real tokenizer, prefill and decode servers run in this process (one
embedded model, grpc.aio on port 0, one background event loop): seeds per choice, stop strings,
the default max_tokens, thinking off, tool_choice none / required / named, logprobs against the
in-process reference, cancellation freeing decode KV, and request errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import jsonschema
import pytest

from gateway.backend import TokenizerBackend
from k2model import EMBEDDED_CHECKPOINT, generate, load_model
from k2model.constraints import ConstraintCompiler, Vocabulary
from k2model.generation import GenerationRequest
from k2model.sampling_params import SamplingParams
from k2model.text import chat_tokens as tok
from k2model.text.chat_format import render
from k2model.text.messages import Message, Tool, ToolCall
from k2model.text.tokenizer import Tokenizer
from services.chat.types import ChatEvent, ChatRequest, ToolCallDelta
from services.common.errors import DeadlineExceeded, InvalidArgument, OutOfRange
from services.common.placement import Placement
from services.common.server import RunningServer, ServerOptions, start_server
from services.decode.engine import DecodeEngine, DecodeLimits
from services.decode.prefill_client import PrefillPool
from services.decode.servicer import DecodeServicer
from services.pb.k2.v1 import (
    decode_pb2_grpc,
    prefill_pb2_grpc,
    tokenizer_pb2_grpc,
)
from services.prefill.engine import PrefillEngine, PrefillLimits
from services.prefill.servicer import PrefillServicer
from services.tokenizer.chat_pipeline import ChatPipeline
from services.tokenizer.chat_text import ChatText
from services.tokenizer.choice_run import CallTracker
from services.tokenizer.servicer import TokenizerServicer

DECODE_BLOCKS, BLOCK_SIZE = 32, 8  # 256 tokens per decode sequence at most
GREEDY = SamplingParams(temperature=0.0)
HELLO = (Message("user", "Hello there, who are you?"),)
WEATHER = Tool(
    "get_weather",
    "Weather of a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city"],
    },
)
CLOCK = Tool("get_time", None, {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}})


class Stack:
    """The servers and the pipeline, all on one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[RunningServer] = []
        self.tasks: list[asyncio.Task] = []
        self.call(self._start())

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _serve(self, name: str, add: Any, servicer: Any) -> RunningServer:
        running = await start_server(name, [lambda s: add(servicer, s)], [], ServerOptions())
        running.set_serving()
        self.servers.append(running)
        return running

    async def _start(self) -> None:
        self.model = await asyncio.to_thread(load_model, EMBEDDED_CHECKPOINT)
        vocab = Vocabulary.from_dir(EMBEDDED_CHECKPOINT, self.model.cfg.vocab_size)
        prefill_engine = PrefillEngine(self.model, PrefillLimits(64, 16), ConstraintCompiler(vocab))
        prefill = await self._serve(
            "prefill",
            prefill_pb2_grpc.add_PrefillServicer_to_server,
            PrefillServicer(prefill_engine),
        )
        self.pool = PrefillPool([prefill.address], self.model.cfg, self.model.dtype)
        self.pool.start()
        limits = DecodeLimits(DECODE_BLOCKS, BLOCK_SIZE)
        self.decode = DecodeEngine(self.model, limits, self.pool.prefill, ConstraintCompiler(vocab))
        decode = await self._serve(
            "decode", decode_pb2_grpc.add_DecodeServicer_to_server, DecodeServicer(self.decode)
        )
        self.tasks = [asyncio.create_task(e.run()) for e in (prefill_engine, self.decode)]
        self.decodes = Placement([("d", decode.address)], decode_pb2_grpc.DecodeStub)
        text = await asyncio.to_thread(ChatText, EMBEDDED_CHECKPOINT)
        tokenizer = await self._serve(
            "tokenizer",
            tokenizer_pb2_grpc.add_TokenizerServicer_to_server,
            TokenizerServicer(text, ChatPipeline(text, self.decodes)),
        )
        self.pipeline = TokenizerBackend([tokenizer.address])

    async def _stop(self) -> None:
        await self.pipeline.close()
        await self.decodes.close()
        for task in self.tasks:
            task.cancel()
        await self.pool.close()
        for running in self.servers:
            await running.server.stop(None)

    def close(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def chat(self, request: ChatRequest) -> list[ChatEvent]:
        async def collect() -> list[ChatEvent]:
            return [e async for e in self.pipeline.chat(request)]

        return self.call(collect())


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_CHECKPOINT)


def req(**kw: Any) -> ChatRequest:
    return ChatRequest(**{"model": "k2", "messages": HELLO, "sampling": GREEDY, **kw})


def text_of(events: list[ChatEvent], choice: int = 0, field: str = "content") -> str:
    return "".join(getattr(e, field) for e in events if e.choice == choice)


def finish(events: list[ChatEvent], choice: int = 0) -> str | None:
    [reason] = [e.finish_reason for e in events if e.choice == choice and e.finish_reason]
    return reason


def calls(events: list[ChatEvent], choice: int = 0) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of each call, from its deltas."""
    out: dict[int, list[str]] = {}
    for e in events:
        for d in e.tool_calls if e.choice == choice else ():
            assert not d.error, d.error
            entry = out.setdefault(d.index, ["", "", ""])
            entry[0], entry[1] = entry[0] or d.id, entry[1] or d.name
            entry[2] += d.arguments
    return [tuple(v) for _, v in sorted(out.items())]


def test_choices_sample_with_seed_plus_index(stack) -> None:
    sampled = SamplingParams(temperature=1.0, seed=41)
    together = stack.chat(req(n=3, sampling=sampled, max_tokens=6, thinking=False))
    for i in range(3):
        alone = stack.chat(
            req(sampling=replace(sampled, seed=41 + i), max_tokens=6, thinking=False)
        )
        assert text_of(together, i) == text_of(alone)
    assert len({text_of(together, i) for i in range(3)}) > 1
    usage = together[-1].usage
    assert usage is not None and usage.completion_tokens == 18
    assert all(e.usage is None for e in together[:-1])


def test_stop_string_ends_the_content_before_it(stack) -> None:
    free = text_of(stack.chat(req(max_tokens=24, thinking=False)))
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), free
    events = stack.chat(req(max_tokens=24, thinking=False, stop=(stop,)))
    assert text_of(events) == free[: free.index(stop)]
    assert finish(events) == "stop"


def test_default_max_tokens_is_what_the_decode_instance_holds(stack) -> None:
    events = stack.chat(req(thinking=False))
    usage = events[-1].usage
    assert usage is not None
    room = DECODE_BLOCKS * BLOCK_SIZE - usage.prompt_tokens
    assert (finish(events), usage.completion_tokens) == ("length", room) or (
        finish(events) == "stop" and usage.completion_tokens < room
    )


def test_thinking_off_closes_the_think_block_and_bans_reasoning(stack, tokenizer) -> None:
    on = stack.call(stack.pipeline.count_tokens(req()))
    assert stack.call(stack.pipeline.count_tokens(req(thinking=False))) == on + 2
    think = [tokenizer.special_id(n) for n in (tok.THINK_BEGIN, tok.THINK_END)]
    biased = SamplingParams(temperature=0.0, logit_bias=dict.fromkeys(think, 100.0), logprobs=True)
    events = stack.chat(req(thinking=False, sampling=biased, max_tokens=8))
    assert text_of(events, field="reasoning") == ""
    tokens = [lp.token for e in events for lp in e.logprobs]
    assert len(tokens) == 8 and not {tok.THINK_BEGIN, tok.THINK_END} & set(tokens)


def test_tool_choice_none_bans_the_section_that_auto_allows(stack, tokenizer) -> None:
    section = tokenizer.special_id(tok.SECTION_BEGIN)
    biased = SamplingParams(temperature=0.0, logit_bias={section: 100.0}, logprobs=True)
    base = req(tools=(WEATHER,), thinking=False, sampling=biased, max_tokens=6)
    auto = stack.chat(base)
    assert auto[0].logprobs[0].token == tok.SECTION_BEGIN
    none = stack.chat(replace(base, tool_choice="none"))
    assert tok.SECTION_BEGIN not in [lp.token for e in none for lp in e.logprobs]
    assert finish(none) in ("stop", "length") and not calls(none)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_call_is_valid_and_continues_the_numbering(stack, seed) -> None:
    history = (
        Message("user", "What time is it?"),
        Message("assistant", None, tool_calls=(ToolCall("call_x", "get_time", "{}"),)),
        Message("tool", '{"time": "noon"}', tool_call_id="call_x"),
        Message("user", "And the weather?"),
    )
    sampled = SamplingParams(temperature=1.0, seed=seed)
    events = stack.chat(
        req(messages=history, tools=(WEATHER, CLOCK), tool_choice="required", sampling=sampled)
    )
    [(call_id, name, arguments)] = calls(events)
    assert finish(events) == "tool_calls" and call_id == f"functions.{name}:1"
    schema = {t.name: t.parameters for t in (WEATHER, CLOCK)}[name]
    jsonschema.validate(json.loads(arguments), schema)


def test_named_tool_choice_calls_that_tool(stack) -> None:
    sampled = SamplingParams(temperature=1.0, seed=9)
    events = stack.chat(req(tools=(WEATHER, CLOCK), tool_choice="get_time", sampling=sampled, n=2))
    for i in range(2):
        [(call_id, name, _)] = calls(events, i)
        assert (call_id, name, finish(events, i)) == (
            "functions.get_time:0",
            "get_time",
            "tool_calls",
        )


def test_logprobs_are_the_reference_models(stack, tokenizer) -> None:
    """Same rendered prompt, in-process generate(): same tokens, logprobs and alternatives."""
    prompt = tokenizer.encode_segments(render(HELLO, flavor="k2-thinking"))
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3)
    steps = generate(stack.model, [GenerationRequest(prompt, 10, params)])
    reference = [e for step in steps for e in step]
    events = stack.chat(req(sampling=params, max_tokens=10))
    logprobs = [lp for e in events for lp in e.logprobs]
    assert len(logprobs) == len(reference) == 10
    for lp, ref in zip(logprobs, reference, strict=True):
        assert bytes(lp.bytes) == tokenizer.id_to_piece(ref.token_id)
        assert lp.logprob == pytest.approx(ref.logprob, abs=1e-4)
        expected_top = [tokenizer.id_to_piece(i) for i, _ in ref.top_logprobs]
        assert [bytes(b) for _, _, b in lp.top] == expected_top
        assert [v for _, v, _ in lp.top] == pytest.approx(
            [v for _, v in ref.top_logprobs], abs=1e-4
        )


async def decode_idle(stack: Stack) -> None:
    for _ in range(200):
        stats = stack.decode.stats()
        if stats["running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"decode still holds the request: {stats}")


def test_closing_the_stream_frees_the_decode_kv(stack) -> None:
    async def start_then_close() -> None:
        stream = stack.pipeline.chat(req(max_tokens=200, thinking=False))
        async with contextlib.aclosing(stream):
            await anext(stream)
        await decode_idle(stack)

    stack.call(start_then_close())


def test_past_the_request_timeout_the_stream_ends_and_frees_the_decode_kv(stack) -> None:
    """The gateway's limits.request_timeout_s bounds every backend call of a request."""
    stack.pipeline.timeout_s = 0.1
    try:
        with pytest.raises(DeadlineExceeded):
            stack.chat(req(max_tokens=DECODE_BLOCKS * BLOCK_SIZE - 64, thinking=False))
    finally:
        stack.pipeline.timeout_s = 600.0
    stack.call(decode_idle(stack))


@pytest.mark.parametrize(
    "request_,error",
    [
        (req(tools=(WEATHER,), tool_choice="get_time"), InvalidArgument),
        (req(tool_choice="required"), InvalidArgument),
        (req(messages=()), InvalidArgument),
        (req(max_tokens=9000), OutOfRange),
        (req(sampling=SamplingParams(temperature=0.0, logit_bias={5000: 1.0})), InvalidArgument),
        (
            req(
                tools=(
                    Tool("f", None, {"type": "object", "properties": {"x": {"type": "widget"}}}),
                ),
                tool_choice="f",
            ),
            InvalidArgument,
        ),
    ],
)
def test_bad_requests_fail_before_any_event(stack, request_, error) -> None:
    with pytest.raises(error):
        stack.chat(request_)


def test_parallel_tool_calls_false_keeps_only_the_first_call() -> None:
    tracker = CallTracker(parallel=False)
    first = tracker.keep(
        [
            ToolCallDelta(index=0, id="functions.f:0", name="f"),
            ToolCallDelta(index=0, arguments="{}"),
            ToolCallDelta(index=1, id="functions.f:1", name="f"),
        ]
    )
    assert [d.index for d in first] == [0, 0] and tracker.cut
    assert tracker.keep([ToolCallDelta(index=0, error="late")]) == ()
    assert tracker.finish_reason("stop") == "tool_calls"
    broken = CallTracker(parallel=True)
    broken.keep([ToolCallDelta(index=0, id="functions.f:0", name="f")])
    broken.keep([ToolCallDelta(index=0, error="bad JSON")])
    assert broken.finish_reason("length") == "length"
