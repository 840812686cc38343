"""API keys (Bearer or x-api-key, constant-time comparison), profiles (403 / default model),
error shapes of 401/403/404 on both surfaces, and path tricks that must not bypass the key."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from gateway import auth
from gateway.auth import ApiKey, KeyRing, Profile
from gateway.errors import ApiError
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ORDINARY_KEY, ScriptedChat
from tests.gateway.rest_server import HTTP, running

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC = {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def base():
    with running(ScriptedChat()) as url:
        yield url


def raw(
    base: str, method: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """Send `target` byte for byte (httpx and browsers would normalise it)."""
    conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=10)
    try:
        body = json.dumps(CHAT) if method == "POST" else None
        conn.request(
            method,
            target,
            body=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-wrong-key-0000"},
        {"Authorization": f"Basic {ENTERPRISE_KEY}"},
        {"Authorization": f"Bearer {ENTERPRISE_KEY[:-1]}"},
        {"Authorization": f"Bearer {ENTERPRISE_KEY}x"},
        {"Authorization": "Bearer"},
        {"x-api-key": "sk-wrong-key-0000"},
    ],
    ids=["none", "wrong", "basic-scheme", "prefix", "suffix", "empty", "wrong-x-api-key"],
)
def test_missing_or_wrong_key_is_401_before_anything_else(base, headers) -> None:
    bad_body = {"messages": [], "temperature": 9}
    response = HTTP.post(f"{base}/v1/chat/completions", json=bad_body, headers=headers)
    assert response.status_code == 401
    assert response.json() == {
        "error": {
            "message": response.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    anthropic = HTTP.post(f"{base}/v1/messages", json=ANTHROPIC, headers=headers)
    assert anthropic.status_code == 401
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {ENTERPRISE_KEY}"},
        {"authorization": f"bearer {ENTERPRISE_KEY}"},
        {"x-api-key": ENTERPRISE_KEY},
    ],
)
def test_bearer_and_x_api_key_are_both_accepted(base, headers) -> None:
    assert HTTP.post(f"{base}/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    assert (
        HTTP.post(f"{base}/anthropic/v1/messages", json=ANTHROPIC, headers=headers).status_code
        == 200
    )


def test_profile_limits_models_403_and_unknown_model_404(base) -> None:
    ordinary = {"Authorization": f"Bearer {ORDINARY_KEY}"}
    denied = HTTP.post(
        f"{base}/v1/chat/completions", json={**CHAT, "model": "kimi-k2-thinking"}, headers=ordinary
    )
    unknown = HTTP.post(
        f"{base}/v1/chat/completions", json={**CHAT, "model": "gpt-5"}, headers=ordinary
    )
    assert denied.status_code == 403
    assert denied.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "permission_denied",
        "param": "model",
        "code": "permission_denied",
    }
    assert unknown.status_code == 404
    assert unknown.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    a_denied = HTTP.post(
        f"{base}/v1/messages", json={**ANTHROPIC, "model": "kimi-k2-thinking"}, headers=ordinary
    )
    a_unknown = HTTP.post(
        f"{base}/v1/messages", json={**ANTHROPIC, "model": "claude-x"}, headers=ordinary
    )
    assert (a_denied.status_code, a_denied.json()["error"]["type"]) == (403, "permission_error")
    assert (a_unknown.status_code, a_unknown.json()["error"]["type"]) == (404, "not_found_error")


@pytest.mark.parametrize("path", ["/health", "/metrics", "/openapi.json"])
def test_operational_routes_need_no_key(base, path) -> None:
    assert HTTP.get(f"{base}{path}").status_code == 200


def test_unknown_routes_are_404_in_the_surfaces_shape(base) -> None:
    openai_404 = HTTP.get(f"{base}/v1/nope")
    anthropic_404 = HTTP.get(f"{base}/anthropic/v1/nope")
    wrong_method = HTTP.get(f"{base}/v1/chat/completions")
    assert openai_404.status_code == 404 and set(openai_404.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    assert (
        anthropic_404.status_code == 404
        and anthropic_404.json()["error"]["type"] == "not_found_error"
    )
    assert (
        wrong_method.status_code == 405
        and wrong_method.json()["error"]["type"] == "invalid_request_error"
    )


TRICKS = [
    ("GET", "//v1/models"),
    ("GET", "/v1//models"),
    ("GET", "/v1/../v1/models"),
    ("GET", "/v1/./models"),
    ("GET", "/health/../v1/models"),
    ("GET", "/metrics/../v1/models"),
    ("GET", "/v1/%6dodels"),
    ("GET", "/%76%31/models"),
    ("GET", "/v1/models%2F"),
    ("GET", "/health%2F..%2Fv1%2Fmodels"),
    ("GET", "/health/%2e%2e/v1/models"),
    ("GET", "/v1/models/"),
    ("GET", "/V1/models"),
    ("GET", "/v1/models?x=/health"),
    ("GET", "/v1/models/kimi-k2-instruct/../../models"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/v1/chat/%63ompletions"),
    ("POST", "/anthropic/../v1/chat/completions"),
    ("POST", "/anthropic//v1/messages"),
]


@pytest.mark.parametrize(("method", "target"), TRICKS)
def test_path_tricks_cannot_bypass_the_key_check(base, method, target) -> None:
    status, body = raw(base, method, target)
    assert status in (401, 404, 405), (status, body)
    assert "kimi-k2" not in body and "choices" not in body
    parsed = json.loads(body)
    assert "error" in parsed
    # A target that is not 401 without a key reached no route: a key changes nothing there.
    status_with_key, _ = raw(base, method, target, {"Authorization": f"Bearer {ENTERPRISE_KEY}"})
    if status != 401:
        assert status_with_key == status


def test_every_key_is_compared_whatever_matches(monkeypatch) -> None:
    """Constant time: the loop never stops at the first match (CVE-2025-59425 compared keys
    with `==` and returned early), and every comparison is hmac.compare_digest on digests of
    one length."""
    profile = Profile("p", ("*",), "m")
    keys = tuple(ApiKey(f"k{i}", f"sk-secret-number-{i}", profile) for i in range(5))
    ring = KeyRing(keys)
    calls: list[tuple[bytes, bytes]] = []

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    for presented, expected in [(keys[0].secret, keys[0]), (keys[4].secret, keys[4])]:
        calls.clear()
        assert ring.authenticate(presented) is expected
        assert len(calls) == len(keys)
        assert {len(a) for a, _ in calls} | {len(b) for _, b in calls} == {32}
    calls.clear()
    with pytest.raises(ApiError) as refused:
        ring.authenticate("sk-secret-number-")
    assert len(calls) == len(keys) and refused.value.status == 401
