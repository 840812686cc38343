"""The model registry and gateway config files, and upstream models proxied to a real
OpenAI-compatible server (a second gateway), streaming included."""

from __future__ import annotations

import time

import openai
import pytest

from gateway.config import ConfigError, GatewayConfig
from gateway.registry import LocalModel, Registry, RegistryError, UpstreamModel
from services.chat.types import ChatEvent
from services.common import errors as svc
from tests.gateway.rest_fakes import ENTERPRISE_KEY, SHAPE, ScriptedChat, config_dict, echo
from tests.gateway.rest_server import HTTP, free_port, running, switched

UPSTREAM_ENV = "K2_TEST_UPSTREAM_KEY"
USER = [{"role": "user", "content": "hello big world"}]
AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}"}


def test_registry_parses_local_and_upstream_models() -> None:
    registry = Registry.from_dict(
        {
            "models": [
                {"id": "k2", "local": {"thinking": False}},
                {"id": "k2-default", "local": None},
                {
                    "id": "moonshot",
                    "upstream": {
                        "base_url": "https://api.moonshot.ai/v1/",
                        "model": "kimi-k2-0905-preview",
                        "api_key_env": "MOONSHOT_API_KEY",
                    },
                    "owned_by": "moonshot",
                },
            ]
        },
        SHAPE,
    )
    assert registry.models == (
        LocalModel("k2", SHAPE, False),
        LocalModel("k2-default", SHAPE, None),
        UpstreamModel(
            "moonshot",
            "https://api.moonshot.ai/v1",
            "kimi-k2-0905-preview",
            "MOONSHOT_API_KEY",
            "moonshot",
        ),
    )


UPSTREAM = {"base_url": "http://x/v1", "model": "m", "api_key_env": "E"}


@pytest.mark.parametrize(
    "raw",
    [
        [],
        {"models": []},
        {"models": [{"local": {}}]},
        {"models": [{"id": "a"}]},
        {"models": [{"id": "a", "local": {}, "upstream": UPSTREAM}]},
        {"models": [{"id": "a", "local": {}}, {"id": "a", "local": {}}]},
        {"models": [{"id": "a", "local": {"thinking": "yes"}}]},
        {"models": [{"id": "a", "local": {}, "colour": "red"}]},
        {"models": [{"id": "a", "upstream": {**UPSTREAM, "model": ""}}]},
        {"models": [{"id": "a", "upstream": {"base_url": "http://x"}}]},
        {"models": [{"id": "a", "local": {}}], "extra": 1},
    ],
)
def test_bad_registries_are_refused(raw) -> None:
    with pytest.raises(RegistryError):
        Registry.from_dict(raw, SHAPE)


def test_config_reads_key_env_and_a_registry_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("K2_TEST_KEY", "sk-from-the-environment")
    (tmp_path / "models.yaml").write_text("models:\n  - {id: kimi-k2-instruct, local: {}}\n")
    raw = config_dict(max_n=2)
    raw["keys"].append({"name": "env", "key_env": "K2_TEST_KEY", "profile": "ordinary"})
    raw["registry"] = "models.yaml"
    raw["profiles"]["enterprise"]["default_model"] = "kimi-k2-instruct"
    (tmp_path / "gateway.yaml").write_text(__import__("yaml").safe_dump(raw))
    config = GatewayConfig.load(tmp_path / "gateway.yaml", SHAPE)
    assert config.registry.ids == ("kimi-k2-instruct",)
    assert config.limits.max_n == 2 and config.limits.max_stop_chars == 64
    assert config.keyring().authenticate("sk-from-the-environment").name == "env"
    assert "sk-from-the-environment" not in repr(config)


def broken(edit) -> dict:
    raw = config_dict()
    edit(raw)
    return raw


@pytest.mark.parametrize(
    "raw",
    [
        broken(lambda r: r["profiles"]["ordinary"].update(models=["gpt-5"])),
        broken(lambda r: r["profiles"]["ordinary"].update(default_model="kimi-k2-thinking")),
        broken(lambda r: r["keys"][0].update(key="short")),
        broken(lambda r: r["keys"][1].update(key=r["keys"][0]["key"])),
        broken(lambda r: r["keys"][0].update(profile="platinum")),
        broken(lambda r: r["keys"][0].update(key_env="X")),
        broken(lambda r: r.update(keys=[])),
        broken(lambda r: r.update(limits={"max_n": 0})),
        broken(lambda r: r.update(limits={"max_everything": 3})),
        broken(lambda r: r.update(listen={"host": "0.0.0.0", "tls": True})),
        broken(lambda r: r.pop("registry")),
    ],
)
def test_bad_configs_are_refused(raw) -> None:
    with pytest.raises(ConfigError):
        GatewayConfig.from_dict(raw, SHAPE)


@pytest.fixture(scope="module")
def upstream():
    """A real OpenAI-compatible server: another gateway, whose own fake the tests script."""
    with switched() as use:
        yield use


@pytest.fixture
def front(upstream, monkeypatch):
    """A gateway whose `remote-k2` is the upstream server's `kimi-k2-instruct`."""

    def start(fake: ScriptedChat, base_url: str | None = None):
        base = upstream(fake)
        monkeypatch.setenv(UPSTREAM_ENV, ENTERPRISE_KEY)
        raw = config_dict()
        entry = {
            "base_url": base_url or f"{base}/v1",
            "model": "kimi-k2-instruct",
            "api_key_env": UPSTREAM_ENV,
        }
        raw["registry"]["models"].append({"id": "remote-k2", "upstream": entry})
        return running(ScriptedChat(), GatewayConfig.from_dict(raw, SHAPE))

    return start


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base}/v1", api_key=ENTERPRISE_KEY, max_retries=0, http_client=HTTP
    )


def test_upstream_chat_is_proxied_with_every_field(front) -> None:
    far = ScriptedChat()
    with front(far) as base:
        reply = client(base).chat.completions.create(
            model="remote-k2",
            messages=[*USER, {"role": "assistant", "content": "Hi", "partial": True}],
            temperature=0.2,
            top_p=0.5,
            n=2,
            stop=["zz"],
            seed=-5,
            logit_bias={"3": 5},
            max_tokens=11,
            tools=[
                {
                    "type": "function",
                    "function": {"name": "get_weather", "parameters": {"type": "object"}},
                }
            ],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
        )
    assert reply.model == "remote-k2"
    assert [c.message.content for c in reply.choices] == ["hello big world"] * 2
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, 6)
    seen = far.requests[0]
    assert (seen.model, seen.n, seen.stop, seen.max_tokens) == ("kimi-k2-instruct", 2, ("zz",), 11)
    assert (seen.sampling.temperature, seen.sampling.top_p) == (0.2, 0.5)
    assert seen.sampling.seed == 2**64 - 5 and seen.sampling.logit_bias == ((3, 5.0),)
    assert (seen.tool_choice, seen.parallel_tool_calls) == ("get_weather", False)
    assert seen.messages[-1].partial and seen.messages[-1].content == "Hi"


def test_upstream_streaming_and_other_front_doors(front) -> None:
    far = ScriptedChat()
    with front(far) as base:
        chunks = list(
            client(base).chat.completions.create(model="remote-k2", messages=USER, stream=True)
        )
        completion = client(base).completions.create(model="remote-k2", prompt="one two")
        message = HTTP.post(
            f"{base}/v1/messages",
            json={"model": "remote-k2", "max_tokens": 5, "messages": USER},
            headers=AUTH,
        ).json()
        counted = HTTP.post(
            f"{base}/v1/tokenizers/estimate-token-count",
            json={"model": "remote-k2", "messages": USER},
            headers=AUTH,
        ).json()
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello big world"
    )
    assert {c.model for c in chunks} == {"remote-k2"}
    assert completion.choices[0].text == "one two"
    assert message["content"] == [{"type": "text", "text": "hello big world"}]
    assert counted == {"data": {"total_tokens": 3}}


@pytest.mark.parametrize(
    ("error", "status", "fragment"),
    [
        (svc.ResourceExhausted("queue full"), 429, "queue full"),
        (
            svc.InvalidArgument("messages[0].content: bad"),
            400,
            "upstream provider: messages[0].content: bad",
        ),
        (svc.Unavailable("draining"), 503, "503"),
    ],
)
def test_upstream_errors_map_to_our_statuses(front, error, status, fragment) -> None:
    with front(ScriptedChat(fail_before=error)) as base:
        response = HTTP.post(
            f"{base}/v1/chat/completions",
            json={"model": "remote-k2", "messages": USER},
            headers=AUTH,
        )
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_unreachable_upstream_or_rejected_credentials_is_503(front, monkeypatch) -> None:
    with front(ScriptedChat(), base_url=f"http://127.0.0.1:{free_port()}/v1") as base:
        down = HTTP.post(
            f"{base}/v1/chat/completions",
            json={"model": "remote-k2", "messages": USER},
            headers=AUTH,
        )
    with front(ScriptedChat()) as base:
        monkeypatch.setenv(UPSTREAM_ENV, "sk-not-the-upstream-key")
        refused = HTTP.post(
            f"{base}/v1/chat/completions",
            json={"model": "remote-k2", "messages": USER},
            headers=AUTH,
        )
    for response in (down, refused):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "service_unavailable"


def test_fields_only_local_models_take_are_refused_for_upstream(front) -> None:
    with front(ScriptedChat()) as base:
        body = {"model": "remote-k2", "messages": USER, "top_k": 4}
        response = HTTP.post(f"{base}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 400


def test_front_disconnect_closes_the_upstream_stream(front) -> None:
    far = ScriptedChat(
        script=lambda r: [ChatEvent(content=f"{i} ") for i in range(400)] + echo(r), delay_s=0.02
    )
    with front(far) as base:
        body = {"model": "remote-k2", "messages": USER, "stream": True}
        with HTTP.stream(
            "POST", f"{base}/v1/chat/completions", json=body, headers=AUTH
        ) as response:
            lines = response.iter_lines()
            [next(lines) for _ in range(4)]
        deadline = time.monotonic() + 10
        while not far.closed_early and time.monotonic() < deadline:
            time.sleep(0.02)
    assert far.closed_early and not far.finished
