"""The other OpenAI-compatible routes (completions, models, Moonshot's token count), /health,
/metrics, and cancellation when the client goes away."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from gateway.metrics import DecodeLoad
from services.chat.types import ChatEvent, TokenLogprob, Usage
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ORDINARY_KEY, ScriptedChat, echo
from tests.gateway.rest_server import HTTP, running, switched

AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}"}
USER = [{"role": "user", "content": "hello big world"}]


@pytest.fixture(scope="module")
def serve():
    """`serve(fake)` -> the base URL of this module's gateway, now answering from `fake`."""
    with switched() as use:
        yield use


def client(base: str, key: str = ENTERPRISE_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=HTTP)


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_completions_render_the_prompt_as_one_user_turn(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    reply = client(base).completions.create(model="kimi-k2-instruct", prompt="say this please", n=2)
    streamed = list(
        client(base).completions.create(model="kimi-k2-instruct", prompt=["go on"], stream=True)
    )
    first, second = fake.requests
    assert [(m.role, m.content) for m in first.messages] == [("user", "say this please")]
    assert (first.n, first.max_tokens, first.thinking) == (2, 16, False)  # OpenAI's default 16
    assert reply.object == "text_completion"
    assert [c.text for c in reply.choices] == ["say this please"] * 2
    assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 6)
    assert second.messages[0].content == "go on"
    assert "".join(c.choices[0].text for c in streamed) == "go on"
    assert {c.object for c in streamed} == {"text_completion"}
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_list_of_prompts_is_n_choices_per_prompt_in_order(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    reply = client(base).completions.create(
        model="kimi-k2-instruct", prompt=["one two", "three"], n=2
    )
    streamed = list(
        client(base).completions.create(
            model="kimi-k2-instruct",
            prompt=["one two", "three"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert sorted(r.messages[0].content for r in fake.requests[:2]) == ["one two", "three"]
    assert [(c.index, c.text) for c in reply.choices] == [
        (0, "one two"),
        (1, "one two"),
        (2, "three"),
        (3, "three"),
    ]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 6)
    texts: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {0: "one two", 1: "three"}
    assert streamed[-1].usage.completion_tokens == 3 and not streamed[-1].choices


def test_token_id_prompts_and_echo_reach_the_pipeline(serve) -> None:
    fake = ScriptedChat()
    base = serve(fake)
    client(base).completions.create(model="kimi-k2-instruct", prompt=[5, 6, 7], echo=True)
    client(base).completions.create(model="kimi-k2-instruct", prompt=[[1], [2, 3]])
    single, *pair = fake.requests
    assert (single.prompt_ids, single.messages, single.echo) == ((5, 6, 7), (), True)
    assert sorted(r.prompt_ids for r in pair) == [(1,), (2, 3)]


def test_completion_logprobs_use_the_legacy_shape(serve) -> None:
    tokens = (
        TokenLogprob("ab", -0.5, (97, 98), top=(("ab", -0.5, (97, 98)), ("x", -2.0, (120,)))),
        TokenLogprob("c", -0.1, (99,), top=(("c", -0.1, (99,)),)),
    )
    fake = ScriptedChat(
        script=lambda _: [
            ChatEvent(content="abc", logprobs=tokens),
            ChatEvent(finish_reason="length", usage=Usage(1, 2)),
        ]
    )
    base = serve(fake)
    reply = client(base).completions.create(model="kimi-k2-instruct", prompt="p", logprobs=2)
    assert fake.requests[0].sampling.logprobs and fake.requests[0].sampling.top_logprobs == 2
    lp = reply.choices[0].logprobs
    assert lp.tokens == ["ab", "c"]
    assert lp.token_logprobs == [-0.5, -0.1]
    assert lp.top_logprobs == [{"ab": -0.5, "x": -2.0}, {"c": -0.1}]
    assert lp.text_offset == [0, 2]


def test_models_list_the_keys_models_default_first(serve) -> None:
    base = serve(ScriptedChat())
    enterprise = [m.id for m in client(base).models.list().data]
    ordinary = [m.id for m in client(base, ORDINARY_KEY).models.list().data]
    card = client(base).models.retrieve("kimi-k2-instruct")
    with pytest.raises(openai.PermissionDeniedError):
        client(base, ORDINARY_KEY).models.retrieve("kimi-k2-thinking")
    with pytest.raises(openai.NotFoundError):
        client(base).models.retrieve("gpt-4o")
    assert enterprise == ["kimi-k2-thinking", "kimi-k2-instruct"]
    assert ordinary == ["kimi-k2-instruct"]
    assert (card.id, card.object, card.owned_by) == ("kimi-k2-instruct", "model", "k2serve")


def test_estimate_token_count_like_moonshot(serve) -> None:
    fake = ScriptedChat()
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    base = serve(fake)
    body = {
        "model": "kimi-k2-instruct",
        "messages": [*USER, {"role": "assistant", "content": "a b"}],
        "tools": tools,
    }
    response = HTTP.post(f"{base}/v1/tokenizers/estimate-token-count", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"data": {"total_tokens": 5}}
    assert [t.name for t in fake.requests[0].tools] == ["f"]


def test_health_and_metrics_need_no_key() -> None:
    async def stats():
        return [DecodeLoad("decode-0", 3, 5, 200, 50, device="cpu", ops="cpu", dtype="float32")]

    with running(ScriptedChat(), decode_stats=stats) as base:
        client(base).chat.completions.create(model="kimi-k2-instruct", messages=USER)
        HTTP.post(f"{base}/v1/chat/completions", json={"messages": []}, headers=AUTH)
        health = HTTP.get(f"{base}/health")
        text = HTTP.get(f"{base}/metrics").text
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert 'k2_gateway_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'k2_gateway_requests_total{route="/v1/chat/completions",status="400"} 1.0' in text
    assert 'k2_gateway_time_to_first_token_seconds_count{model="kimi-k2-instruct"} 1.0' in text
    # three words: one first token, then two inter-token gaps
    assert 'k2_gateway_inter_token_latency_seconds_count{model="kimi-k2-instruct"} 2.0' in text
    assert "k2_gateway_requests_in_flight 0.0" in text
    assert 'k2_decode_queued_requests{instance="decode-0"} 3.0' in text
    assert 'k2_decode_running_requests{instance="decode-0"} 5.0' in text
    assert 'k2_decode_kv_usage_ratio{instance="decode-0"} 0.75' in text
    info = 'k2_decode_backend_info{device="cpu",dtype="float32",instance="decode-0",ops="cpu"} 1.0'
    assert info in text


def long_reply(request):
    return [ChatEvent(content=f" w{i}") for i in range(400)] + echo(request)


def test_client_disconnect_mid_stream_cancels_the_request(serve) -> None:
    fake = ScriptedChat(script=long_reply, delay_s=0.02)  # 8 s if it ran to the end
    base = serve(fake)
    body = {"messages": USER, "stream": True}
    with HTTP.stream("POST", f"{base}/v1/chat/completions", json=body, headers=AUTH) as response:
        lines = response.iter_lines()
        seen = [line for _, line in zip(range(6), lines, strict=False)]
    assert wait_for(lambda: fake.closed_early)
    metrics = HTTP.get(f"{base}/metrics").text
    assert any(json.loads(line[6:])["choices"][0]["delta"].get("content") for line in seen if line)
    assert fake.finished == []
    assert "k2_gateway_requests_in_flight 0.0" in metrics


def test_client_disconnect_while_waiting_cancels_a_non_streaming_request(serve) -> None:
    fake = ScriptedChat(script=long_reply, delay_s=0.02)
    base = serve(fake)
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(f"{base}/v1/chat/completions", json={"messages": USER}, headers=AUTH, timeout=0.5)
    assert wait_for(lambda: fake.closed_early)
    metrics = HTTP.get(f"{base}/metrics").text
    assert fake.finished == []
    assert "k2_gateway_requests_in_flight 0.0" in metrics


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages"])
def test_client_that_leaves_before_the_first_token_frees_its_place(serve, path: str) -> None:
    """Regression: a streaming request still queued (no first token yet)
    kept its place when the client left: 20 clients that gave up after 2 s still cost 16
    prefills. The gateway now watches for the disconnect while it waits."""
    fake = ScriptedChat(delay_s=30.0)  # the first token would come after 30 s
    base = serve(fake)
    body = {
        "/v1/chat/completions": {"messages": USER},
        "/v1/completions": {"prompt": "hi"},
        "/v1/messages": {"messages": USER, "model": "kimi-k2-instruct"},
    }[path] | {"stream": True, "max_tokens": 8}
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(f"{base}{path}", json=body, headers=AUTH, timeout=0.5)
    assert wait_for(lambda: fake.closed_early)
    assert fake.finished == []
    assert wait_for(lambda: "k2_gateway_requests_in_flight 0.0" in HTTP.get(f"{base}/metrics").text)


def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(serve) -> None:
    fake = ScriptedChat(
        script=lambda _: [
            ChatEvent(content="a", usage=Usage(4, 1)),
            ChatEvent(content="b", usage=Usage(4, 2)),
            ChatEvent(finish_reason="stop", usage=Usage(4, 2)),
        ]
    )
    base = serve(fake)
    chunks = list(
        client(base).chat.completions.create(
            model="kimi-k2-instruct",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert fake.requests[0].continuous_usage
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert [c.usage.completion_tokens for c in with_text] == [1, 2]
    assert chunks[-1].usage.completion_tokens == 2 and not chunks[-1].choices
