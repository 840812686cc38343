"""Every limit and bad input of docs/reliability.md section 2: a 4xx in the exact OpenAI shape naming
the parameter, the pipeline never called, and the server healthy afterwards."""

from __future__ import annotations

import json
import time

import pytest

from services.chat.types import ChatEvent
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ScriptedChat, echo, make_config
from tests.gateway.rest_server import HTTP, running

AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}"}
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(**fields) -> dict:
    return {"model": "kimi-k2-instruct", "messages": USER, **fields}


def tool(name: str = "f", parameters: dict | None = None) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "parameters": parameters or {"type": "object"}},
    }


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


BAD_CHAT = {
    "empty messages": (chat(messages=[]), "messages"),
    "no messages": ({"model": "kimi-k2-instruct"}, "messages"),
    "n zero": (chat(n=0), "n"),
    "n over the server ceiling": (chat(n=9), "n"),
    "n over OpenAI's 128": (chat(n=129), "n"),
    "five stop strings": (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    "stop string too long": (chat(stop=["x" * 65]), "stop[0]"),
    "empty stop string": (chat(stop=""), "stop[0]"),
    "stop not a string": (chat(stop=5), "stop"),
    "top_logprobs 21": (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    "top_logprobs negative": (chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    "top_logprobs without logprobs": (chat(top_logprobs=2), "top_logprobs"),
    "logit_bias key not an integer": (chat(logit_bias={"abc": 1}), "logit_bias"),
    "logit_bias negative id": (chat(logit_bias={"-1": 1}), "logit_bias"),
    "logit_bias id outside the vocabulary": (chat(logit_bias={"4096": 1}), "logit_bias"),
    "logit_bias value over 100": (chat(logit_bias={"5": 101}), "logit_bias.5"),
    "logit_bias value not a number": (chat(logit_bias={"5": "x"}), "logit_bias.5"),
    "presence_penalty over 2": (chat(presence_penalty=2.5), "presence_penalty"),
    "frequency_penalty under -2": (chat(frequency_penalty=-3), "frequency_penalty"),
    "temperature negative": (chat(temperature=-0.1), "temperature"),
    "temperature over 2": (chat(temperature=2.1), "temperature"),
    "temperature a string": (chat(temperature="1"), "temperature"),
    "top_p zero": (chat(top_p=0), "top_p"),
    "top_p over 1": (chat(top_p=1.5), "top_p"),
    "max_tokens zero": (chat(max_tokens=0), "max_tokens"),
    "max_completion_tokens negative": (chat(max_completion_tokens=-1), "max_completion_tokens"),
    "seed over int64": (chat(seed=2**63), "seed"),
    "seed under int64": (chat(seed=-(2**63) - 1), "seed"),
    "seed not an integer": (chat(seed=1.5), "seed"),
    "stream_options without stream": (
        chat(stream_options={"include_usage": True}),
        "stream_options",
    ),
    "stream_options with stream false": (chat(stream=False, stream_options={}), "stream_options"),
    "129 tools": (chat(tools=[tool(f"t{i}") for i in range(129)]), "tools"),
    "tool name with a space": (chat(tools=[tool("bad name")]), "tools[0].function.name"),
    "tool name of 65 characters": (chat(tools=[tool("a" * 65)]), "tools[0].function.name"),
    "duplicate tool names": (chat(tools=[tool(), tool()]), "tools[1]"),
    "tool schema too deep": (chat(tools=[tool(parameters=nested(17))]), "tools[0]"),
    "tool schemas too large": (
        chat(tools=[tool(f"t{i}", {"description": "x" * 40_000}) for i in range(2)]),
        "tools[1]",
    ),
    "tool_choice required without tools": (chat(tool_choice="required"), "tool_choice"),
    "tool_choice names a missing tool": (
        chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
        "tool_choice",
    ),
    "tool_choice names a mode": (
        chat(tools=[tool("auto")], tool_choice={"type": "function", "function": {"name": "auto"}}),
        "tool_choice.function.name",
    ),
    "tool_choice unknown mode": (chat(tool_choice="sometimes"), "tool_choice"),
    "json_schema without a schema": (
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        "response_format.json_schema.schema",
    ),
    "image content": (
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ]
        ),
        "messages[0].content[0]",
    ),
    "unknown field": (chat(frobnicate=1), "frobnicate"),
    "unknown role": (chat(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    "user message without content": (chat(messages=[{"role": "user"}]), "messages[0]"),
    "tool message without tool_call_id": (
        chat(messages=[*USER, {"role": "tool", "content": "x"}]),
        "messages[1].tool_call_id",
    ),
    "partial message not last": (
        chat(messages=[{"role": "assistant", "content": "x", "partial": True}, *USER]),
        "messages[0].partial",
    ),
    "refusal beside content": (
        chat(messages=[{"role": "assistant", "content": "x", "refusal": "no"}, *USER]),
        "messages[0].refusal",
    ),
}

BAD_COMPLETIONS = {
    "empty prompt": ({"prompt": ""}, "prompt[0]"),
    "an empty prompt in a list": ({"prompt": ["a", ""]}, "prompt[1]"),
    "no prompts": ({"prompt": []}, "prompt"),
    "a negative token id": ({"prompt": [1, -2]}, "prompt"),
    "prompts x n over max_n": ({"prompt": ["a"] * 5, "n": 2}, "prompt"),
    "echo with logprobs": ({"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
    "suffix": ({"prompt": "a", "suffix": "z"}, "suffix"),
    "best_of other than n": ({"prompt": "a", "best_of": 3}, "best_of"),
    "logprobs over 5": ({"prompt": "a", "logprobs": 6}, "logprobs"),
    "max_tokens at the context": ({"prompt": "a", "max_tokens": 8192}, "messages"),
}


@pytest.fixture(scope="module")
def gateway():
    fake = ScriptedChat()
    with running(fake) as base:
        yield base, fake


def assert_openai_error(
    response, status: int, param: str | None, code: str | None = "invalid_value"
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert (body["error"]["param"], body["error"]["code"]) == (param, code)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT.values(), ids=BAD_CHAT.keys())
def test_bad_chat_request_is_a_400_naming_the_param(gateway, body, param) -> None:
    base, fake = gateway
    before = len(fake.requests)
    response = HTTP.post(f"{base}/v1/chat/completions", json=body, headers=AUTH)
    assert_openai_error(response, 400, param)
    assert len(fake.requests) == before


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETIONS.values(), ids=BAD_COMPLETIONS.keys())
def test_bad_completion_request_is_a_400_naming_the_param(gateway, body, param) -> None:
    base, _ = gateway
    response = HTTP.post(
        f"{base}/v1/completions", json={"model": "kimi-k2-instruct", **body}, headers=AUTH
    )
    code = "context_length_exceeded" if param == "messages" else "invalid_value"
    assert_openai_error(response, 400, param, code)


def test_max_tokens_at_the_context_is_context_length_exceeded(gateway) -> None:
    base, _ = gateway
    response = HTTP.post(f"{base}/v1/chat/completions", json=chat(max_tokens=8192), headers=AUTH)
    assert_openai_error(response, 400, "messages", "context_length_exceeded")
    fits = HTTP.post(f"{base}/v1/chat/completions", json=chat(max_tokens=8191), headers=AUTH)
    assert fits.status_code == 200


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b"5", b'"text"', b"null", b"{not json", b""])
def test_a_body_that_is_not_a_json_object_is_a_400(gateway, raw) -> None:
    base, _ = gateway
    headers = {**AUTH, "Content-Type": "application/json"}
    response = HTTP.post(f"{base}/v1/chat/completions", content=raw, headers=headers)
    assert_openai_error(
        response, 400, None, "invalid_value" if raw not in (b"{not json",) else None
    )


def test_nan_is_not_a_temperature(gateway) -> None:
    base, _ = gateway
    raw = json.dumps(chat())[:-1] + ', "temperature": NaN}'
    headers = {**AUTH, "Content-Type": "application/json"}
    response = HTTP.post(f"{base}/v1/chat/completions", content=raw.encode(), headers=headers)
    assert_openai_error(response, 400, "temperature")


def test_oversize_body_declared_or_chunked_is_413() -> None:
    with running(ScriptedChat(), make_config(max_body_bytes=2048)) as base:
        big = chat(messages=[{"role": "user", "content": "x" * 4096}])
        declared = HTTP.post(f"{base}/v1/chat/completions", json=big, headers=AUTH)
        payload = json.dumps(big).encode()
        chunked = HTTP.post(
            f"{base}/v1/chat/completions",
            content=(payload[i : i + 512] for i in range(0, len(payload), 512)),
            headers={**AUTH, "Content-Type": "application/json"},
        )
        small = HTTP.post(f"{base}/v1/chat/completions", json=chat(), headers=AUTH)
        anthropic = HTTP.post(f"{base}/v1/messages", json={"x": "y" * 4096}, headers=AUTH)
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert small.status_code == 200
    assert anthropic.status_code == 413
    assert anthropic.json() == {
        "type": "error",
        "error": {"type": "request_too_large", "message": anthropic.json()["error"]["message"]},
    }


def test_oversize_headers_are_431(gateway) -> None:
    base, _ = gateway
    response = HTTP.post(
        f"{base}/v1/chat/completions", json=chat(), headers={**AUTH, "X-Padding": "p" * 20_000}
    )
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_too_large"


def test_past_max_concurrent_requests_is_429_with_retry_after() -> None:
    fake = ScriptedChat(
        script=lambda r: [ChatEvent(content=f"{i} ") for i in range(500)] + echo(r), delay_s=0.02
    )
    with running(fake, make_config(max_concurrent_requests=1)) as base:
        url = f"{base}/v1/chat/completions"
        with HTTP.stream("POST", url, json=chat(stream=True), headers=AUTH) as held:
            lines = held.iter_lines()  # kept: dropping the iterator closes the response
            next(lines)  # the first request is admitted and streaming
            refused = HTTP.post(url, json=chat(), headers=AUTH)
        assert wait_for_no_flight(base)
        fake.delay_s = 0
        after = HTTP.post(url, json=chat(), headers=AUTH)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    assert after.status_code == 200


def wait_for_no_flight(base: str) -> bool:
    for _ in range(500):
        if "k2_gateway_requests_in_flight 0.0" in HTTP.get(f"{base}/metrics").text:
            return True
        time.sleep(0.01)
    return False


def test_server_stays_healthy_after_the_bad_inputs(gateway) -> None:
    base, _ = gateway
    assert HTTP.get(f"{base}/health").status_code == 200
    reply = HTTP.post(
        f"{base}/v1/chat/completions",
        json=chat(messages=[{"role": "user", "content": "still here"}]),
        headers=AUTH,
    )
    assert reply.json()["choices"][0]["message"]["content"] == "still here"
