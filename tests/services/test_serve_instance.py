"""A service whose engine loop dies goes NOT_SERVING, fails its calls fast and exits to be
restarted (it used to stay SERVING while requests hung). The service runs in its
own process, as under `k2serve up`."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.serve_instance import EXIT_ENGINE_DIED
from tests.e2e.suite_fixtures import free_port

SERVICE = """
import asyncio, sys
from services.common.serve_instance import serve_instance
from services.common.server import run
from services.deployment import Instance

async def engine():
    await asyncio.sleep(float(sys.argv[2]))
    raise RuntimeError("the model step blew up")

async def main():
    me = Instance("decode", "decode-x", "h", "127.0.0.1", int(sys.argv[1]))
    await serve_instance(me, lambda s: None, "k2.v1.Decode", (engine(),))

run(main)
"""


def test_an_engine_loop_that_dies_takes_the_service_down_to_be_restarted() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVICE, str(port), "3"])
    statuses = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    statuses.append(reply.status)
                except grpc.RpcError:
                    statuses.append(None)
                time.sleep(0.05)
        assert proc.wait(30) == EXIT_ENGINE_DIED
    finally:
        proc.kill()
        proc.wait()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert serving in statuses
    after = statuses[len(statuses) - statuses[::-1].index(serving) :]
    assert all(s != serving for s in after)  # once down, never SERVING again
