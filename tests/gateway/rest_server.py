"""Run an ASGI app on a real uvicorn server in a background thread, for tests that need real
HTTP (SDK clients, streaming, disconnects, raw paths)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.config import GatewayConfig, Limits
from gateway.http_server import server_config
from services.chat.types import ChatService
from tests.e2e.suite_fixtures import free_port
from tests.gateway.rest_fakes import ScriptedChat, Switch, make_config

# One client for every test: creating one (its TLS context) costs ~0.1 s.
HTTP = httpx.Client(timeout=30)


@contextmanager
def serve(app: FastAPI, limits: Limits | None = None) -> Iterator[str]:
    """Yields the base URL (http://127.0.0.1:PORT) while the server runs, on the gateway's own
    server protocol (gateway/http_server.py)."""
    port = free_port()
    config = server_config(
        app, "127.0.0.1", port, limits or Limits(), log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def running(
    service: ChatService, config: GatewayConfig | None = None, **kwargs: Any
) -> Iterator[str]:
    """A gateway over `service` (default config: rest_fakes.make_config()) on a real server."""
    config = config or make_config()
    app = create_app(config, service, **kwargs)
    with serve(app, config.limits) as base:
        yield base


@contextmanager
def switched(**kwargs: Any) -> Iterator[Callable[[ScriptedChat], str]]:
    """One server for many tests: yields `use(fake) -> base URL`, which points it at `fake`."""
    switch = Switch()
    with running(switch, **kwargs) as base:

        def use(fake: ScriptedChat) -> str:
            switch.target = fake
            return base

        yield use
