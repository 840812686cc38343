"""Readiness: whether a request sent now would be served, as `/health/ready` reports it.

`/health` is liveness (the gateway process answers). Ready means every backend kind a request
passes through has at least one instance that says SERVING on grpc.health.v1: tokenizer,
prefill, decode, and the expert pool (its node-0 process) when the deployment runs experts
remote. Instances are probed concurrently when asked, at most once a second (results are
cached), each with a timeout, so a scrape never waits on a dead backend for long.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channel import open_channel
from services.deployment import Deployment, Instance

REQUIRED = ("tokenizer", "prefill", "decode")


class Readiness:
    def __init__(
        self, deployment: Deployment, probe_timeout_s: float = 2.0, max_age_s: float = 1.0
    ) -> None:
        kinds = (*REQUIRED, "experts") if deployment.remote_experts is not None else REQUIRED
        self.instances = [i for k in kinds for i in deployment.of_kind(k)]
        self.kinds = kinds
        self.security = deployment.security
        self.probe_timeout_s, self.max_age_s = probe_timeout_s, max_age_s
        self._stubs: dict[str, health_pb2_grpc.HealthStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._last: tuple[float, dict[str, bool]] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, dict[str, bool]]:
        """(ready, instance name -> SERVING)."""
        async with self._lock:
            if self._last is None or time.monotonic() - self._last[0] > self.max_age_s:
                serving = await asyncio.gather(*(self._probe(i) for i in self.instances))
                names = [i.name for i in self.instances]
                self._last = (time.monotonic(), dict(zip(names, serving, strict=True)))
            states = self._last[1]
        ready = all(
            any(states[i.name] for i in self.instances if i.kind == kind) for kind in self.kinds
        )
        return ready, states

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def _probe(self, inst: Instance) -> bool:
        stub = self._stubs.get(inst.name)
        if stub is None:  # opened here: grpc.aio channels belong to the serving loop
            channel = open_channel(inst.target, security=self.security)
            self._channels.append(channel)
            stub = self._stubs[inst.name] = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.probe_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
