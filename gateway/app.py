"""The gateway's FastAPI app: `create_app(config, chat_service)`.

Layers, outermost first: RequestIds (x-request-id on every response, one access-log line per
request) -> RequestCounter (metrics by route and status) -> SizeGuard (header and
body limits, before any parsing) -> InternalErrors (a bug is a 500) -> routing. Every error
leaves through `ApiError.response` in the OpenAI or Anthropic shape, whichever the path belongs
to: validation errors are 400s naming the field path, unknown routes 404, domain errors per
errors.py, anything else a 500 that leaks nothing. /health (liveness), /health/ready (readiness:
readiness.py), /metrics, the OpenAPI document and
the web chat page (`/` and its files under /static, gateway/static/) need no key; every /v1 route
(and its /anthropic twin) checks the key itself (auth.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import anthropic, errors, openai_routes, responses_routes
from gateway.config import GatewayConfig, Limits
from gateway.json_text import lone_surrogate
from gateway.metrics import GatewayMetrics, RequestCounter, StatsSource
from gateway.readiness import Readiness
from gateway.registry import UpstreamModel
from gateway.request_ids import RequestIds
from gateway.serving import Gateway
from gateway.sse import ClientDisconnected
from gateway.upstream import UpstreamChatService
from services.chat.types import ChatService
from services.common.errors import ServiceError

log = logging.getLogger(__name__)

UPSTREAM_TIMEOUT = httpx.Timeout(10.0, read=300.0)
_IDENTIFIER = re.compile(r"^\w+$")
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
STATIC_DIR = Path(__file__).parent / "static"
# The chat page loads nothing the gateway does not serve (no CDN) and runs no inline code.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


class SizeGuard:
    """413 for a body over max_body_bytes (declared or actually sent, chunked included), 431 for
    more than max_header_count headers or over max_header_bytes of them (the server protocol,
    gateway/http_server.py, already stops a longer head on the wire). The body is read here,
    bounded, and replayed to the app."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        headers = scope["headers"]
        too_many = len(headers) > self.limits.max_header_count
        if too_many or sum(len(k) + len(v) for k, v in headers) > self.limits.max_header_bytes:
            await errors.headers_too_large(self.limits.max_header_bytes).response(scope["path"])(
                scope, receive, send
            )
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        body = b""
        more = not declared.isdigit() or int(declared) <= limit
        too_large = not more
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_large = len(body) > limit
            more = more and not too_large
        if too_large:
            await errors.request_too_large(limit).response(scope["path"])(scope, receive, send)
            return
        surrogate = lone_surrogate(body)
        if surrogate is not None:
            await surrogate.response(scope["path"])(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later receives: the disconnect, for cancellation
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class InternalErrors:
    """A bug's exception becomes the fixed 500 body (details go to the log only). Unlike
    Starlette's outermost error middleware this answers without re-raising, so the server
    keeps the client's connection open."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started or scope["type"] != "http":
                raise  # a response is under way: nothing coherent can follow it
            await errors.from_exception(exc).response(scope["path"])(scope, receive, send)


def _param(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as a JSON path: ('body', 'messages', 0, 'content') ->
    messages[0].content. Union-member tags pydantic inserts ('str', 'list[...]') are dropped."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENTIFIER.match(part) and part not in _TYPE_TAGS and not part[0].isupper():
            path += f".{part}" if path else part
    return path or None


def _most_specific(found: list[dict[str, Any]]) -> dict[str, Any]:
    """Of the errors a union produces (one per member), the one that got furthest: the
    longest location, preferring a failed constraint over a wrong-type mismatch."""
    return max(
        found, key=lambda e: (len(e.get("loc", ())), not e.get("type", "").endswith("_type"))
    )


def _validation_error(exc: RequestValidationError) -> errors.ApiError:
    first = _most_specific(list(exc.errors()))
    param = _param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return errors.invalid_request("The request body is not valid JSON")
    if param is None:
        return errors.invalid_value(f"The request body must be a JSON object: {message}")
    return errors.invalid_value(f"{param}: {message}", param)


def _install_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, err: errors.ApiError) -> Response:
        return err.response(request.url.path)

    async def api_error(request: Request, exc: Exception) -> Response:
        return respond(request, errors.from_exception(exc))

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return respond(request, _validation_error(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return respond(request, errors.route_not_found(request.method, request.url.path))
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            return respond(
                request, errors.method_not_allowed(request.method, request.url.path, allow)
            )
        return respond(request, errors.invalid_request(str(exc.detail), exc.status_code))

    async def disconnected(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it; metrics count the abandonment

    app.add_exception_handler(errors.ApiError, api_error)
    app.add_exception_handler(ServiceError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientDisconnected, disconnected)


def create_app(
    config: GatewayConfig,
    chat_service: ChatService,
    *,
    decode_stats: StatsSource | None = None,
    readiness: Readiness | None = None,
    supervisor_state: Path | None = None,
) -> FastAPI:
    """The gateway serving every local registry model with `chat_service` (the pipeline) and
    every upstream one through its provider."""
    client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT)
    services: dict[str, ChatService] = {
        m.id: UpstreamChatService(m, client) if isinstance(m, UpstreamModel) else chat_service
        for m in config.registry.models
    }
    metrics = GatewayMetrics(decode_stats, supervisor_state)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()
        if readiness is not None:
            await readiness.close()

    # strict_content_type=False: a body sent without Content-Type is still read as JSON.
    # redirect_slashes=False: `/v1/models/` is a 404, not a redirect to a route.
    app = FastAPI(
        title="k2serve gateway",
        version="1",
        lifespan=lifespan,
        strict_content_type=False,
        redirect_slashes=False,
    )
    app.state.gateway = Gateway(config, config.keyring(), services, metrics)
    app.state.keyring = app.state.gateway.keyring
    _install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(anthropic.router)
    app.include_router(responses_routes.router)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: this process answers."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> Response:
        """Readiness: a request sent now would be served (readiness.py); 503 until then."""
        if readiness is None:  # no backends of its own (tests over a fake pipeline)
            return JSONResponse({"status": "ready", "services": {}})
        ok, services = await readiness.check()
        body = {"status": "ready" if ok else "not ready", "services": services}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    app.add_middleware(InternalErrors)
    app.add_middleware(SizeGuard, limits=config.limits)
    app.add_middleware(RequestCounter, metrics=metrics)
    app.add_middleware(RequestIds)
    return app
