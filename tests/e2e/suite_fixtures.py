"""Deployments of real service processes on localhost, for end-to-end and fault tests."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import yaml

from services.launcher import Suite
from tests.timing import seconds


def free_port() -> int:
    """A port no one listens on, chosen below the kernel's ephemeral range: port 0 would hand
    out one from that range, where any outgoing connection may take it before the service that
    was given it binds (a pool's rank, seconds later, found it in use)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = _RANDOM.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


_RANDOM = random.Random()  # its own: tests that seed the global generator must not repeat ports


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
