"""A deployment run across namespace "hosts": every instance in its host, reached by address.

The deployment YAML names hosts, not addresses (`hosts: {decode-a: decode-a}`): each service
resolves its peers through its host's /etc/hosts, as on real machines. The test process is not
inside any host, so it reaches an instance at the host's address (`Cluster.target`).
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.deployment import Deployment, Instance
from services.launcher import command
from tests.multihost.netns import Network, unavailable
from tests.timing import seconds

START_S = seconds(120.0)  # a model service loading on a busy 2-core machine


def build_network(names: list[str]) -> Network:
    """A fresh Network of these hosts, or a skip saying why namespaces are not available."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    return Network.build(names)


@dataclass
class Cluster:
    net: Network
    path: Path
    logs: Path
    procs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.deployment = Deployment.load(self.path)

    @classmethod
    def write(cls, net: Network, folder: Path, spec: dict[str, Any]) -> Cluster:
        """`spec` is a deployment without `hosts`: each instance's `host` is a Network host."""
        full = {"hosts": {name: name for name in net.hosts}, **spec}
        path = folder / "deployment.yaml"
        path.write_text(yaml.safe_dump(full))
        return cls(net, path, folder)

    def instance(self, name: str) -> Instance:
        return self.deployment.instance(name)

    def target(self, name: str) -> str:
        """host:port of an instance as the test process reaches it."""
        inst = self.instance(name)
        return f"{self.net.hosts[inst.host].ip}:{inst.port}"

    def url(self, name: str) -> str:
        return f"http://{self.target(name)}"

    def start(self, names: list[str]) -> None:
        """Start the named instances (every node of a pool spanning several, each in its own
        host, keyed by `process_name`) and wait until each instance serves."""
        for inst in self.deployment.processes():
            if inst.name in names:
                self.spawn(inst)
        asyncio.run(self._all_serving(names))

    def start_instance(self, name: str) -> None:
        self.spawn(self.instance(name))

    def spawn(self, inst: Instance) -> None:
        log = self.logs / f"{inst.process_name}.log"
        self.procs[inst.process_name] = self.net.spawn(inst.host, command(inst, self.path), log)

    def restart(self, name: str) -> None:
        """Start a stopped instance again and wait until it serves."""
        assert self.procs[name].poll() is not None, f"{name} is still running"
        self.start([name])

    async def _all_serving(self, names: list[str]) -> None:
        await asyncio.gather(*(self.serving(n) for n in names))

    async def serving(self, name: str, limit_s: float = START_S) -> None:
        deadline = time.monotonic() + limit_s
        while not await self._healthy(name):
            code = self.procs[name].poll()
            if code is not None:
                log = (self.logs / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited with {code} before serving:\n{log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not serving after {limit_s} s")
            await asyncio.sleep(0.2)

    async def _healthy(self, name: str) -> bool:
        if self.instance(name).kind == "gateway":
            try:
                async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
                    return (await client.get(f"{self.url(name)}/health")).status_code == 200
            except httpx.HTTPError:
                return False
        async with grpc.aio.insecure_channel(self.target(name)) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].wait()

    def children(self, name: str) -> list[int]:
        """Pids of a process's children (an expert pool node's ranks, its first rank first)."""
        pid = self.procs[name].pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def pids(self) -> dict[str, int]:
        """The live instances' pids (their children not included)."""
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}
