"""A service process end to end: run() on uvloop + run_until_signal(); SIGTERM drains an
in-flight stream, then the process exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channel import open_channel
from tests.services.echo_service import grpc_pb, pb
from tests.services.test_server import REPO, detok_ids, detok_start, until_none

# A service __main__ in miniature: run() + run_until_signal(), an echoing Detokenize stream.
ECHO_SERVER = """
import asyncio

from services.common.server import ServerOptions, run, run_until_signal, start_server
from tests.services.echo_service import SERVICE, grpc_pb, pb


class Echo(grpc_pb.EchoServicer):
    async def Detokenize(self, request_iterator, context):
        async for item in request_iterator:
            if item.HasField("ids"):
                yield pb.DetokenizeOutput(content=str(list(item.ids.ids)))


async def main() -> None:
    register = [lambda s: grpc_pb.add_EchoServicer_to_server(Echo(), s)]
    running = await start_server("echo", register, [SERVICE], ServerOptions())
    running.set_serving()
    loop = type(asyncio.get_running_loop())
    print("PORT", running.port, loop.__module__, flush=True)
    await run_until_signal(running, grace_s=GRACE_S)


run(main)
"""
GRACE_S = 30.0


def test_sigterm_drains_an_in_flight_stream_and_exits_zero(tmp_path: Path) -> None:
    script = tmp_path / "echo_server.py"
    script.write_text(ECHO_SERVER.replace("GRACE_S", repr(GRACE_S)))
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    try:
        banner = proc.stdout.readline().split() if proc.stdout else []
        assert banner[:1] == ["PORT"], log_path.read_text()
        assert banner[2] == "uvloop"
        replies = asyncio.run(_stream_across_sigterm(proc, f"127.0.0.1:{banner[1]}"))
        assert replies == ["[1]", "[2]", "[3]"]
        assert proc.wait(timeout=GRACE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "SIGTERM received" in log_path.read_text()


async def _stream_across_sigterm(proc: subprocess.Popen[str], address: str) -> list[str]:
    """Open a stream, SIGTERM the server, wait until its health says NOT_SERVING (the drain has
    begun), then keep using the stream to its end."""
    channel = open_channel(address)
    inputs: asyncio.Queue[pb.DetokenizeInput | None] = asyncio.Queue()
    stream = grpc_pb.EchoStub(channel).Detokenize(until_none(inputs), timeout=GRACE_S)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), timeout=GRACE_S
    )
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    replies = []
    inputs.put_nowait(detok_start())
    inputs.put_nowait(detok_ids(1))
    replies.append((await stream.read()).content)
    os.kill(proc.pid, signal.SIGTERM)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    for token in (2, 3):
        inputs.put_nowait(detok_ids(token))
        replies.append((await stream.read()).content)
    inputs.put_nowait(None)
    assert await stream.read() is grpc.aio.EOF
    assert await stream.code() == grpc.StatusCode.OK
    await channel.close()
    return replies
