"""The field policy (README, gateway/field_policy.py): ignored fields change nothing and are
counted, honoured ones do what they say, refused ones name the field and the reason."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.field_policy import declared_ignored, ignored_fields
from gateway.openai_models import ChatCompletionRequest, CompletionRequest
from gateway.responses_models import ResponsesRequest
from services.chat.types import ResponseFormat as AnswerFormat
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ScriptedChat
from tests.gateway.rest_server import HTTP, running
from tests.gateway.test_limits import assert_openai_error

ROOT = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}"}
USER = {"role": "user", "content": "hello there"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# One value of every ignored field, where a client puts it.
IGNORED_TOP = {
    "store": True,
    "metadata": {"team": "search"},
    "service_tier": "flex",
    "prompt_cache_key": "user-42",
    "prompt_cache_retention": "24h",
    "user": "u-1",
    "safety_identifier": "hash-1",
    "verbosity": "low",
    "prediction": {"type": "content", "content": "old text"},
}
HISTORY = [
    {"role": "system", "content": "be brief", "cache_control": {"type": "ephemeral"}},
    {
        "role": "user",
        "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
    },
    {
        "role": "assistant",
        "content": None,
        "annotations": [],
        "tool_calls": [
            {
                "index": 0,
                "id": "c1",
                "type": "function",
                "function": {"name": "f", "arguments": "{}"},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    USER,
]
PLAIN_HISTORY = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    USER,
]


@pytest.fixture(scope="module")
def gateway():
    fake = ScriptedChat()
    with running(fake) as base:
        yield base, fake


def post(base: str, body: dict, route: str = "/v1/chat/completions"):
    return HTTP.post(f"{base}{route}", json=body, headers=AUTH)


def chat(**fields) -> dict:
    return {"model": "kimi-k2-instruct", "messages": [USER], **fields}


def test_readme_table_lists_exactly_the_ignored_fields() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Field policy", 1)[1].split("\n\n", 3)[2]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    documented = {f for row in rows for f in re.findall(r"`([^`]+)`", row.split("|")[1])}
    declared = (
        declared_ignored(ChatCompletionRequest)
        | declared_ignored(CompletionRequest)
        | declared_ignored(ResponsesRequest)
    )
    assert documented == declared


def test_ignored_fields_change_nothing_and_are_counted(gateway) -> None:
    base, fake = gateway
    tool = {**TOOL, "cache_control": {"type": "ephemeral"}}
    loaded = chat(
        messages=HISTORY,
        tools=[tool],
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        **IGNORED_TOP,
    )
    plain = chat(
        messages=PLAIN_HISTORY, tools=[TOOL], stream=True, stream_options={"include_usage": True}
    )
    first, second = post(base, loaded), post(base, plain)
    assert first.status_code == second.status_code == 200, first.text
    assert first.text.count("data:") == second.text.count("data:")
    seen = [replace(r, request_id="") for r in fake.requests[-2:]]
    assert seen[0] == seen[1]  # the pipeline saw the same request
    metrics = HTTP.get(f"{base}/metrics").text
    counted = set(
        re.findall(
            r'k2_gateway_ignored_fields_total\{field="([^"]+)",route="/v1/chat/completions"\} 1\.0',
            metrics,
        )
    )
    assert counted == declared_ignored(ChatCompletionRequest)


def test_ignored_fields_collects_schema_paths() -> None:
    body = ChatCompletionRequest.model_validate(chat(messages=HISTORY, store=False))
    assert ignored_fields(body) == {
        "store",
        "messages[].cache_control",
        "messages[].content[].cache_control",
        "messages[].annotations",
        "messages[].tool_calls[].index",
    }
    assert ignored_fields(ChatCompletionRequest.model_validate(chat())) == set()


@pytest.mark.parametrize(
    ("fields", "thinking"),
    [
        ({"reasoning_effort": "none"}, False),
        ({"reasoning_effort": "minimal"}, False),
        ({"reasoning_effort": "high"}, True),
        ({"reasoning_effort": "low", "thinking": {"type": "enabled"}}, True),
        ({"thinking": {"type": "disabled"}}, False),
        ({}, False),  # kimi-k2-instruct's entry: thinking off
    ],
)
def test_reasoning_controls_map_to_thinking(gateway, fields, thinking) -> None:
    base, fake = gateway
    assert post(base, chat(**fields)).status_code == 200
    assert fake.requests[-1].thinking is thinking


def test_max_completion_tokens_wins_over_max_tokens(gateway) -> None:
    base, fake = gateway
    assert post(base, chat(max_tokens=5, max_completion_tokens=7)).status_code == 200
    assert fake.requests[-1].max_tokens == 7


WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "w", "parameters": WEATHER_SCHEMA}}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"tools": [{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}]},
            {"strict_tools": frozenset({"w"})},
        ),
        ({"tools": [WEATHER_TOOL]}, {"strict_tools": frozenset()}),
        ({"response_format": {"type": "text"}}, {"response_format": None}),
        ({"response_format": {"type": "json_object"}}, {"response_format": AnswerFormat()}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "w", "schema": WEATHER_SCHEMA, "strict": True},
                }
            },
            {"response_format": AnswerFormat(WEATHER_SCHEMA)},
        ),
        ({"thinking": {"type": "enabled", "keep": "all"}}, {"keep_reasoning": True}),
        ({"min_tokens": 3, "ignore_eos": True}, {"min_tokens": 3, "ignore_eos": True}),
    ],
)
def test_output_controls_are_honoured(gateway, fields, expected) -> None:
    base, fake = gateway
    assert post(base, chat(**fields)).status_code == 200
    request = fake.requests[-1]
    assert {k: getattr(request, k) for k in expected} == expected


def test_a_refusal_in_history_is_that_reply_s_text(gateway) -> None:
    base, fake = gateway
    history = [USER, {"role": "assistant", "content": None, "refusal": "I can't help"}, USER]
    assert post(base, chat(messages=history)).status_code == 200
    assert fake.requests[-1].messages[1].content == "I can't help"


REFUSED = {
    "effort against thinking": (
        chat(reasoning_effort="none", thinking={"type": "enabled"}),
        "reasoning_effort",
    ),
    "preserved thinking, thinking off": (
        chat(thinking={"type": "disabled", "keep": "all"}),
        "thinking.keep",
    ),
    "json_schema without its schema": (
        chat(response_format={"type": "json_schema"}),
        "response_format",
    ),
    "min_tokens above max_tokens": (chat(max_tokens=4, min_tokens=5), "min_tokens"),
    "audio modality": (chat(modalities=["text", "audio"]), "modalities"),
    "audio output": (chat(audio={"voice": "alloy", "format": "mp3"}), "audio"),
    "web search": (chat(web_search_options={}), "web_search_options"),
    "unknown field": (chat(frobnicate=1), "frobnicate"),
}


@pytest.mark.parametrize(("body", "param"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_fields_name_themselves(gateway, body, param) -> None:
    base, fake = gateway
    before = len(fake.requests)
    response = post(base, body)
    assert_openai_error(response, 400, param)
    assert len(fake.requests) == before


def test_every_response_carries_a_request_id_and_the_client_s_is_echoed(gateway, caplog) -> None:
    base, _ = gateway
    mine = post(base, chat(), route="/v1/chat/completions")
    with caplog.at_level("INFO", logger="gateway.access"):
        echoed = HTTP.post(
            f"{base}/v1/chat/completions",
            json=chat(),
            headers={**AUTH, "X-Request-Id": "trace-7f3a.1"},
        )
    refused = HTTP.post(f"{base}/v1/chat/completions", json=chat(n=0), headers=AUTH)
    unusable = HTTP.get(f"{base}/health", headers={"X-Request-Id": "has space"})
    assert re.fullmatch(r"req-[0-9a-f]{32}", mine.headers["x-request-id"])
    assert echoed.headers["x-request-id"] == "trace-7f3a.1"
    assert refused.status_code == 400 and refused.headers["x-request-id"].startswith("req-")
    assert unusable.headers["x-request-id"].startswith("req-")
    line = next(r.getMessage() for r in caplog.records if "trace-7f3a.1" in r.getMessage())
    assert re.fullmatch(r"trace-7f3a\.1 POST /v1/chat/completions 200 \d+ms chatcmpl-\w+", line)
    assert line.endswith(echoed.json()["id"])
