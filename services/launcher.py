"""Start every instance of a deployment as local processes, wait until all are healthy, stop cleanly.

`Suite` is what `k2serve up` runs and what end-to-end tests use: it starts only the processes it
owns, and `stop()` sends SIGTERM (each service drains its in-flight streams), then SIGKILL to any
that outlive the grace period. The gRPC services are `python -m services.<kind>` and healthy
when grpc.health.v1 says SERVING; the gateway is `python -m gateway` and healthy when its
GET /health answers 200.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channel import open_channel
from services.common.processes import terminate
from services.common.security import Security
from services.deployment import Deployment, Instance


class LaunchError(RuntimeError):
    """An instance exited or did not become healthy in time."""


@dataclass
class Suite:
    deployment_path: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.deployment = Deployment.load(self.deployment_path)

    def start(self, timeout_s: float = 180.0, names: list[str] | None = None) -> None:
        """Start every process (or those of the named instances), then wait until each instance
        serves (an expert pool spanning nodes serves once the ranks of every node have joined)."""
        wanted = [i for i in self.deployment.processes() if names is None or i.name in names]
        for inst in wanted:
            self.start_instance(inst)
        try:
            served = [i for i in wanted if i.node == 0]
            asyncio.run(self._wait_healthy(served, timeout_s))
        except BaseException:
            self.stop()
            raise

    def start_instance(self, inst: Instance) -> subprocess.Popen:
        cmd = command(inst, self.deployment_path)
        proc = subprocess.Popen(cmd, env={**os.environ, **self.env}, start_new_session=True)
        self.procs[inst.process_name] = proc
        return proc

    async def _wait_healthy(self, instances: list[Instance], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        await asyncio.gather(*(self._wait_one(i, deadline) for i in instances))

    async def _wait_one(self, inst: Instance, deadline: float) -> None:
        async with _health_probe(inst, self.deployment.security) as healthy:
            while True:
                code = self.procs[inst.name].poll()
                if code is not None:
                    raise LaunchError(
                        f"{inst.name} exited with code {code} before becoming healthy"
                    )
                if time.monotonic() > deadline:
                    raise LaunchError(f"{inst.name} was not healthy at {inst.target} in time")
                if await healthy():
                    return
                await asyncio.sleep(0.2)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)

    def stop(self, grace_s: float = 15.0) -> dict[str, int]:
        """SIGTERM everything, wait up to grace_s, SIGKILL the rest; returns exit codes."""
        codes = dict(zip(self.procs, terminate(list(self.procs.values()), grace_s), strict=True))
        self.procs.clear()
        return codes


def command(inst: Instance, deployment_path: Path, python: str = sys.executable) -> list[str]:
    """The command line that runs one instance (also in containers: services/compose.py)."""
    deployment = ["--deployment", str(deployment_path)]
    if inst.kind == "gateway":
        own = ["--config", str(inst.config), "--host", inst.address, "--port", str(inst.port)]
        return [python, "-m", "gateway", *deployment, *own]
    node = ["--node", str(inst.node)] if inst.node else []
    return [python, "-m", f"services.{inst.kind}", *deployment, "--name", inst.name, *node]


def endpoint(inst: Instance) -> str:
    """Where users reach an instance: the gateway's URL (its chat page), else the gRPC target."""
    return f"http://{inst.target}/" if inst.kind == "gateway" else inst.target


@asynccontextmanager
async def _health_probe(
    inst: Instance, security: Security | None
) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """Yields a one-second health check of `inst`: False while it is not serving yet."""
    if inst.kind == "gateway":
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:

            async def http_ok() -> bool:
                try:
                    return (await client.get(f"{endpoint(inst)}health")).status_code == 200
                except httpx.HTTPError:
                    return False

            yield http_ok
        return
    async with open_channel(inst.target, security=security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        yield serving


def up(deployment_path: Path) -> None:
    """`k2serve up`: start the suite, print where it listens, stop cleanly on Ctrl-C or SIGTERM."""
    suite = Suite(deployment_path)
    print(
        f"starting {len(suite.deployment.instances)} services from {deployment_path} ...",
        flush=True,
    )
    suite.start()
    for inst in suite.deployment.instances:
        print(f"  {inst.kind:<10} {inst.name:<14} {endpoint(inst)}", flush=True)
    for inst in suite.deployment.of_kind("gateway"):
        print(f"chat page and OpenAI/Anthropic API: {endpoint(inst)}", flush=True)
    print("all services healthy; Ctrl-C stops the suite", flush=True)
    stop = {"signal": None}

    def on_signal(sig: int, _frame: object) -> None:
        stop["signal"] = sig

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while stop["signal"] is None:
            for name, proc in suite.procs.items():
                if proc.poll() is not None:
                    print(
                        f"{name} exited with code {proc.returncode}; stopping the suite",
                        file=sys.stderr,
                    )
                    stop["signal"] = signal.SIGTERM
            time.sleep(0.5)
    finally:
        codes = suite.stop()
        print(f"stopped: {codes}", flush=True)
