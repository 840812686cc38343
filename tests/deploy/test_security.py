"""Optional mTLS and the shared-secret check on internal gRPC (services/common/security.py).

A server with `security` serves callers that present the suite's certificate and secret, on
every RPC kind, and refuses the rest: no TLS, a certificate from another CA, no secret, a wrong
secret. A whole deployment with a `security` section (tokenizer, prefill, decode, a remote expert
pool, the gateway) comes up and serves, and its services refuse a caller without credentials.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from services.common.channel import health_status, open_channel
from services.common.security import Security, SecurityError
from services.common.server import ServerOptions, start_server
from services.launcher import Suite
from services.pb.k2.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from tests.e2e.suite_fixtures import free_port

ROOT = Path(__file__).resolve().parents[2]


def make_certs(folder: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    subprocess.run(
        [str(ROOT / "deploy" / "make_certs.sh"), str(folder)], check=True, capture_output=True
    )
    return folder


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("other"))


def sec(certs: Path, tls: bool = True, secret: Path | None = None) -> Security:
    raw: dict[str, Any] = (
        {"ca": "ca.pem", "cert": "internal.pem", "key": "internal.key"} if tls else {}
    )
    if secret is not None:
        raw["secret_file"] = str(secret)
    return Security.from_dict(raw, certs)


def serve_and(server_security: Security, client: Callable[[str], Awaitable[Any]]) -> Any:
    """Start a health-only server with server_security, run client(target), stop the server."""

    async def run() -> Any:
        running = await start_server(
            "test", [], [], ServerOptions(bind="127.0.0.1:0", security=server_security)
        )
        running.set_serving()
        try:
            return await client(f"127.0.0.1:{running.port}")
        finally:
            await running.server.stop(0)

    return asyncio.run(run())


def code_of(security: Security | None) -> Callable[[str], Awaitable[str]]:
    """A client: the status name of a health Check through a channel with `security`."""

    async def client(target: str) -> str:
        async with open_channel(target, security=security) as channel:
            try:
                return await health_status(channel, timeout_s=5)
            except grpc.aio.AioRpcError as e:
                return e.code().name

    return client


def test_credentials_and_secret_are_served_on_every_rpc_kind(certs: Path) -> None:
    full = sec(certs, secret=certs / "secret")

    async def every_kind(target: str) -> tuple[str, int, int]:
        async with open_channel(target, security=full) as channel:
            unary = await health_status(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            first = await anext(aiter(watch))
            watch.cancel()
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            bidi = stub.ServerReflectionInfo(timeout=5)
            await bidi.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            listed = await bidi.read()
            await bidi.done_writing()
        return unary, first.status, len(listed.list_services_response.service)

    unary, watched, services = serve_and(full, every_kind)
    assert unary == "SERVING" and watched == health_pb2.HealthCheckResponse.SERVING
    assert services >= 2  # health and reflection


def test_callers_without_certificate_or_secret_are_refused(certs: Path, other_ca: Path) -> None:
    full = sec(certs, secret=certs / "secret")
    wrong = certs.parent / "wrong-secret"
    wrong.write_text("x" * 64)

    async def all_callers(target: str) -> dict[str, str]:
        return {
            "none": await code_of(None)(target),
            "no secret": await code_of(sec(certs))(target),
            "wrong secret": await code_of(sec(certs, secret=wrong))(target),
            "other CA": await code_of(sec(other_ca, secret=certs / "secret"))(target),
        }

    codes = serve_and(full, all_callers)
    assert codes == {
        "none": "UNAVAILABLE",  # no TLS handshake
        "no secret": "UNAUTHENTICATED",
        "wrong secret": "UNAUTHENTICATED",
        "other CA": "UNAVAILABLE",  # its certificate does not verify
    }


def test_streams_without_the_secret_are_refused_too(certs: Path) -> None:
    async def stream_without_secret(target: str) -> tuple[str, str]:
        async with open_channel(target, security=sec(certs)) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            bidi = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
            codes = []
            for call in (watch, bidi):
                try:
                    await call.read()
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code().name)
            return codes[0], codes[1]

    assert serve_and(sec(certs, secret=certs / "secret"), stream_without_secret) == (
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
    )


def test_a_secret_alone_works_without_tls(certs: Path) -> None:
    only = sec(certs, tls=False, secret=certs / "secret")

    async def both(target: str) -> tuple[str, str]:
        return await code_of(only)(target), await code_of(None)(target)

    assert serve_and(only, both) == ("SERVING", "UNAUTHENTICATED")


def test_bad_security_sections_are_refused(certs: Path, tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="all of ca, cert and key"):
        Security.from_dict({"ca": "ca.pem", "cert": "internal.pem"}, certs)
    with pytest.raises(SecurityError, match="or both"):
        Security.from_dict({"server_name": "x"}, certs)
    with pytest.raises(SecurityError, match="mapping"):
        Security.from_dict({"ca": "ca.pem", "token": "t"}, certs)
    (tmp_path / "short").write_text("too-short")
    with pytest.raises(SecurityError, match=">= 16 bytes"):
        Security.from_dict({"secret_file": "short"}, tmp_path).secret()
    with pytest.raises(SecurityError, match="cannot read"):
        Security.from_dict({"secret_file": "missing"}, tmp_path).secret()


@pytest.fixture(scope="module")
def secured(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """Every kind of service, with mTLS and the secret on."""
    spec = {
        "checkpoint": "embedded",
        "model": {"threads": 1},
        "security": {
            "ca": str(certs / "ca.pem"),
            "cert": str(certs / "internal.pem"),
            "key": str(certs / "internal.key"),
            "secret_file": str(certs / "secret"),
        },
        "tokenizer": [{"name": "tokenizer-0", "port": free_port()}],
        "prefill": [{"name": "prefill-0", "port": free_port(), "kv_blocks": 64}],
        "decode": [{"name": "decode-0", "port": free_port(), "kv_blocks": 64}],
        "experts": "remote",
        "expert_pool": [
            {"name": "experts-0", "port": free_port(), "ranks": 1, "master_port": free_port()}
        ],
        "gateway": [
            {"name": "gateway-0", "port": free_port(), "config": str(ROOT / "deploy/gateway.yaml")}
        ],
    }
    path = tmp_path_factory.mktemp("secured") / "deployment.yaml"
    path.write_text(yaml.safe_dump(spec))
    suite = Suite(path)
    suite.start()  # the launcher's health checks pass only with the credentials
    yield suite
    suite.stop()


def test_a_secured_deployment_serves_and_refuses_callers_without_credentials(
    secured: Suite,
) -> None:
    dep = secured.deployment
    prompt = [5, 17, 300, 42, 7]
    request = decode_pb2.GenerateRequest(
        prompt_ids=prompt, max_new_tokens=6, sampling=common_pb2.SamplingParams(temperature=0)
    )

    async def generate(security: Security | None) -> list[int] | str:
        async with open_channel(dep.instance("decode-0").target, security=security) as channel:
            try:
                events = decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60)
                return [t.token_id for e in [e async for e in events] for t in e.tokens]
            except grpc.aio.AioRpcError as e:
                return e.code().name

    expected = generate_ids(load_model(EMBEDDED_CHECKPOINT), [prompt], 6)[0]
    assert asyncio.run(generate(dep.security)) == expected  # decode -> prefill -> experts
    assert asyncio.run(generate(None)) == "UNAVAILABLE"
    for name in ("tokenizer-0", "prefill-0", "experts-0"):
        assert probe_exit_code(dep.instance(name).target, None) == 1
        assert probe_exit_code(dep.instance(name).target, secured.deployment_path) == 0

    gateway = f"http://{dep.instance('gateway-0').target}"
    reply = httpx.post(
        f"{gateway}/v1/chat/completions",
        headers={"Authorization": "Bearer sk-k2serve-dev-key"},
        json={
            "model": "kimi-k2-instruct",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text  # gateway -> tokenizer and decode, secured


def probe_exit_code(target: str, deployment: Path | None) -> int:
    """deploy/health_probe.py's exit code (0: SERVING) for target, with the description's
    security when given."""
    args = [sys.executable, str(ROOT / "deploy" / "health_probe.py"), "--target", target]
    args += ["--deployment", str(deployment)] if deployment else []
    return subprocess.run(args, capture_output=True, timeout=30).returncode
