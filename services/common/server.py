"""Shared grpc.aio server plumbing: error mapping, health, reflection, limits, graceful drain.

Every service starts through `start_server` and runs its `__main__` through `run`, so all of them
share one error contract (docs/reliability.md section 1), the standard grpc.health.v1 service (NOT_SERVING
until `set_serving()`), reflection, explicit message-size and keepalive limits, a loopback bind by
default, and a SIGTERM drain that lets in-flight streams finish within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import errors
from services.common.security import Security

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DRAINING = "server is draining; retry on another instance"
DRAIN_NOTICE_S = 0.5  # how long a draining server answers new calls itself before stopping

# Looked up along the raised type's MRO: a subclass maps as its nearest listed base, and
# InvalidArgument / OutOfRange (also ValueErrors) map as themselves.
_STATUS: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
}

# The least interval between client pings we tolerate; more often counts as a ping strike.
_MIN_CLIENT_PING_INTERVAL_MS = 1_000


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The status and caller-safe details for a domain error; None for anything unexpected."""
    for cls in type(exc).__mro__:
        code = _STATUS.get(cls)
        if code is not None:
            details = exc.message if isinstance(exc, errors.ServiceError) else str(exc)
            return code, errors.capped(details)
    return None


async def _abort(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    mapped = _status_for(exc)
    if mapped is None:
        error_id = uuid.uuid4().hex[:12]
        log.error("%s: unexpected error (id %s)", method, error_id, exc_info=exc)
        mapped = grpc.StatusCode.INTERNAL, f"internal error (id {error_id})"
    else:
        log.debug("%s: %s: %s", method, mapped[0].name, mapped[1])
    await context.abort(*mapped)


@dataclass(frozen=True)
class _Undecodable:
    """What a request's bytes decode to when they are not the method's message."""

    reason: str


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, returning _Undecodable instead of raising: grpc would answer a
    raising deserializer with INTERNAL, but bad bytes are the caller's error."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(f"{type(exc).__name__}: {exc}")

    return decode


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(
            f"the request bytes are not this method's message ({request.reason})"
        )
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def _guard(
    behavior: Callable[..., Any],
    method: str,
    draining: Callable[[], bool],
    request_stream: bool = False,
) -> Callable[..., Any]:
    """Wrap one handler so every exception leaves as a mapped status, and undecodable request
    bytes as INVALID_ARGUMENT. AbortError (the handler called context.abort itself) and
    CancelledError (a BaseException) pass through untouched. Synchronous handlers (only the
    generated base classes' UNIMPLEMENTED stubs: every servicer in this suite is async) are
    returned as they are, so they keep running off the event loop."""
    decoded = _decoded_stream if request_stream else _decoded
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if draining():
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
            try:
                # aclosing: when grpc closes this wrapper, the handler's own `finally` runs now.
                async with contextlib.aclosing(behavior(decoded(request), context)) as responses:
                    async for response in responses:
                        yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if draining():
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)
            try:
                return await behavior(decoded(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, method)

        return call
    return behavior


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place where domain errors become gRPC status codes, for all four RPC kinds and for
    errors raised mid-stream. Unexpected exceptions become INTERNAL with an opaque id; the
    traceback goes to the log under that id, never to the caller. Once `draining` is set, new
    calls are refused with UNAVAILABLE (retryable elsewhere) while in-flight ones run on."""

    def __init__(self) -> None:
        self.draining = False

    def _is_draining(self) -> bool:
        return self.draining

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        codecs = {
            "request_deserializer": _lenient(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _guard(handler.unary_unary, method, self._is_draining), **codecs
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _guard(handler.unary_stream, method, self._is_draining), **codecs
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _guard(handler.stream_unary, method, self._is_draining, True), **codecs
            )
        return grpc.stream_stream_rpc_method_handler(
            _guard(handler.stream_stream, method, self._is_draining, True), **codecs
        )


@dataclass(frozen=True)
class ServerOptions:
    bind: str = "127.0.0.1:0"  # never all interfaces by default; port 0 picks a free port
    max_message_bytes: int = 64 * MiB  # both directions (grpc's own receive default is 4 MiB)
    keepalive_time_ms: int = 10_000
    keepalive_timeout_ms: int = 5_000
    grace_s: float = 10.0
    max_concurrent_rpcs: int | None = None
    security: Security | None = None  # mTLS and/or the shared secret (deployment `security`)


def _server_args(options: ServerOptions) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", options.max_message_bytes),
        ("grpc.max_receive_message_length", options.max_message_bytes),
        ("grpc.keepalive_time_ms", options.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", options.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", _MIN_CLIENT_PING_INTERVAL_MS),
        # Without this a second server could bind the same explicit port and share its traffic.
        ("grpc.so_reuseport", 0),
    ]


class _Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 with a synchronous setter, so `set_serving()` has taken effect when it
    returns (the asyncio servicer in grpcio-health-checking only offers a coroutine `set`).
    Unknown services: Check gives NOT_FOUND, Watch streams SERVICE_UNKNOWN, as the protocol says.
    After `shut_down()` every status stays NOT_SERVING and Watch streams end after saying so, so
    a watching load balancer never holds a drain open until its grace runs out."""

    def __init__(self, services: Sequence[str]) -> None:
        self._status = dict.fromkeys(services, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._changed: set[asyncio.Event] = set()
        self._final = False

    def set_all(self, status: int) -> None:  # a HealthCheckResponse.ServingStatus
        if not self._final:
            self._status = dict.fromkeys(self._status, status)
            for changed in self._changed:
                changed.set()

    def shut_down(self) -> None:
        self.set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._final = True

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        changed = asyncio.Event()
        self._changed.add(changed)
        sent = None
        try:
            while True:
                changed.clear()  # before reading: a change after the read wakes the wait below
                status = self._status.get(
                    request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                )
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status)
                    sent = status
                if self._final:
                    return
                await changed.wait()
        finally:
            self._changed.discard(changed)


class RunningServer:
    """A started server. `set_serving()` flips health to SERVING once the service can answer
    (weights loaded); `drain()` is the graceful way down."""

    def __init__(
        self,
        name: str,
        server: grpc.aio.Server,
        health: _Health,
        host: str,
        port: int,
        interceptor: ErrorInterceptor,
    ) -> None:
        self.name = name
        self._interceptor = interceptor
        self.server = server
        self.port = port
        self.address = f"{host}:{port}"
        self._health = health

    def set_serving(self) -> None:
        self._health.set_all(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, grace_s: float) -> None:
        """Health goes NOT_SERVING for good, new RPCs are refused (UNAVAILABLE), in-flight RPCs
        get grace_s to finish and are cancelled after that. Returns once the server has stopped."""
        log.info("%s: draining (grace %.1f s)", self.name, grace_s)
        self._interceptor.draining = True
        self._health.shut_down()
        # Calls on open connections meet the interceptor's UNAVAILABLE first; once the server
        # stops, the library itself refuses (with CANCELLED, which clients cannot tell apart).
        await asyncio.sleep(min(DRAIN_NOTICE_S, grace_s))
        await self.server.stop(grace_s)
        log.info("%s: stopped", self.name)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    name: str,
    register: Sequence[Callable[[grpc.aio.Server], None]],
    service_full_names: Sequence[str],
    options: ServerOptions,
) -> RunningServer:
    """Start a server with the given servicers (each `register` item adds one, e.g.
    `lambda s: add_TokenizerServicer_to_server(servicer, s)`), health and reflection. Health
    reports NOT_SERVING for "" and every name in service_full_names until `set_serving()`."""
    interceptor = ErrorInterceptor()
    security = options.security or Security()
    server = grpc.aio.server(
        interceptors=[*security.server_interceptors(), interceptor],
        options=_server_args(options),
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    for add in register:
        add(server)
    health = _Health(["", *service_full_names])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        [*service_full_names, health_name, reflection.SERVICE_NAME], server
    )
    host = options.bind.rpartition(":")[0]
    try:
        credentials = security.server_credentials()
        if credentials is None:
            port = server.add_insecure_port(options.bind)
        else:
            port = server.add_secure_port(options.bind, credentials)
    except RuntimeError as exc:
        raise OSError(f"{name}: cannot bind {options.bind}") from exc
    await server.start()
    running = RunningServer(name, server, health, host, port, interceptor)
    log.info("%s: listening on %s", name, running.address)
    return running


async def run_until_signal(running: RunningServer, grace_s: float) -> None:
    """Serve until SIGTERM or SIGINT, then drain within grace_s. Returns when the server stopped
    (also if it stopped for another reason)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig)

    stop_signals = (signal.SIGTERM, signal.SIGINT)
    for sig in stop_signals:
        loop.add_signal_handler(sig, on_signal, sig)
    terminated = asyncio.ensure_future(running.wait_for_termination())
    try:
        await asyncio.wait({received, terminated}, return_when=asyncio.FIRST_COMPLETED)
        if received.done():
            log.info("%s: %s received", running.name, received.result().name)
            await running.drain(grace_s)
    finally:
        terminated.cancel()
        for sig in stop_signals:
            loop.remove_signal_handler(sig)


EXIT_STARTUP = 2  # the instance cannot start as its deployment entry says


class StartupError(RuntimeError):
    """The instance cannot start here as its deployment entry says (the message says why)."""


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a service's main coroutine on uvloop (the entry point of every service __main__). A
    StartupError ends the process with its message on one line and EXIT_STARTUP, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except StartupError as e:
        log.critical("cannot start: %s", e)
        raise SystemExit(EXIT_STARTUP) from None


def deadline_remaining(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline (never negative), or None when it set none.
    Pass it on as the timeout of downstream calls so the whole chain shares one deadline."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining)
