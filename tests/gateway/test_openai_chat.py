"""POST /v1/chat/completions over a real server, with the official OpenAI SDK and raw SSE: what
the pipeline's events become, and what each request field becomes in the ChatRequest."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from k2model.text.messages import TextPart
from services.chat.types import ChatEvent, ChatRequest, TokenLogprob, ToolCallDelta, Usage
from services.common import errors as svc
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ORDINARY_KEY, ScriptedChat
from tests.gateway.rest_server import HTTP, switched

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather information.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
USER = [{"role": "user", "content": "hello big world"}]


@pytest.fixture(scope="module")
def serve():
    """`serve(fake)` -> the base URL of this module's gateway, now answering from `fake`."""
    with switched() as use:
        yield use


def sse_data(text: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing: each frame is one `data:` line
    followed by a blank line."""
    frames = text.split("\n\n")
    assert frames[-1] == ""
    assert all(f.startswith("data: ") and "\n" not in f for f in frames[:-1])
    return [f[len("data: ") :] for f in frames[:-1]]


def client(base: str, key: str = ENTERPRISE_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=HTTP)


def post(base: str, body: object, key: str = ENTERPRISE_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return HTTP.post(f"{base}/v1/chat/completions", json=body, headers=headers)


def scripted(*events: ChatEvent) -> ScriptedChat:
    return ScriptedChat(script=lambda _: list(events))


def test_reply_and_usage_come_from_the_pipeline(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    reply = client(base).chat.completions.create(model="kimi-k2-instruct", messages=USER)
    assert reply.object == "chat.completion"
    assert reply.model == "kimi-k2-instruct"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == "hello big world"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 3)
    assert reply.usage.total_tokens == 6
    assert fake.finished == [reply.id]


def test_every_field_reaches_the_chat_request(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    client(base).chat.completions.create(
        model="kimi-k2-instruct",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}],
            }
        ],
        temperature=0.3,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"5": 10, "7": -100},
        seed=-1,
        stop=["x", "yy"],
        max_completion_tokens=7,
        n=2,
        logprobs=True,
        top_logprobs=3,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1},
    )
    req: ChatRequest = fake.requests[-1]
    s = req.sampling
    assert req.messages[0].content == (TextPart("a "), TextPart("b"))
    assert (s.temperature, s.top_p, s.presence_penalty, s.frequency_penalty) == (
        0.3,
        0.9,
        0.5,
        -0.5,
    )
    assert s.logit_bias == ((5, 10.0), (7, -100.0))
    assert s.seed == 2**64 - 1  # int64 -1, two's complement
    assert (s.logprobs, s.top_logprobs, s.top_k, s.min_p, s.repetition_penalty) == (
        True,
        3,
        5,
        0.1,
        1.1,
    )
    assert req.stop == ("x", "yy")
    assert (req.max_tokens, req.n) == (7, 2)
    assert [t.name for t in req.tools] == ["get_weather"]
    assert req.tools[0].parameters == WEATHER["function"]["parameters"]
    assert req.tool_choice == "get_weather"
    assert req.parallel_tool_calls is False
    assert req.thinking is False  # the registry's kimi-k2-instruct
    assert req.request_id.startswith("chatcmpl-")


def test_defaults_follow_the_key_profile_and_the_model(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    ordinary = post(base, {"messages": USER}, ORDINARY_KEY).json()
    enterprise = post(base, {"messages": USER}, ENTERPRISE_KEY).json()
    post(base, {"messages": USER, "model": "kimi-k2-thinking", "thinking": {"type": "disabled"}})
    post(base, {"messages": USER, "max_tokens": 9})
    instruct, thinking, thinking_off, legacy_max = fake.requests
    assert ordinary["model"] == "kimi-k2-instruct" and enterprise["model"] == "kimi-k2-thinking"
    assert (instruct.thinking, instruct.sampling.temperature) == (False, 0.6)
    assert (thinking.thinking, thinking.sampling.temperature) == (True, 1.0)
    assert thinking_off.thinking is False
    assert (instruct.n, instruct.max_tokens, instruct.tool_choice, instruct.stop) == (
        1,
        None,
        "auto",
        (),
    )
    assert legacy_max.max_tokens == 9


def test_stream_frames_and_include_usage(serve) -> None:
    base = serve(ScriptedChat())
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    response = post(base, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_data(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello big world"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_stream_without_include_usage_has_no_usage_key_and_n_choices(serve) -> None:
    base = serve(ScriptedChat())
    stream = client(base).chat.completions.create(
        messages=USER, model="kimi-k2-instruct", n=2, stream=True
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == "hello big world"
        assert mine[-1].finish_reason == "stop"


def test_reasoning_content_non_streaming_and_streaming(serve) -> None:
    fake = scripted(
        ChatEvent(reasoning="think "),
        ChatEvent(reasoning="hard"),
        ChatEvent(content="42"),
        ChatEvent(finish_reason="stop", usage=Usage(5, 3)),
    )
    base = serve(fake)
    reply = client(base).chat.completions.create(messages=USER, model="kimi-k2-thinking")
    chunks = list(
        client(base).chat.completions.create(messages=USER, model="kimi-k2-thinking", stream=True)
    )
    assert reply.choices[0].message.reasoning_content == "think hard"
    assert reply.choices[0].message.content == "42"
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "think hard"
    assert "".join(d.content or "" for d in deltas) == "42"


def call_events(*, invalid_second: bool) -> list[ChatEvent]:
    return [
        ChatEvent(content="Let me check."),
        ChatEvent(tool_calls=(ToolCallDelta(0, id="functions.get_weather:0", name="get_weather"),)),
        ChatEvent(tool_calls=(ToolCallDelta(0, arguments='{"city": '),)),
        ChatEvent(tool_calls=(ToolCallDelta(0, arguments='"Paris"}'),)),
        ChatEvent(tool_calls=(ToolCallDelta(1, id="functions.get_weather:1", name="get_weather"),)),
        ChatEvent(
            tool_calls=(
                ToolCallDelta(
                    1, arguments='{"city": "Rome"', error="bad" if invalid_second else ""
                ),
            )
        ),
        ChatEvent(finish_reason="tool_calls", usage=Usage(9, 12)),
    ]


def test_tool_calls_are_whole_and_invalid_ones_are_dropped(serve) -> None:
    fake = ScriptedChat(script=lambda _: call_events(invalid_second=True))
    base = serve(fake)
    reply = client(base).chat.completions.create(
        messages=USER, model="kimi-k2-instruct", tools=[WEATHER]
    )
    chunks = list(
        client(base).chat.completions.create(
            messages=USER, model="kimi-k2-instruct", tools=[WEATHER], stream=True
        )
    )
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Paris"}')
    ]
    streamed = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()]
    assert [(t.index, t.id, t.function.name, t.function.arguments) for t in streamed] == [
        (0, "functions.get_weather:0", "get_weather", '{"city": "Paris"}')
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_choice_whose_only_call_is_invalid_finishes_stop(serve) -> None:
    events = [
        ChatEvent(tool_calls=(ToolCallDelta(0, id="functions.f:0", name="f", arguments="{"),)),
        ChatEvent(tool_calls=(ToolCallDelta(0, error="arguments are not JSON"),)),
        ChatEvent(finish_reason="tool_calls", usage=Usage(1, 2)),
    ]
    base = serve(scripted(*events))
    reply = client(base).chat.completions.create(messages=USER, model="kimi-k2-instruct")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.tool_calls is None


def test_logprobs(serve) -> None:
    lp = TokenLogprob(
        "hi", -0.25, (104, 105), top=(("hi", -0.25, (104, 105)), ("yo", -1.5, (121, 111)))
    )
    fake = scripted(
        ChatEvent(content="hi", logprobs=(lp,)),
        ChatEvent(finish_reason="length", usage=Usage(1, 1)),
    )
    base = serve(fake)
    reply = client(base).chat.completions.create(
        messages=USER, model="kimi-k2-instruct", logprobs=True, top_logprobs=2
    )
    plain = client(base).chat.completions.create(messages=USER, model="kimi-k2-instruct")
    (token,) = reply.choices[0].logprobs.content
    assert (token.token, token.logprob, token.bytes) == ("hi", -0.25, [104, 105])
    assert [(t.token, t.logprob) for t in token.top_logprobs] == [("hi", -0.25), ("yo", -1.5)]
    assert reply.choices[0].finish_reason == "length"
    assert plain.choices[0].logprobs is None


def test_partial_mode_passes_the_prefix_as_an_open_assistant_turn(serve) -> None:
    fake = scripted(ChatEvent(content=" world"), ChatEvent(finish_reason="stop", usage=Usage(4, 1)))
    messages = [*USER, {"role": "assistant", "content": "Hello", "partial": True, "name": "Kimi"}]
    base = serve(fake)
    reply = post(base, {"messages": messages, "model": "kimi-k2-instruct"}).json()
    last = fake.requests[-1].messages[-1]
    assert (last.role, last.content, last.partial, last.name) == (
        "assistant",
        "Hello",
        True,
        "Kimi",
    )
    assert reply["choices"][0]["message"]["content"] == " world"


def test_sdk_round_trips_a_response_message_into_the_history(serve) -> None:
    """The seed's tool loop appends `choice.message` (an SDK object) to the messages."""
    fake = ScriptedChat(script=lambda _: call_events(invalid_second=False))
    base = serve(fake)
    sdk = client(base)
    first = sdk.chat.completions.create(messages=USER, model="kimi-k2-instruct", tools=[WEATHER])
    history = [*USER, first.choices[0].message]
    for call in first.choices[0].message.tool_calls:
        history.append(
            {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": "{}"}
        )
    sdk.chat.completions.create(messages=history, model="kimi-k2-instruct", tools=[WEATHER])
    sent = fake.requests[-1].messages
    assert [m.role for m in sent] == ["user", "assistant", "tool", "tool"]
    assert [c.id for c in sent[1].tool_calls] == [
        "functions.get_weather:0",
        "functions.get_weather:1",
    ]


@pytest.mark.parametrize(
    ("error", "status", "etype", "code", "param"),
    [
        (
            svc.InvalidArgument("messages[1].tool_call_id: no such call"),
            400,
            "invalid_request_error",
            "invalid_value",
            "messages[1].tool_call_id",
        ),
        (
            svc.OutOfRange("prompt (9000 tokens) exceeds the context"),
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        ),
        (
            svc.ResourceExhausted("decode queue full"),
            429,
            "rate_limit_exceeded",
            "rate_limit_exceeded",
            None,
        ),
        (
            svc.Unavailable("no decode instance is reachable"),
            503,
            "server_error",
            "service_unavailable",
            None,
        ),
        (svc.DeadlineExceeded("deadline passed"), 504, "server_error", "timeout", None),
        (
            RuntimeError("/srv/k2/secret.py at 10.0.0.7 broke"),
            500,
            "server_error",
            "internal_error",
            None,
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_errors_before_output_are_http_errors(
    serve, error, status, etype, code, param, stream
) -> None:
    base = serve(ScriptedChat(fail_before=error))
    response = post(base, {"messages": USER, "stream": stream})
    assert response.status_code == status
    body = response.json()
    assert body == {
        "error": {"message": body["error"]["message"], "type": etype, "param": param, "code": code}
    }
    assert ("Retry-After" in response.headers) == (status in (429, 503))
    if status == 500:
        assert "10.0.0.7" not in response.text and "secret" not in response.text


def test_failure_mid_stream_is_one_error_frame_then_done(serve) -> None:
    base = serve(ScriptedChat(fail_after=2))
    response = post(base, {"messages": USER, "stream": True})
    payloads = sse_data(response.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "internal_error"
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert "10.0.0.7" not in response.text
    assert "hello big" in "".join(
        json.loads(p)["choices"][0]["delta"].get("content", "") for p in payloads[:-2]
    )
