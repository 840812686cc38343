"""`k2serve up` as a user runs it: a real suite (tokenizer, prefill, decode, a 2-rank expert
pool, the gateway) as processes, driven by signals and faults.

Regressions: Ctrl-C sent SIGTERM to every service at once, so the expert pool refused
Compute first and in-flight streams ended with "expert pool unavailable" (item 11); SIGTERM
during start-up orphaned every service, and Ctrl-C printed tracebacks (item 12); one dead service
took the whole suite down until someone ran `k2serve up` again (item 15); `/health` answered
long before a request could be served (item 14)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from services.common.processes import RestartPolicy
from services.launcher import Suite
from tests.e2e.suite_fixtures import free_port, write_deployment
from tests.gateway.rest_fakes import ENTERPRISE_KEY, config_dict

AUTH = {"Authorization": f"Bearer {ENTERPRISE_KEY}"}
HTTP = httpx.Client(timeout=120, trust_env=False)


def deployment(tmp: Path) -> tuple[Path, int]:
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config_dict()))
    path = write_deployment(tmp / "deployment.yaml")
    spec = yaml.safe_load(path.read_text())
    port = free_port()
    spec["gateway"] = [{"name": "gateway-0", "port": port, "config": "gateway.yaml"}]
    spec["experts"] = "remote"
    spec["expert_pool"] = [
        {"name": "experts-0", "port": free_port(), "ranks": 2, "master_port": free_port()}
    ]
    path.write_text(yaml.safe_dump(spec))
    return path, port


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(") ", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except OSError:
        return False
    return state != "Z"


class Up:
    """`k2serve up` in a subprocess; reads what it prints."""

    def __init__(self, path: Path) -> None:
        cmd = [sys.executable, "-m", "services.cli", "up", "--deployment", str(path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.printed: list[str] = []

    def wait_for(self, prefix: str) -> None:
        assert self.proc.stdout is not None
        while not self.printed or not self.printed[-1].startswith(prefix):
            line = self.proc.stdout.readline()
            assert line, f"k2serve up exited ({self.proc.wait()}): {self.printed}"
            self.printed.append(line)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 120) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, str]]:
    path, port = deployment(tmp_path_factory.mktemp("up"))
    running = Up(path)
    try:
        running.wait_for("ready in")
        yield running, f"http://127.0.0.1:{port}"
    finally:
        if running.proc.poll() is None:
            running.stop()


def chat(base: str, max_tokens: int) -> dict:
    body = {
        "model": "kimi-k2-instruct",
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return HTTP.post(f"{base}/v1/chat/completions", json=body, headers=AUTH).json()


def test_ready_means_a_request_succeeds_at_once(up) -> None:
    _, base = up
    assert HTTP.get(f"{base}/health/ready").json()["status"] == "ready"
    replies = [chat(base, 4) for _ in range(3)]
    assert all(r["choices"][0]["finish_reason"] == "length" for r in replies), replies


def test_a_killed_service_is_restarted_while_the_rest_serves(up) -> None:
    running, base = up
    prefill = next(
        pid
        for pid in descendants(running.proc.pid)
        if "prefill" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    )
    os.kill(prefill, signal.SIGKILL)
    assert HTTP.get(f"{base}/health").status_code == 200  # the gateway stays up
    deadline = time.monotonic() + 120
    while HTTP.get(f"{base}/health/ready").status_code == 200:  # until the gateway sees it
        assert time.monotonic() < deadline, "readiness never noticed the dead prefill"
        time.sleep(0.1)
    while HTTP.get(f"{base}/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "prefill was not restarted"
        time.sleep(0.5)
    reply = chat(base, 4)
    assert reply.get("choices", [{}])[0].get("finish_reason") == "length", reply
    metrics = HTTP.get(f"{base}/metrics").text
    assert 'k2_service_restarts_total{service="prefill-0"} 1.0' in metrics
    assert 'k2_decode_kv_usage_ratio{instance="decode-0"}' in metrics  # the placement poll's Stats
    assert running.proc.poll() is None


def test_ctrl_c_lets_an_in_flight_stream_finish_exactly(up) -> None:
    running, base = up
    expected = chat(base, 48)["choices"][0]["message"]["content"]
    family = descendants(running.proc.pid)
    body = {
        "model": "kimi-k2-instruct",
        "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
    }
    text, finish, signalled = "", None, False
    with HTTP.stream("POST", f"{base}/v1/chat/completions", json=body, headers=AUTH) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            choice = event["choices"][0]
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
            if text and not signalled:
                running.proc.send_signal(signal.SIGINT)  # Ctrl-C with the stream in flight
                signalled = True
    assert (text, finish) == (expected, "length")
    _, err = running.proc.communicate(timeout=120)
    assert running.proc.returncode == 0, err
    assert "Traceback" not in err
    assert not [pid for pid in family if alive(pid)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_everything_cleanly(tmp_path: Path, sig: int) -> None:
    path, _ = deployment(tmp_path)
    running = Up(path)
    running.wait_for("starting")
    deadline = time.monotonic() + 30
    while len(descendants(running.proc.pid)) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    family = descendants(running.proc.pid)
    assert family, "no service was started"
    code, out, err = running.stop(sig, timeout_s=90)
    assert code == 0 and "Traceback" not in err, err
    assert "ready in" not in out
    assert not [pid for pid in family if alive(pid)], "services outlived k2serve up"


def test_a_service_that_keeps_crashing_ends_the_suite_loudly(tmp_path: Path, monkeypatch) -> None:
    """Restarts on a backoff, then gives up after max_restarts crashes in a row; restarts are
    counted in the state file the gateway exports."""
    path, _ = deployment(tmp_path)
    monkeypatch.setattr(
        "services.launcher.command",
        lambda inst, _path: [sys.executable, "-c", "import sys; sys.exit(7)"],
    )
    suite = Suite(path, state_file=tmp_path / "state.json")
    suite.start_instance(suite.deployment.of_kind("tokenizer")[0])
    lines: list[str] = []
    policy = RestartPolicy(max_restarts=2, backoff_s=0.05, max_backoff_s=0.1)
    assert suite.supervise(lambda: False, policy, log=lines.append, poll_s=0.02) == 1
    suite.stop()
    assert json.loads((tmp_path / "state.json").read_text()) == {"restarts": {"tokenizer-0": 2}}
    assert "giving up" in lines[-1] and "tokenizer-0" in lines[-1]
