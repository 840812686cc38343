"""Run every instance of a deployment as local processes: start, supervise, stop in order.

`Suite` is what `k2serve up` runs and what end-to-end tests use. It starts only the processes it
owns, each leading its own process group (services/common/processes.py), and:
- waits until each is healthy (grpc.health.v1 SERVING; the gateway's GET /health), and `up`
  then until the gateway is ready (`/health/ready`: a request would be served);
- supervises them (`supervise`): a process that exits is restarted on a doubling backoff while
  the others keep serving; restarts are counted in a state file the gateway exports as
  `k2_service_restarts_total`; `RestartPolicy.max_restarts` crashes in a row end the suite, loudly;
- stops in dependency order (`stop`): the gateway first (it stops accepting, and its in-flight
  streams finish through the backends still up), then decode and prefill, each draining its
  streams, then the expert pool and the tokenizer. SIGTERM first; SIGKILL, group and all, to what
  outlives the grace period.
Signals are handled from the start: SIGTERM or Ctrl-C during start-up stops what was started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channel import open_channel
from services.common.processes import SUPERVISOR_STATE_ENV, RestartPolicy, spawn, terminate
from services.common.security import Security
from services.deployment import Deployment, Instance

# Stopped stage by stage: each waits for the one before it to be gone.
STOP_ORDER: tuple[tuple[str, ...], ...] = (
    ("gateway",),
    ("decode",),
    ("prefill",),
    ("experts", "tokenizer"),
)
START_ORDER = ("experts", "tokenizer", "prefill", "decode", "gateway")


class LaunchError(RuntimeError):
    """An instance exited or did not become healthy in time."""


class Interrupted(Exception):
    """A stop was asked for while the suite was starting."""


Stopping = Callable[[], bool]


def _never() -> bool:
    return False


@dataclass
class Suite:
    deployment_path: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    state_file: Path | None = None  # where restart counts are kept for the gateway's metrics

    def __post_init__(self) -> None:
        self.deployment = Deployment.load(self.deployment_path)
        self._instances = {i.process_name: i for i in self.deployment.processes()}

    def start(
        self,
        timeout_s: float = 180.0,
        names: list[str] | None = None,
        stopping: Stopping = _never,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """Start every process (or those of the named instances) in dependency order, then
        wait until each instance serves (an expert pool spanning nodes serves once the ranks of
        every node have joined). Interrupted when `stopping()` turns true meanwhile."""
        wanted = [i for i in self.deployment.processes() if names is None or i.name in names]
        wanted.sort(key=lambda i: START_ORDER.index(i.kind))
        try:
            for inst in wanted:
                self.start_instance(inst)
            served = [i for i in wanted if i.node == 0]
            asyncio.run(self._wait_healthy(served, timeout_s, stopping, progress))
        except BaseException:
            self.stop()
            raise

    def start_instance(self, inst: Instance) -> subprocess.Popen:
        env = {**os.environ, **self.env}
        if self.state_file is not None:
            env[SUPERVISOR_STATE_ENV] = str(self.state_file)
        proc = spawn(command(inst, self.deployment_path), env)
        self.procs[inst.process_name] = proc
        return proc

    async def _wait_healthy(
        self,
        instances: list[Instance],
        timeout_s: float,
        stopping: Stopping,
        progress: Callable[[str], None] | None,
    ) -> None:
        deadline, started = time.monotonic() + timeout_s, time.monotonic()
        pending = {i.name for i in instances}

        async def one(inst: Instance) -> None:
            await self._wait_one(inst, deadline, stopping)
            pending.discard(inst.name)
            if progress is not None:
                progress(f"  {inst.name} healthy after {time.monotonic() - started:.0f} s")

        async def report() -> None:
            while progress is not None:
                await asyncio.sleep(10)
                waited = time.monotonic() - started
                progress(f"  waiting for {', '.join(sorted(pending))} ({waited:.0f} s) ...")

        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(one(i) for i in instances))
        finally:
            reporter.cancel()

    async def _wait_one(self, inst: Instance, deadline: float, stopping: Stopping) -> None:
        async with _health_probe(inst, self.deployment.security) as healthy:
            while True:
                if stopping():
                    raise Interrupted
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

    def supervise(
        self,
        stopping: Stopping,
        policy: RestartPolicy | None = None,
        log: Callable[[str], None] = print,
        poll_s: float = 0.2,
    ) -> int:
        """Restart whatever exits, until `stopping()` (0) or a process crashed
        `policy.max_restarts` times in a row (1: the suite cannot run)."""
        policy = policy or RestartPolicy()
        failures: dict[str, int] = {}
        started = dict.fromkeys(self.procs, time.monotonic())
        due: dict[str, float] = {}  # name -> when to restart it
        self._write_state()
        while not stopping():
            now = time.monotonic()
            for name, proc in list(self.procs.items()):
                if name in due or proc.poll() is None:
                    continue
                quick = now - started[name] < policy.healthy_after_s
                failures[name] = failures.get(name, 0) + 1 if quick else 1
                if failures[name] > policy.max_restarts:
                    log(
                        f"{name} exited with code {proc.returncode}, {failures[name]} times in a "
                        "row; giving up: stopping the suite"
                    )
                    return 1
                delay = policy.delay(failures[name])
                log(f"{name} exited with code {proc.returncode}; restarting it in {delay:.1f} s")
                due[name] = now + delay
            for name, when in list(due.items()):
                if now >= when:
                    del due[name]
                    self.start_instance(self._instances[name])
                    started[name] = time.monotonic()
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    self._write_state()
            time.sleep(poll_s)
        return 0

    def _write_state(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"restarts": self.restarts}))
        tmp.replace(self.state_file)

    def stop(self, grace_s: float = 15.0) -> dict[str, int]:
        """Stop stage by stage (STOP_ORDER), each with grace_s; returns exit codes."""
        codes: dict[str, int] = {}
        stages = [
            [n for n in self.procs if self._instances[n].kind in kinds] for kinds in STOP_ORDER
        ]
        for names in stages:
            ended = terminate([self.procs[n] for n in names], grace_s)
            codes.update(zip(names, ended, strict=True))
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
    inst: Instance, security: Security | None, path: str = "health"
) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """Yields a one-second health check of `inst`: False while it is not serving yet."""
    if inst.kind == "gateway":
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:

            async def http_ok() -> bool:
                try:
                    return (await client.get(f"{endpoint(inst)}{path}")).status_code == 200
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


async def wait_ready(suite: Suite, stopping: Stopping, timeout_s: float = 120.0) -> bool:
    """Until every gateway says /health/ready (True), or stopping / the timeout (False)."""
    deadline = time.monotonic() + timeout_s
    for inst in suite.deployment.of_kind("gateway"):
        async with _health_probe(inst, None, "health/ready") as ready:
            while not await ready():
                if stopping() or time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.2)
    return True


def up(deployment_path: Path) -> int:
    """`k2serve up`: start the suite, say when it is ready and where it listens, supervise it,
    and stop it in order on Ctrl-C or SIGTERM (also during start-up). Returns the exit code."""
    stop = {"signal": 0}

    def on_signal(sig: int, _frame: object) -> None:
        stop["signal"] = sig

    def stopping() -> bool:
        return bool(stop["signal"])

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="k2serve-") as run_dir:
        suite = Suite(deployment_path, state_file=Path(run_dir) / "supervisor.json")
        began = time.monotonic()
        n = len(suite.deployment.processes())
        print(f"starting {n} processes from {deployment_path} ...", flush=True)
        code = 0
        try:
            suite.start(stopping=stopping, progress=lambda line: print(line, flush=True))
            if not asyncio.run(wait_ready(suite, stopping)):
                if not stopping():
                    raise LaunchError("the gateway did not become ready (GET /health/ready)")
            else:
                for inst in suite.deployment.instances:
                    print(f"  {inst.kind:<10} {inst.name:<14} {endpoint(inst)}", flush=True)
                for inst in suite.deployment.of_kind("gateway"):
                    print(f"chat page and OpenAI/Anthropic API: {endpoint(inst)}", flush=True)
                print(
                    f"ready in {time.monotonic() - began:.0f} s; Ctrl-C stops the suite", flush=True
                )
                code = suite.supervise(stopping)
        except Interrupted:
            print("stop requested during start-up", flush=True)
        except LaunchError as e:
            print(f"k2serve: {e}", file=sys.stderr, flush=True)
            code = 1
        finally:
            if suite.procs:
                print(
                    "stopping (gateway, then decode and prefill, then experts and tokenizer) ...",
                    flush=True,
                )
            codes = suite.stop()
            if codes:
                print(f"stopped: {codes}", flush=True)
    return code  # a stop that was asked for is a clean exit
