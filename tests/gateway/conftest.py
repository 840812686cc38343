"""The real suite behind `python -m gateway`, shared by the end-to-end modules of this folder:
tokenizer, prefill and decode processes (services/launcher.py) on the embedded checkpoint, and
the gateway with the REST tests' keys, profiles and registry. Started once per session, on the
first test that asks for it."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

import openai
import pytest
import yaml

from services.launcher import Suite
from tests.e2e.suite_fixtures import free_port, start_suite, write_deployment
from tests.gateway.rest_fakes import ENTERPRISE_KEY, config_dict
from tests.gateway.rest_server import HTTP

GATEWAY_CONFIG = config_dict()


@dataclass(frozen=True)
class RunningSuite:
    base: str  # the gateway's REST base URL
    grpc_port: int  # the gateway's gRPC Chat API
    backends: Suite


def wait_healthy(proc: subprocess.Popen, base: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        try:
            if HTTP.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError("the gateway did not become healthy")


@pytest.fixture(scope="session")
def real_suite(tmp_path_factory) -> RunningSuite:
    """The gateway starts first: it loads while the backends do. 64 KV blocks of 16 on decode
    (1,024 tokens) so that a few long requests press on the pool."""
    tmp = tmp_path_factory.mktemp("e2e")
    dep = write_deployment(tmp / "deployment.yaml", decode={"kv_blocks": 64})
    config = tmp / "gateway.yaml"
    config.write_text(yaml.safe_dump(GATEWAY_CONFIG))
    port, grpc_port = free_port(), free_port()
    with (tmp / "gateway.log").open("w") as log:
        cmd = [sys.executable, "-m", "gateway", "--config", str(config), "--deployment", str(dep)]
        gateway = subprocess.Popen(
            [*cmd, "--port", str(port), "--grpc-port", str(grpc_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    backends = None
    try:
        backends = start_suite(dep)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(gateway, base)
        yield RunningSuite(base, grpc_port, backends)
    finally:
        gateway.terminate()
        gateway.wait(30)
        if backends is not None:
            backends.stop()


def openai_client(base: str, key: str = ENTERPRISE_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, http_client=HTTP)
