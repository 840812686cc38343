"""The seed's snippets, unchanged in spirit, against the real suite: tokenizer, prefill and
decode processes (services/launcher.py) behind `python -m gateway`, reached with the official
openai and anthropic SDKs and with curl.

The checkpoint is the embedded tiny K2 (random weights), so texts are gibberish; what is checked
is the contract: shapes, finish reasons, usage, forced tool calls that parse, streaming equal to
non-streaming under greedy sampling, errors, and cancellation reaching decode.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import anthropic
import openai
import pytest

from tests.e2e.client import decode_stats
from tests.gateway.conftest import RunningSuite, openai_client
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ORDINARY_KEY
from tests.gateway.rest_server import HTTP

KEY = ENTERPRISE_KEY
ORDINARY = ORDINARY_KEY
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather information.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name", "maxLength": 20}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def suite(real_suite: RunningSuite):
    """(gateway base URL, Suite)."""
    return real_suite.base, real_suite.backends


def test_list_models_take_the_first_and_stream_text_parts(suite) -> None:
    base, _ = suite
    client = openai_client(base)
    model = client.models.list().data[0].id
    assert model == "kimi-k2-thinking"  # the enterprise profile's default comes first
    messages = [
        {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Please give a brief self-introduction."}],
        },
    ]
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        max_completion_tokens=16,
        temperature=0,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    reply = client.chat.completions.create(
        model=model, messages=messages, max_completion_tokens=16, temperature=0
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = "".join(
        (getattr(d, "reasoning_content", None) or "") + (d.content or "") for d in deltas
    )
    whole = (getattr(reply.choices[0].message, "reasoning_content", None) or "") + (
        reply.choices[0].message.content or ""
    )
    assert streamed == whole and whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[
        0
    ].finish_reason
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = chunks[-1].usage
    assert usage.completion_tokens <= 16 and usage.prompt_tokens == reply.usage.prompt_tokens > 0


def get_weather(city: str) -> dict:
    return {"city": city, "weather": "Sunny"}


def test_tool_call_loop_until_the_finish_is_not_tool_calls(suite) -> None:
    """The seed's loop. tool_choice forces the call on the first turn (the pipeline constrains
    the output to a schema-valid call) and forbids calls once the result is in."""
    base, _ = suite
    client = openai_client(base, ORDINARY)
    messages: list = [{"role": "user", "content": "What's the weather like in Beijing today?"}]
    finish_reason, turns = None, 0
    while finish_reason is None or finish_reason == "tool_calls":
        called = any(m["role"] == "tool" for m in messages if isinstance(m, dict))
        completion = client.chat.completions.create(
            model="kimi-k2-instruct",
            messages=messages,
            temperature=0.6,
            tools=[WEATHER_TOOL],
            tool_choice="none"
            if called
            else {"type": "function", "function": {"name": "get_weather"}},
            max_tokens=64,
        )
        choice = completion.choices[0]
        finish_reason = choice.finish_reason
        turns += 1
        if finish_reason == "tool_calls":
            messages.append(choice.message)
            for tool_call in choice.message.tool_calls:
                arguments = json.loads(tool_call.function.arguments)
                result = {"get_weather": get_weather}[tool_call.function.name](**arguments)
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": tool_call.id,
                        "name": tool_call.function.name,
                        "content": json.dumps(result),
                    }
                )
    assert turns == 2
    assert finish_reason in ("stop", "length")
    assert messages[1].tool_calls[0].id == "functions.get_weather:0"
    assert isinstance(json.loads(messages[2]["content"])["city"], str)
    assert not choice.message.tool_calls


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_bearer_key(suite) -> None:
    base, _ = suite
    body = json.dumps(
        {
            "model": "kimi-k2-instruct",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
        }
    )

    def curl(*args: str) -> str:
        return subprocess.run(
            ["curl", "-sS", *args], capture_output=True, text=True, timeout=60, check=True
        ).stdout

    auth = ["-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json"]
    reply = json.loads(curl(*auth, "-d", body, f"{base}/v1/chat/completions"))
    stream = curl(
        "-N",
        *auth,
        "-d",
        body.replace('"max_tokens"', '"stream": true, "max_tokens"'),
        f"{base}/v1/chat/completions",
    )
    refused = json.loads(
        curl("-d", body, "-H", "Content-Type: application/json", f"{base}/v1/chat/completions")
    )
    models = json.loads(curl("-H", f"Authorization: Bearer {KEY}", f"{base}/v1/models"))
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 8
    assert stream.rstrip().endswith("data: [DONE]")
    assert refused["error"]["code"] == "invalid_api_key"
    assert [m["id"] for m in models["data"]] == ["kimi-k2-thinking", "kimi-k2-instruct"]


@pytest.mark.parametrize("prefix", ["", "/anthropic"])
def test_anthropic_sdk(suite, prefix) -> None:
    base, _ = suite
    client = anthropic.Anthropic(base_url=f"{base}{prefix}", api_key=KEY, max_retries=0)
    message = client.messages.create(
        model="kimi-k2-instruct",
        max_tokens=12,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hi"}],
    )
    with client.messages.stream(
        model="kimi-k2-instruct", max_tokens=12, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        final = stream.get_final_message()
    counted = client.messages.count_tokens(
        model="kimi-k2-instruct", system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.content and message.content[0].type == "text"
    assert (
        message.usage.output_tokens <= 12 and message.usage.input_tokens == counted.input_tokens > 0
    )
    assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens <= 12


def test_token_count_matches_the_prompt_tokens_used(suite) -> None:
    base, _ = suite
    body = {
        "model": "kimi-k2-instruct",
        "messages": [{"role": "user", "content": "count me please"}],
        "tools": [WEATHER_TOOL],
    }
    auth = {"Authorization": f"Bearer {KEY}"}
    counted = HTTP.post(
        f"{base}/v1/tokenizers/estimate-token-count", json=body, headers=auth
    ).json()
    used = HTTP.post(
        f"{base}/v1/chat/completions", json={**body, "max_tokens": 2}, headers=auth
    ).json()
    assert counted["data"]["total_tokens"] == used["usage"]["prompt_tokens"] > 0


def test_context_limits_through_the_pipeline(suite) -> None:
    base, _ = suite
    auth = {"Authorization": f"Bearer {KEY}"}
    too_long = {
        "model": "kimi-k2-instruct",
        "messages": [{"role": "user", "content": "hello " * 9000}],
    }
    at_edge = {
        "model": "kimi-k2-instruct",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8190,
    }
    for body in (too_long, at_edge):
        response = HTTP.post(f"{base}/v1/chat/completions", json=body, headers=auth)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
    assert HTTP.get(f"{base}/health").status_code == 200


def idle(target: str) -> bool:
    stats = asyncio.run(decode_stats(target))
    return (
        stats.running == 0 and stats.queued == 0 and stats.kv_blocks_free == stats.kv_blocks_total
    )


def test_a_client_disconnect_cancels_down_to_decode(suite) -> None:
    base, backends = suite
    target = backends.deployment.of_kind("decode")[0].target
    body = {
        "model": "kimi-k2-instruct",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 900,
        "stream": True,
    }
    with HTTP.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        lines = r.iter_lines()
        [next(lines) for _ in range(4)]
        assert asyncio.run(decode_stats(target)).running == 1
    deadline = time.monotonic() + 20
    while not idle(target):
        assert time.monotonic() < deadline, "decode still holds the cancelled request"
        time.sleep(0.05)
    assert "k2_gateway_requests_in_flight 0.0" in HTTP.get(f"{base}/metrics").text


def test_concurrent_long_requests_against_a_small_kv_pool_all_finish(suite) -> None:
    """4 x (prompt + 300 tokens) do not fit decode's 1,024-token pool at once: the scheduler
    must preempt and resume, and every request must finish with its full length."""
    base, backends = suite
    target = backends.deployment.of_kind("decode")[0].target
    preempted = asyncio.run(decode_stats(target)).preemptions

    async def run() -> list[dict]:
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        replies = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model="kimi-k2-instruct",
                    messages=[{"role": "user", "content": f"story {i}"}],
                    max_tokens=300,
                    logit_bias={
                        str(tid): -100 for tid in range(3840, 4096)
                    },  # no special ids: no early stop
                )
                for i in range(4)
            )
        )
        await client.close()
        return replies

    replies = asyncio.run(run())
    assert asyncio.run(decode_stats(target)).preemptions > preempted
    assert [r.choices[0].finish_reason for r in replies] == ["length"] * 4
    assert [r.usage.completion_tokens for r in replies] == [300] * 4


def test_grpc_chat_api_beside_rest_gives_the_same_text(real_suite: RunningSuite) -> None:
    """Internal gRPC clients reach the same models and the same code path as REST."""
    import grpc

    from services.pb.k2.v1 import chat_pb2, chat_pb2_grpc, chat_types_pb2, common_pb2

    base, grpc_port = real_suite.base, real_suite.grpc_port
    rest = openai_client(base).chat.completions.create(
        model="kimi-k2-instruct",
        messages=[{"role": "user", "content": "Say hi."}],
        max_completion_tokens=12,
        temperature=0,
    )

    async def over_grpc() -> tuple[list[str], str, str]:
        auth = (("authorization", f"Bearer {KEY}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            models = await stub.ListModels(chat_pb2.ListModelsRequest(), metadata=auth, timeout=30)
            request = chat_types_pb2.ChatRequest(
                model="kimi-k2-instruct",
                messages=[chat_types_pb2.ChatMessage(role="user", text="Say hi.")],
                max_tokens=12,
                sampling=common_pb2.SamplingParams(temperature=0.0),
            )
            text, reason = "", ""
            async for event in stub.Chat(request, metadata=auth, timeout=60):
                text += event.content
                reason = event.finish_reason or reason
            return list(models.models), text, reason

    models, text, reason = asyncio.run(over_grpc())
    assert "kimi-k2-instruct" in models
    assert text == rest.choices[0].message.content
    assert reason == rest.choices[0].finish_reason
