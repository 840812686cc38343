"""Hostile input at the REST edge: lone surrogates, huge names, wrong methods, an empty model.

Regressions: a lone UTF-16 surrogate ("a\\ud800b" in content, system, stop,
tool text or schema keys) was a 500 on the OpenAI and Anthropic routes (UnicodeEncodeError while
building the protobuf); error messages echoed unbounded input (100 KB came back); 405 answers
had no Allow header and Anthropic's not_found_error type; `"model": ""` got the default model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from tests.gateway.rest_fakes import ENTERPRISE_KEY, ScriptedChat
from tests.gateway.rest_server import HTTP, switched

AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}", "Content-Type": "application/json"}
LONE = "a\ud800b"  # json.dumps writes it as the escape a client sends


@pytest.fixture(scope="module")
def use() -> Iterator[Callable[[ScriptedChat], str]]:
    with switched() as use:
        yield use


def chat(messages: list | None = None, **fields) -> str:
    messages = messages or [{"role": "user", "content": "x"}]
    return json.dumps({"model": "kimi-k2-instruct", "messages": messages, **fields})


def tool(**function) -> list:
    return [{"type": "function", "function": {"name": "f", **function}}]


SURROGATE_BODIES = {
    "content": (chat([{"role": "user", "content": LONE}]), "messages[0].content"),
    "system": (
        chat([{"role": "system", "content": LONE}, {"role": "user", "content": "x"}]),
        "messages[0].content",
    ),
    "stop": (chat(stop=[LONE]), "stop[0]"),
    "tool description": (chat(tools=tool(description=LONE)), "tools[0].function.description"),
    "schema key": (
        chat(tools=tool(parameters={"type": "object", "properties": {LONE: {}}})),
        "tools[0].function.parameters.properties",
    ),
    "text part": (
        chat([{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
        "messages[0].content[0].text",
    ),
}


@pytest.mark.parametrize("name", list(SURROGATE_BODIES))
def test_a_lone_surrogate_is_a_400_naming_the_field(use, name: str) -> None:
    fake = ScriptedChat()
    body, param = SURROGATE_BODIES[name]
    response = HTTP.post(f"{use(fake)}/v1/chat/completions", content=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"]
    assert fake.requests == []


def test_a_lone_surrogate_on_the_anthropic_route_is_a_400_in_its_shape(use) -> None:
    fake = ScriptedChat()
    body = json.dumps(
        {
            "model": "kimi-k2-instruct",
            "max_tokens": 8,
            "system": LONE,
            "messages": [{"role": "user", "content": "hi"}],
        }
    )
    response = HTTP.post(f"{use(fake)}/v1/messages", content=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "surrogate" in response.json()["error"]["message"]


def test_a_valid_surrogate_pair_is_an_ordinary_character(use) -> None:
    fake = ScriptedChat()
    body = chat([{"role": "user", "content": "smile \ud83d\ude00"}])
    assert "\\ud83d\\ude00" in body  # sent as an escaped pair
    response = HTTP.post(f"{use(fake)}/v1/chat/completions", content=body, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "smile 😀"


def test_errors_do_not_echo_unbounded_input(use) -> None:
    base = use(ScriptedChat())
    name = "m" * 100_000
    body = {"model": name, "messages": [{"role": "user", "content": "x"}]}
    response = HTTP.post(f"{base}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 404
    assert len(response.content) < 4096
    response = HTTP.post(
        f"{base}/v1/chat/completions", json={**body, "logit_bias": {name: 1}}, headers=AUTH
    )
    assert response.status_code in (400, 404) and len(response.content) < 4096
    response = HTTP.get(f"{base}/v1/{'x' * 10_000}", headers=AUTH)
    assert response.status_code == 404 and len(response.content) < 4096


@pytest.mark.parametrize(
    ("path", "shape"), [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")]
)
def test_405_names_the_allowed_methods(use, path: str, shape: str) -> None:
    response = HTTP.get(f"{use(ScriptedChat())}{path}", headers=AUTH)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    body = response.json()
    if shape == "openai":
        assert body["error"]["code"] == "method_not_allowed"
    else:
        assert body["error"]["type"] == "invalid_request_error"


def test_an_empty_model_name_is_a_400_not_the_default(use) -> None:
    fake = ScriptedChat()
    body = {"model": "", "messages": [{"role": "user", "content": "x"}]}
    response = HTTP.post(f"{use(fake)}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    response = HTTP.post(
        f"{use(fake)}/v1/chat/completions", json={"messages": body["messages"]}, headers=AUTH
    )
    assert response.status_code == 200  # no model at all: the key's default
    assert json.loads(response.text)["model"] == "kimi-k2-thinking"
