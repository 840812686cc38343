"""The gRPC Chat API end to end: real tokenizer, prefill and decode processes on the embedded
checkpoint, the Chat server (gateway/grpc_chat.py over gateway/backend.py) in this process, and
a plain grpc client. Greedy text equals in-process generate(); streamed deltas aggregate to the
non-streaming parse; forced tool calls drive a complete tool-call loop; n, stop, logprobs and
usage; a cancelled call frees decode KV; bad requests are INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import grpc
import pytest

from gateway.auth import ApiKey, KeyRing, Profile
from gateway.backend import TokenizerBackend
from gateway.grpc_chat import start_chat_server
from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from k2model.text.chat_format import render
from k2model.text.messages import Message
from k2model.text.pieces import decode_pieces, split_markers
from k2model.text.tokenizer import Tokenizer
from k2model.text.tool_parser import markers_for, parse_output
from services.pb.k2.v1 import (
    chat_pb2,
    chat_pb2_grpc,
    chat_types_pb2,
    common_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from tests.e2e.client import decode_stats
from tests.e2e.suite_fixtures import start_suite, write_deployment

MODEL = "kimi-k2-embedded"
GREEDY = common_pb2.SamplingParams(temperature=0.0)
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "days": {"type": "integer"}},
    "required": ["city"],
}
WEATHER = chat_types_pb2.Tool(name="get_weather", parameters_json=json.dumps(WEATHER_SCHEMA))
FUNCTION = chat_types_pb2.ToolChoice.FUNCTION
KEY = "sk-test-grpc-chat-0001"
AUTH = (("authorization", f"Bearer {KEY}"),)


class ChatServer:
    """The pipeline and the Chat server on a background event loop; tests use a sync client."""

    def __init__(self, suite: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pipeline, self.running = self._call(self._start(suite.deployment))
        self.channel = grpc.insecure_channel(self.running.address)
        self.stub = chat_pb2_grpc.ChatStub(self.channel)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self, deployment: Any) -> tuple[TokenizerBackend, Any]:
        pipeline = TokenizerBackend([t.target for t in deployment.of_kind("tokenizer")])
        keyring = KeyRing((ApiKey("test", KEY, Profile("all", ("*",), MODEL)),))
        return pipeline, await start_chat_server({MODEL: pipeline}, 4096, keyring)

    async def _stop(self) -> None:
        await self.running.server.stop(None)
        await self.pipeline.close()

    def close(self) -> None:
        self.channel.close()
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    path = write_deployment(tmp_path_factory.mktemp("chat") / "d.yaml")
    s = start_suite(path)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat(suite):
    server = ChatServer(suite)
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_CHECKPOINT)


def user(text: str) -> chat_types_pb2.ChatMessage:
    return chat_types_pb2.ChatMessage(role="user", text=text)


def request(**kw: Any) -> chat_types_pb2.ChatRequest:
    fields = {"model": MODEL, "messages": [user("What is the weather in Paris?")], **kw}
    fields.setdefault("sampling", GREEDY)
    return chat_types_pb2.ChatRequest(**fields)


def run(chat: ChatServer, req: chat_types_pb2.ChatRequest) -> list[chat_types_pb2.ChatEvent]:
    return list(chat.stub.Chat(req, metadata=AUTH, timeout=120))


def aggregate(events: list[chat_types_pb2.ChatEvent], choice: int = 0) -> dict[str, Any]:
    """What a non-streaming client gets: the choice's deltas joined."""
    mine = [e for e in events if e.choice == choice]
    calls: dict[int, dict[str, str]] = {}
    for e in mine:
        for d in e.tool_calls:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": "", "error": ""})
            for key in call:
                call[key] += getattr(d, key)
    [finish] = [e.finish_reason for e in mine if e.finish_reason]
    assert mine[-1].finish_reason == finish  # a choice's last event carries its finish_reason
    return {
        "content": "".join(e.content for e in mine),
        "reasoning": "".join(e.reasoning for e in mine),
        "calls": [calls[i] for i in sorted(calls)],
        "finish": finish,
        "logprobs": [lp for e in mine for lp in e.logprobs],
    }


def test_greedy_text_equals_in_process_generate(chat, tokenizer) -> None:
    messages = [Message("user", "Tell me about the sea.")]
    prompt = tokenizer.encode_segments(render(messages, flavor="k2-thinking"))
    ids = generate_ids(load_model(EMBEDDED_CHECKPOINT), [prompt], 24, stop_ids=tokenizer.stop_ids)
    expected = parse_output(decode_pieces(tokenizer, ids[0], markers_for(True)), reasoning=True)
    events = run(chat, request(messages=[user("Tell me about the sea.")], max_tokens=24))
    got = aggregate(events)
    assert (got["reasoning"], got["content"]) == (expected.reasoning_content, expected.content)
    assert events[-1].usage.prompt_tokens == len(prompt)
    assert events[-1].usage.completion_tokens == len(ids[0])


def test_forced_call_stream_aggregates_to_the_non_streaming_parse(chat) -> None:
    sampling = common_pb2.SamplingParams(temperature=1.0, seed=3, logprobs=True)
    tool_choice = chat_types_pb2.ToolChoice(mode=chat_types_pb2.ToolChoice.REQUIRED)
    events = run(chat, request(tools=[WEATHER], tool_choice=tool_choice, sampling=sampling))
    got = aggregate(events)
    raw = b"".join(lp.bytes for lp in got["logprobs"]).decode()
    # The constraint writes every marker as its control id, and a logprob's bytes spell it.
    parsed = parse_output(split_markers(raw, markers_for(False)), declared={"get_weather"})
    [call] = parsed.tool_calls
    assert got["calls"] == [
        {"id": call.id, "name": call.name, "arguments": call.arguments, "error": ""}
    ]
    assert (got["content"], got["finish"]) == (parsed.content, "tool_calls")
    assert isinstance(json.loads(call.arguments)["city"], str)


def test_tool_call_loop_completes(chat, suite) -> None:
    """named choice -> call -> tool result -> the follow-up renders it and completes; a second
    forced call continues the conversation's numbering."""
    choice = chat_types_pb2.ToolChoice(mode=FUNCTION, function="get_weather")
    sampling = common_pb2.SamplingParams(temperature=0.7, seed=11)
    first = aggregate(run(chat, request(tools=[WEATHER], tool_choice=choice, sampling=sampling)))
    [call] = first["calls"]
    assert (first["finish"], call["id"]) == ("tool_calls", "functions.get_weather:0")
    messages = [
        user("What is the weather in Paris?"),
        chat_types_pb2.ChatMessage(
            role="assistant",
            tool_calls=[
                chat_types_pb2.ToolCall(
                    id=call["id"], name=call["name"], arguments=call["arguments"]
                )
            ],
        ),
        chat_types_pb2.ChatMessage(
            role="tool", text='{"weather": "sunny"}', tool_call_id=call["id"]
        ),
    ]
    target = suite.deployment.of_kind("tokenizer")[0].target
    with grpc.insecure_channel(target) as channel:
        rendered = tokenizer_pb2_grpc.TokenizerStub(channel).Render(
            tokenizer_pb2.RenderRequest(
                messages=messages, tools=[WEATHER], add_generation_prompt=True
            ),
            timeout=30,
        )
    assert '## Return of functions.get_weather:0\n{"weather": "sunny"}' in rendered.prompt_text
    follow = request(messages=messages, tools=[WEATHER], max_tokens=12, thinking=False)
    events = run(chat, follow)
    assert aggregate(events)["finish"] in ("stop", "length", "tool_calls")
    count = chat.stub.CountTokens(follow, metadata=AUTH, timeout=30).prompt_tokens
    assert (
        events[-1].usage.prompt_tokens == count == len(rendered.prompt_ids) + 2
    )  # <think></think>
    again = aggregate(run(chat, request(messages=messages, tools=[WEATHER], tool_choice=choice)))
    assert again["calls"][0]["id"] == "functions.get_weather:1"


def test_n_choices_stop_strings_logprobs_and_usage(chat) -> None:
    sampling = common_pb2.SamplingParams(temperature=1.0, seed=5, logprobs=True, top_logprobs=2)
    events = run(chat, request(n=3, max_tokens=6, sampling=sampling, thinking=False))
    got = [aggregate(events, i) for i in range(3)]
    assert {e.choice for e in events} == {0, 1, 2}
    for g in got:
        assert all(
            len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob for lp in g["logprobs"]
        )
    completion = sum(len(g["logprobs"]) + (g["finish"] == "stop") for g in got)
    assert events[-1].usage.completion_tokens == completion
    assert events[-1].usage.total_tokens == completion + events[-1].usage.prompt_tokens
    assert [e.HasField("usage") for e in events].count(True) == 1

    free = aggregate(run(chat, request(max_tokens=24, thinking=False)))["content"]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    cut = aggregate(run(chat, request(max_tokens=24, thinking=False, stop=[stop])))
    assert (cut["content"], cut["finish"]) == (free[: free.index(stop)], "stop")


def test_cancelled_call_frees_decode_kv(chat, suite) -> None:
    target = suite.deployment.of_kind("decode")[0].target
    call = chat.stub.Chat(request(max_tokens=2000, thinking=False), metadata=AUTH, timeout=120)
    next(call)
    next(call)
    assert asyncio.run(decode_stats(target)).running == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while True:
        stats = asyncio.run(decode_stats(target))
        if stats.running == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            break
        assert time.monotonic() < deadline, f"decode still holds the cancelled request: {stats}"
        time.sleep(0.05)


IMAGE = chat_types_pb2.ChatMessage(
    role="user",
    parts=chat_types_pb2.ContentParts(parts=[chat_types_pb2.ContentPart(image_url="http://x/y")]),
)


@pytest.mark.parametrize(
    "bad",
    [
        request(messages=[]),
        request(n=9),
        request(stop=["a", "b", "c", "d", "e"]),
        request(stop=[""]),
        request(max_tokens=0),
        request(tools=[chat_types_pb2.Tool(name="no spaces")]),
        request(
            tool_choice=chat_types_pb2.ToolChoice(mode=FUNCTION, function="nope"), tools=[WEATHER]
        ),
        request(tool_choice=chat_types_pb2.ToolChoice(mode=chat_types_pb2.ToolChoice.REQUIRED)),
        request(messages=[IMAGE]),
        request(messages=[chat_types_pb2.ChatMessage(role="wizard", text="hi")]),
        request(sampling=common_pb2.SamplingParams(temperature=0.0, logit_bias={5000: 1.0})),
        request(sampling=common_pb2.SamplingParams(temperature=3.0)),
        request(sampling=common_pb2.SamplingParams(top_logprobs=5)),
        request(tools=[chat_types_pb2.Tool(name="f", parameters_json="[1, 2]")]),
    ],
)
def test_bad_requests_are_invalid_argument(chat, bad) -> None:
    with pytest.raises(grpc.RpcError) as info:
        run(chat, bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_model_context_overflow_and_model_list(chat) -> None:
    with pytest.raises(grpc.RpcError) as info:
        run(chat, request(model="gpt-0"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        run(chat, request(max_tokens=8190, messages=[user("x " * 50)]))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    listed = chat.stub.ListModels(chat_pb2.ListModelsRequest(), metadata=AUTH, timeout=10)
    assert list(listed.models) == [MODEL]
