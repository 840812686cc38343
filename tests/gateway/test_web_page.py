"""The web chat page (gateway/static/) in real headless Chromium, driven by playwright, against
the real suite started by `k2serve up`: tokenizer, prefill and decode processes on the embedded
checkpoint and the gateway, which `up` starts from the deployment's `gateway` entry and whose
URL it prints.

Each chat compares what the page shows with the same request body (captured as the page sent
it) answered without streaming under greedy sampling: same text, same reasoning, same tool call.
Stop is checked on the decode instance itself: its KV blocks all come back free and it counts
no finished request. A mid-stream error frame, which the real model cannot be made to produce,
is checked against a scripted pipeline (tests/gateway/rest_fakes.py).

Skips only when no Chromium is installed (.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright

from services.deployment import Deployment, DeploymentError
from services.launcher import endpoint
from services.pb.k2.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from tests.e2e.suite_fixtures import free_port, write_deployment
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ScriptedChat
from tests.gateway.rest_server import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed and could not be (.ci/run: apt-get install chromium)",
)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]  # headless, with a fresh profile directory: playwright's own launch defaults
KEY = "sk-web-page-test-key"
CHAT = "**/v1/chat/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
        },
    },
}
GATEWAY_CONFIG = {
    "keys": [{"name": "web", "key": KEY, "profile": "all"}],
    "profiles": {"all": {"models": ["*"], "default_model": "kimi-k2-instruct"}},
    "registry": {
        "models": [
            {"id": "kimi-k2-instruct", "local": {"thinking": False}},
            {"id": "kimi-k2-thinking", "local": {"thinking": True}},
        ]
    },
}
API = httpx.Client(timeout=60, trust_env=False, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(the gateway URL `k2serve up` printed, the decode target) while the suite runs."""
    tmp = tmp_path_factory.mktemp("web")
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(GATEWAY_CONFIG))
    path = write_deployment(tmp / "deployment.yaml")
    spec = yaml.safe_load(path.read_text())
    port = free_port()
    spec["gateway"] = [{"name": "gateway-0", "port": port, "config": "gateway.yaml"}]
    path.write_text(yaml.safe_dump(spec))
    up = [sys.executable, "-m", "services.cli", "up", "--deployment", str(path)]
    proc = subprocess.Popen(up, stdout=subprocess.PIPE, text=True)
    printed = []
    try:
        while not printed or not printed[-1].startswith("ready in"):
            line = proc.stdout.readline()
            assert line, f"k2serve up exited ({proc.wait()}) before the suite was up: {printed}"
            printed.append(line)
        url = f"http://127.0.0.1:{port}/"
        assert any(line.startswith("chat page") and line.split()[-1] == url for line in printed)
        yield url.rstrip("/"), f"127.0.0.1:{spec['decode'][0]['port']}"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped:" in out


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()  # its own localStorage
    yield context.new_page()
    context.close()


def open_chat(page: Page, base: str, key: str = KEY) -> None:
    page.goto(base + "/")
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # the change event: the key is stored, the models load
    expect(page.locator("#model")).to_have_attribute(
        "data-loaded", "true" if key == KEY else "false"
    )


def configure(page: Page, **fields: str) -> None:
    """Fills settings by element id: temperature, max-tokens, tool-choice, tools, system."""
    if page.locator("#settings").get_attribute("open") is None:
        page.click("#settings summary")
    for name, value in fields.items():
        page.fill(f"#{name}", value)


def send(page: Page, text: str) -> dict[str, Any]:
    """Sends `text`; returns the request body the page posted (after checking its key)."""
    with page.expect_request(CHAT) as sent:
        page.fill("#input", text)
        page.click("#send")
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    return sent.value.post_data_json


def reply(page: Page, index: int = 0) -> Any:
    node = page.locator(".msg.assistant").nth(index)
    expect(node).to_have_attribute("data-state", "done", timeout=30_000)
    return node


def unstreamed(base: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same conversation answered as one JSON body: the page's own request, not streamed."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    response = API.post(f"{base}/v1/chat/completions", json=plain)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]


def decode_stats(target: str) -> decode_pb2.DecodeStats:
    with grpc.insecure_channel(target) as channel:
        return decode_pb2_grpc.DecodeStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)


def distinct_colours(browser: Browser, png: bytes) -> int:
    """Colours in a PNG, decoded by the browser itself on a blank page."""
    blank = browser.new_page()
    try:
        return blank.evaluate(
            """async (b64) => {
                const img = new Image();
                img.src = "data:image/png;base64," + b64;
                await img.decode();
                const canvas = document.createElement("canvas");
                [canvas.width, canvas.height] = [img.width, img.height];
                const ctx = canvas.getContext("2d");
                ctx.drawImage(img, 0, 0);
                const px = ctx.getImageData(0, 0, img.width, img.height).data;
                const seen = new Set();
                for (let i = 0; i < px.length; i += 4) seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
                return seen.size;
            }""",
            base64.b64encode(png).decode(),
        )
    finally:
        blank.close()


def test_models_fill_and_a_streamed_reply_matches_the_api(
    served: tuple[str, str], page: Page, browser: Browser, tmp_path: Path
) -> None:
    base, _ = served
    open_chat(page, base)
    listed = [m["id"] for m in API.get(f"{base}/v1/models").json()["data"]]
    assert page.locator("#model option").all_inner_texts() == listed
    configure(page, temperature="0", **{"max-tokens": "40"})
    body = send(page, "Hello there, who are you?")
    assert body["model"] == listed[0] and body["temperature"] == 0 and body["stream"] is True
    node = reply(page)
    expected = unstreamed(base, body)["content"]
    assert expected and node.locator(".content").text_content() == expected
    assert int(node.get_attribute("data-chunks")) > 1  # it arrived in pieces
    assert json.loads(node.locator(".footer").get_attribute("data-usage"))["completion_tokens"] > 1
    shot = tmp_path / "chat.png"
    page.screenshot(path=str(shot), full_page=True)
    assert distinct_colours(browser, shot.read_bytes()) > 20


def test_reasoning_shows_in_a_collapsed_block(served: tuple[str, str], page: Page) -> None:
    base, _ = served
    open_chat(page, base)
    page.select_option("#model", "kimi-k2-thinking")
    configure(page, temperature="0", **{"max-tokens": "30"})
    body = send(page, "Hello")
    node = reply(page)
    expected = unstreamed(base, body)["reasoning_content"]
    block = node.locator("details.reasoning")
    assert expected and block.is_visible() and block.get_attribute("open") is None
    block.locator("summary").click()
    assert block.locator("pre").text_content() == expected


def test_forced_tool_call_card_and_the_tool_loop(served: tuple[str, str], page: Page) -> None:
    base, _ = served
    open_chat(page, base)
    configure(page, temperature="0", tools=json.dumps([WEATHER]), **{"max-tokens": "40"})
    page.fill("#tool-choice", "get_weather")
    body = send(page, "What is the weather in Paris?")
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    node = reply(page)
    assert node.get_attribute("data-finish") == "tool_calls"
    card = node.locator(".tool-call")
    call = unstreamed(base, body)["tool_calls"][0]["function"]
    assert card.get_attribute("data-name") == call["name"] == "get_weather"
    shown = json.loads(card.locator(".tool-args").inner_text())
    assert shown == json.loads(call["arguments"]) and isinstance(shown["city"], str)

    page.fill("#tool-choice", "auto")  # answer the call and let the model continue
    with page.expect_request(CHAT) as sent:
        card.locator(".tool-result input").fill("sunny, 21 C")
        card.locator(".tool-result button").click()
    history = sent.value.post_data_json["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "tool"]
    assert history[2] == {
        "role": "tool",
        "tool_call_id": card.get_attribute("data-id"),
        "content": "sunny, 21 C",
    }
    second = reply(page, 1)
    expected = unstreamed(base, sent.value.post_data_json)
    assert second.locator(".content").text_content() == (expected["content"] or "")


def test_stop_cancels_the_request_down_to_decode(served: tuple[str, str], page: Page) -> None:
    base, decode = served
    before = decode_stats(decode)
    open_chat(page, base)
    configure(page, temperature="0", **{"max-tokens": "3000"})  # ~20 s unless stopped
    send(page, "Count to one thousand.")
    node = page.locator(".msg.assistant")
    expect(node.locator(".content")).not_to_be_empty()
    busy = decode_stats(decode)
    assert busy.running == 1 and busy.kv_blocks_free < busy.kv_blocks_total
    page.click("#stop")
    expect(node).to_have_attribute("data-state", "stopped")
    expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
    deadline = time.monotonic() + 10
    while (stats := decode_stats(decode)).kv_blocks_free != stats.kv_blocks_total:
        assert time.monotonic() < deadline, f"KV blocks not freed after stop: {stats}"
        time.sleep(0.1)
    assert stats.running == 0 and stats.queued == 0
    assert stats.requests_served == before.requests_served  # cancelled, never finished
    assert node.get_attribute("data-finish") is None and page.is_enabled("#send")


def test_a_wrong_key_shows_the_401_error(served: tuple[str, str], page: Page) -> None:
    base, _ = served
    wrong = "sk-not-a-key-at-all"
    api_error = httpx.get(
        f"{base}/v1/models", headers={"Authorization": f"Bearer {wrong}"}, trust_env=False
    ).json()["error"]
    open_chat(page, base, wrong)
    box = page.locator("#error")
    expect(box).to_be_visible()
    assert box.get_attribute("data-status") == "401"
    assert box.get_attribute("data-code") == api_error["code"] == "invalid_api_key"
    assert api_error["message"] in box.inner_text() and api_error["type"] in box.inner_text()
    assert page.locator("#model option").count() == 0

    page.fill("#api-key", KEY)  # a good key: stored, and the models load
    page.press("#api-key", "Tab")
    expect(page.locator("#model")).to_have_attribute("data-loaded", "true")
    expect(box).to_be_hidden()
    page.reload()
    assert page.input_value("#api-key") == KEY


def test_page_files_need_no_key_and_stay_inside_static(served: tuple[str, str]) -> None:
    base, _ = served
    page = httpx.get(base + "/", trust_env=False)
    assert page.status_code == 200 and "chat.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = httpx.get(base + "/static/chat.js", trust_env=False)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    host, port = base.removeprefix("http://").split(":")
    for raw in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", raw)
        answer = conn.getresponse()
        body = json.loads(answer.read())
        conn.close()
        assert answer.status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_a_mid_stream_error_frame_is_shown_in_the_api_shape(page: Page) -> None:
    """Scripted pipeline: two words, then a crash (the gateway sends an error frame, then
    [DONE]). The page keeps the partial reply and shows the frame's error."""
    fake = ScriptedChat(fail_after=2, delay_s=0.02)
    with running(fake) as base:
        page.goto(base + "/")
        page.fill("#api-key", ENTERPRISE_KEY)
        page.press("#api-key", "Tab")
        expect(page.locator("#model")).to_have_attribute("data-loaded", "true")
        page.fill("#input", "one two three four")
        page.click("#send")
        node = page.locator(".msg.assistant")
        expect(node).to_have_attribute("data-state", "error")
        assert node.locator(".content").text_content() == "one two"
        box = page.locator("#error")
        assert box.get_attribute("data-type") == "server_error" and "secret" not in box.inner_text()
        assert fake.closed_early == [fake.requests[0].request_id]


def test_a_gateway_entry_needs_its_config_and_only_a_gateway_takes_one(tmp_path: Path) -> None:
    backends = {"tokenizer": [{"port": 1}], "prefill": [{"port": 2}], "decode": [{"port": 3}]}
    gateway = {"gateway": [{"port": 4, "config": "gw.yaml"}]}
    (entry,) = Deployment.from_dict(backends | gateway, base=tmp_path).of_kind("gateway")
    assert entry.config == (tmp_path / "gw.yaml").resolve()
    assert endpoint(entry) == "http://127.0.0.1:4/"
    with pytest.raises(DeploymentError, match="a gateway needs a config"):
        Deployment.from_dict(backends | {"gateway": [{"port": 4}]})
    with pytest.raises(DeploymentError, match=r"decode\[0\]\.config: not a setting"):
        Deployment.from_dict(backends | {"decode": [{"port": 3, "config": "gw.yaml"}]})
