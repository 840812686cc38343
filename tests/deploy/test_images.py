"""The images and the healthcheck they ship: the Dockerfiles install the pinned torch and copy
every package the services import plus the probe the compose healthchecks run (their build
context filters keep those paths), and the probe answers for a real service."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.suite_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
PROBE = ROOT / "deploy" / "health_probe.py"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_copies_what_the_services_import(name: str) -> None:
    text = (ROOT / "deploy" / name).read_text()
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ")}
    packages = {
        p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages | {"protos", "pyproject.toml", "deploy/health_probe.py"} <= copied
    for path in copied:
        assert (ROOT / path).exists(), path
    ignore = (ROOT / "deploy" / f"{name}.dockerignore").read_text().splitlines()
    assert ignore[1] == "**"  # everything is left out ...
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= kept  # ... except what the COPY lines need


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_installs_the_pinned_torch(name: str) -> None:
    pinned = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("torch"))
    text = (ROOT / "deploy" / name).read_text()
    assert re.search(rf"pip install {re.escape(pinned)}\b", text), pinned
    assert "USER k2serve" in text  # services never run as root


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tokenizer service; yields its host:port."""
    port = free_port()
    path = tmp_path_factory.mktemp("probe") / "d.yaml"
    spec = {
        "tokenizer": [{"name": "tokenizer-0", "port": port}],
        "prefill": [{"name": "prefill-0", "port": free_port()}],
        "decode": [{"name": "decode-0", "port": free_port()}],
    }
    path.write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "services.tokenizer", "--deployment", str(path), "--name"]
    proc = subprocess.Popen([*cmd, "tokenizer-0"], stdout=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def probe(target: str) -> int:
    return subprocess.run(
        [sys.executable, str(PROBE), "--target", target], capture_output=True, timeout=30
    ).returncode


def test_the_health_probe_passes_once_the_service_serves(tokenizer: str) -> None:
    deadline = time.monotonic() + 60
    while probe(tokenizer) != 0:
        assert time.monotonic() < deadline, "the tokenizer never probed healthy"
        time.sleep(0.2)


def test_the_health_probe_fails_where_nothing_serves() -> None:
    assert probe(f"127.0.0.1:{free_port()}") == 1
