"""ASGI middleware: every response carries `x-request-id`, and every request leaves one log line.

The id is the client's own `X-Request-Id` when it sends a usable one (1-128 characters of
letters, digits and `._:-`; what proxies and SDKs generate), else a fresh `req-<32 hex>`. The
line (logger `gateway.access`): the id, method, path, status, milliseconds, and the completion's
id (`chatcmpl-...`, which the tokenizer and decode services log) where a route set one in
`scope["state"]["completion_id"]`, so one grep follows a request through every service.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway.access")
HEADER = b"x-request-id"
_USABLE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == HEADER and _USABLE.match(value):
            return value.decode()
    return f"req-{uuid.uuid4().hex}"


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, start = request_id_of(scope), time.perf_counter()
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 499}

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            completion = scope["state"].get("completion_id")
            log.info(
                "%s %s %s %d %.0fms%s",
                request_id,
                scope.get("method", ""),
                scope.get("path", ""),
                status["code"],
                1e3 * (time.perf_counter() - start),
                f" {completion}" if completion else "",
            )
