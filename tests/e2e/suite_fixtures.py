"""Deployments of real service processes on localhost, for end-to-end and fault tests."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import yaml

from services.launcher import Suite
from tests.timing import seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_deployment(
    path: Path,
    n_prefill: int = 1,
    n_decode: int = 1,
    checkpoint: str = "embedded",
    prefill: dict[str, Any] | None = None,
    decode: dict[str, Any] | None = None,
) -> Path:
    """A deployment YAML with fresh ports; `prefill`/`decode` override every instance's settings."""
    spec = {
        "checkpoint": checkpoint,
        "hosts": {"local": "127.0.0.1"},
        "tokenizer": [{"name": "tokenizer-0", "port": free_port()}],
        "prefill": [
            {"name": f"prefill-{i}", "port": free_port(), "kv_blocks": 256, **(prefill or {})}
            for i in range(n_prefill)
        ],
        "decode": [
            {"name": f"decode-{i}", "port": free_port(), "kv_blocks": 256, **(decode or {})}
            for i in range(n_decode)
        ],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def start_suite(path: Path, names: list[str] | None = None) -> Suite:
    suite = Suite(path)
    suite.start(timeout_s=seconds(180.0), names=names)
    return suite
