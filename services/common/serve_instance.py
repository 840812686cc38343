"""The tail every service's __main__ shares: serve one instance until SIGTERM, then drain."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from services.common.security import Security
from services.common.server import ServerOptions, run_until_signal, start_server
from services.deployment import Instance

GRACE_S = 10.0


async def serve_instance(
    me: Instance,
    register: Callable[[grpc.aio.Server], None],
    service: str,
    background: tuple[Coroutine[Any, Any, None], ...] = (),
    security: Security | None = None,
) -> None:
    """Bind me.target, run `background` (engine loops) beside the server, report SERVING, print
    "NAME listening on ADDR" (launchers and tests read it), and drain on SIGTERM / SIGINT."""
    options = ServerOptions(bind=me.target, security=security)
    running = await start_server(me.name, [register], [service], options)
    tasks = [asyncio.create_task(c) for c in background]
    running.set_serving()
    print(f"{me.name} listening on {running.address}", flush=True)
    try:
        await run_until_signal(running, grace_s=GRACE_S)
    finally:
        for task in tasks:
            task.cancel()
