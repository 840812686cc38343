"""Anthropic's /v1/messages (and Moonshot's /anthropic base URL) with the official anthropic SDK
and raw SSE: conversion to the ChatRequest, content blocks, streaming events, errors."""

from __future__ import annotations

import json

import anthropic
import httpx2
import pytest

from k2model.text.messages import TextPart
from services.chat.types import ChatEvent, ResponseFormat, ToolCallDelta, Usage
from services.common import errors as svc
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ScriptedChat
from tests.gateway.rest_server import HTTP, switched

WEATHER = {
    "name": "get_weather",
    "description": "Get weather information.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
HI = [{"role": "user", "content": "hello big world"}]
AUTH = {"x-api-key": ENTERPRISE_KEY}
SDK_HTTP = httpx2.Client(timeout=30)  # the anthropic SDK's own httpx fork


@pytest.fixture(scope="module")
def serve():
    """`serve(fake)` -> the base URL of this module's gateway, now answering from `fake`."""
    with switched() as use:
        yield use


def client(base: str, prefix: str = "") -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=f"{base}{prefix}", api_key=ENTERPRISE_KEY, max_retries=0, http_client=SDK_HTTP
    )


def thinking_then_call(_request) -> list[ChatEvent]:
    return [
        ChatEvent(reasoning="need "),
        ChatEvent(reasoning="weather"),
        ChatEvent(content="Checking."),
        ChatEvent(tool_calls=(ToolCallDelta(0, id="functions.get_weather:0", name="get_weather"),)),
        ChatEvent(tool_calls=(ToolCallDelta(0, arguments='{"city": "Paris"}'),)),
        ChatEvent(finish_reason="tool_calls", usage=Usage(11, 7)),
    ]


def sse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for frame in text.split("\n\n")[:-1]:
        event, data = frame.split("\n")
        assert event.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[len("data: ") :])
        assert payload["type"] == event[len("event: ") :]
        out.append((payload["type"], payload))
    return out


@pytest.mark.parametrize("prefix", ["", "/anthropic"])
def test_message_and_request_conversion(serve, prefix) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    message = client(base, prefix).messages.create(
        model="kimi-k2-instruct",
        max_tokens=50,
        system=[{"type": "text", "text": "Be brief."}],
        messages=HI,
        stop_sequences=["END"],
        metadata={"user_id": "u1"},
        service_tier="auto",
        cache_control={"type": "ephemeral"},
        # the SDK no longer types sampling parameters; the wire format keeps them
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 20},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [(b.type, b.text) for b in message.content] == [("text", "hello big world")]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 3)
    req = fake.requests[0]
    assert [(m.role, m.content) for m in req.messages] == [
        ("system", (TextPart("Be brief."),)),
        ("user", "hello big world"),
    ]
    assert req.sampling.temperature == pytest.approx(0.3)  # Moonshot's x0.6
    assert (req.sampling.top_p, req.sampling.top_k) == (0.9, 20)
    assert (req.stop, req.max_tokens, req.thinking) == (("END",), 50, False)


def test_default_temperature_is_k2s_recommended_0_6(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    client(base).messages.create(model="kimi-k2-instruct", max_tokens=5, messages=HI)
    assert fake.requests[0].sampling.temperature == pytest.approx(0.6)


def test_tool_use_history_thinking_and_tool_results_convert(serve) -> None:
    fake = ScriptedChat()
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "call it", "signature": "s"},
                {"type": "text", "text": "Let me see."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "no"}],
                    "is_error": True,
                },
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
    ]
    base = serve(fake)
    client(base).messages.create(
        model="kimi-k2-instruct", max_tokens=5, messages=history, tools=[WEATHER]
    )
    msgs = fake.requests[0].messages
    assert [m.role for m in msgs] == ["user", "assistant", "tool", "tool", "user"]
    assistant = msgs[1]
    assert assistant.content == (TextPart("Let me see."),)
    assert assistant.reasoning_content == "call it"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in assistant.tool_calls] == [
        ("toolu_1", "get_weather", {"city": "Paris"})
    ]
    assert [(m.tool_call_id, m.content) for m in msgs[2:4]] == [
        ("toolu_1", "Sunny"),
        ("toolu_1", "Error: no"),
    ]
    assert msgs[4].content == (TextPart("and tomorrow?"),)
    assert assistant.partial is False
    assert [t.name for t in fake.requests[0].tools] == ["get_weather"]


@pytest.mark.parametrize(
    ("choice", "internal", "parallel"),
    [
        ({"type": "auto"}, "auto", True),
        ({"type": "any"}, "required", True),
        ({"type": "tool", "name": "get_weather"}, "get_weather", True),
        ({"type": "none"}, "none", True),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
    ],
)
def test_tool_choice_mapping(serve, choice, internal, parallel) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    client(base).messages.create(
        model="kimi-k2-instruct", max_tokens=5, messages=HI, tools=[WEATHER], tool_choice=choice
    )
    assert (fake.requests[0].tool_choice, fake.requests[0].parallel_tool_calls) == (
        internal,
        parallel,
    )


def test_structured_outputs_reach_the_pipeline(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    client(base).messages.create(
        model="kimi-k2-instruct",
        max_tokens=5,
        messages=HI,
        tools=[{**WEATHER, "strict": True}],
        extra_body={"output_format": {"type": "json_schema", "schema": schema}},
    )
    [request] = fake.requests
    assert request.strict_tools == {"get_weather"}
    assert request.response_format == ResponseFormat(schema)


def test_final_assistant_message_is_a_prefill_continued_in_partial_mode(serve) -> None:
    fake = ScriptedChat(
        script=lambda _: [
            ChatEvent(content=" there"),
            ChatEvent(finish_reason="stop", usage=Usage(3, 1)),
        ]
    )
    base = serve(fake)
    message = client(base).messages.create(
        model="kimi-k2-instruct",
        max_tokens=5,
        messages=[*HI, {"role": "assistant", "content": "Hi"}],
    )
    last = fake.requests[0].messages[-1]
    assert (last.role, last.content, last.partial) == ("assistant", "Hi", True)
    assert message.content[0].text == " there"


def test_thinking_config_switches_thinking(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    c = client(base)
    c.messages.create(
        model="kimi-k2-instruct",
        max_tokens=2000,
        messages=HI,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    c.messages.create(
        model="kimi-k2-thinking", max_tokens=5, messages=HI, thinking={"type": "disabled"}
    )
    c.messages.create(model="kimi-k2-thinking", max_tokens=5, messages=HI)
    assert [r.thinking for r in fake.requests] == [True, False, True]


def test_thinking_text_and_tool_use_blocks(serve) -> None:
    base = serve(ScriptedChat(script=thinking_then_call))
    message = client(base).messages.create(
        model="kimi-k2-thinking", max_tokens=50, messages=HI, tools=[WEATHER]
    )
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    thinking, text, call = message.content
    assert thinking.thinking == "need weather" and text.text == "Checking."
    assert (call.id, call.name, call.input) == (
        "functions.get_weather:0",
        "get_weather",
        {"city": "Paris"},
    )
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)


def test_streaming_event_sequence(serve) -> None:
    base = serve(ScriptedChat(script=thinking_then_call))
    body = {"model": "kimi-k2-thinking", "max_tokens": 50, "messages": HI, "stream": True}
    response = HTTP.post(f"{base}/v1/messages", json=body, headers=AUTH)
    with client(base).messages.stream(
        model="kimi-k2-thinking", max_tokens=50, messages=HI
    ) as stream:
        final = stream.get_final_message()
    events = sse_events(response.text)
    assert [t for t, _ in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # fmt: skip
    starts = [e["content_block"] for t, e in events if t == "content_block_start"]
    assert [s["type"] for s in starts] == ["thinking", "text", "tool_use"]
    assert [e["index"] for t, e in events if t.startswith("content_block")] == [
        0,
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
    ]
    deltas = [e["delta"] for t, e in events if t == "content_block_delta"]
    assert deltas[-1] == {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == {"input_tokens": 11, "output_tokens": 7}
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris"}
    assert (final.usage.input_tokens, final.usage.output_tokens, final.stop_reason) == (
        11,
        7,
        "tool_use",
    )


def test_count_tokens(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    counted = client(base, "/anthropic").messages.count_tokens(
        model="kimi-k2-instruct", messages=HI, system="a b"
    )
    assert counted.input_tokens == 5
    assert [t.role for t in fake.requests[0].messages] == ["system", "user"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": HI}, "max_tokens"),
        ({"max_tokens": 5, "messages": []}, "messages"),
        ({"max_tokens": 5, "messages": HI, "temperature": 1.5}, "temperature"),
        ({"max_tokens": 0, "messages": HI}, "max_tokens"),
        (
            {
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
            "messages[0].content",
        ),
        ({"max_tokens": 5, "messages": HI, "stop_sequences": ["a"] * 5}, "stop_sequences"),
        ({"max_tokens": 5, "messages": HI, "tool_choice": {"type": "any"}}, "tool_choice"),
        (
            {"max_tokens": 5, "messages": HI, "tools": [{**WEATHER, "name": "bad name"}]},
            "tools[0].name",
        ),
        ({"max_tokens": 5, "messages": HI, "service": 1}, "service"),
    ],
)
def test_bad_requests_are_400_in_anthropics_shape(serve, body, fragment) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    response = HTTP.post(
        f"{base}/anthropic/v1/messages",
        json={"model": "kimi-k2-instruct", **body},
        headers=AUTH,
    )
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": response.json()["error"]["message"]},
    }
    assert fragment in response.json()["error"]["message"]
    assert fake.requests == []


@pytest.mark.parametrize(
    ("error", "status", "etype"),
    [
        (svc.ResourceExhausted("queue full"), 429, "rate_limit_error"),
        (svc.Unavailable("draining"), 503, "overloaded_error"),
        (svc.OutOfRange("prompt too long"), 400, "invalid_request_error"),
        (RuntimeError("internal detail"), 500, "api_error"),
    ],
)
def test_service_errors_in_anthropics_shape(serve, error, status, etype) -> None:
    base = serve(ScriptedChat(fail_before=error))
    response = HTTP.post(
        f"{base}/v1/messages", json={"max_tokens": 5, "messages": HI}, headers=AUTH
    )
    assert response.status_code == status
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == etype
    assert "internal detail" not in response.text


def test_failure_mid_stream_is_an_error_event(serve) -> None:
    base = serve(ScriptedChat(fail_after=2))
    body = {"max_tokens": 5, "messages": HI, "stream": True}
    response = HTTP.post(f"{base}/v1/messages", json=body, headers=AUTH)
    events = sse_events(response.text)
    assert events[0][0] == "message_start"
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "error": {"type": "api_error", "message": events[-1][1]["error"]["message"]},
        },
    )
    assert "10.0.0.7" not in response.text
