"""The tail every service's __main__ shares: serve one instance until SIGTERM, then drain.

The engine loops beside the server are supervised: a loop that ends while the service is meant
to serve (it raised, or returned) leaves the service unable to answer, so health goes
NOT_SERVING at once, every call in flight fails fast with UNAVAILABLE, and the process exits
with EXIT_ENGINE_DIED for its supervisor (`k2serve up`, or the container's restart policy) to
start it again. It never stays SERVING while requests hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from services.common.security import Security
from services.common.server import ServerOptions, run_until_signal, start_server
from services.deployment import Instance

GRACE_S = 10.0
EXIT_ENGINE_DIED = 3
log = logging.getLogger(__name__)


class EngineDied(SystemExit):
    """The process's exit when an engine loop ended on its own."""

    def __init__(self) -> None:
        super().__init__(EXIT_ENGINE_DIED)


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
    serving = asyncio.create_task(run_until_signal(running, grace_s=GRACE_S))
    try:
        await asyncio.wait([serving, *tasks], return_when=asyncio.FIRST_COMPLETED)
        died = [t for t in tasks if t.done()]
        if died and not serving.done():
            error = died[0].exception() if not died[0].cancelled() else None
            log.critical(
                "%s: an engine loop ended; exiting to be restarted", me.name, exc_info=error
            )
            await running.drain(0.0)  # run_until_signal returns once the server has stopped
            await serving
            raise EngineDied()
        await serving
    finally:
        for task in tasks:
            task.cancel()
