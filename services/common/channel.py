"""Client side of the shared plumbing: channels with the same limits and keepalive as our servers,
readiness and grpc.health.v1 checks, and a peer's status back as the domain error it stands for.

Keepalive pings on an otherwise silent connection turn a network partition into a failed call
within keepalive_time + keepalive_timeout instead of a hang until the deadline. Redials of a peer
that went away are at most max_reconnect_backoff_ms apart (grpc's default grows to 120 s), so a
restarted peer is reached within about a second of coming back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import errors
from services.common.errors import Unavailable
from services.common.security import Security

MiB = 1024 * 1024

# A peer's status as the error this process reports for it. A peer's PERMISSION_DENIED or
# UNAUTHENTICATED is our own deployment's credentials failing, not the caller's: INTERNAL.
_FROM_STATUS: dict[grpc.StatusCode, type[errors.ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.Unavailable,  # a peer that went away mid-call
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
}


class BackendError(RuntimeError):
    """A peer failed in a way the caller cannot act on (INTERNAL for the caller)."""


def error_from_status(e: grpc.aio.AioRpcError) -> Exception:
    """A peer's status as the domain error reported for it, its details kept."""
    cls = _FROM_STATUS.get(e.code())
    if cls is None:
        return BackendError(f"backend {e.code().name}")
    return cls(e.details() or e.code().name.lower())


def open_channel(
    target: str,
    *,
    max_message_bytes: int = 64 * MiB,
    keepalive_time_ms: int = 10_000,
    keepalive_timeout_ms: int = 5_000,
    max_reconnect_backoff_ms: int = 1_000,
    security: Security | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to a peer from configuration (never from a request): insecure, or
    with the deployment's mTLS and shared secret when it has a `security` section."""
    security = security or Security()
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
        *security.channel_options(),
    ]
    interceptors = security.client_interceptors()
    credentials = security.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def open_sync_channel(
    target: str, options: list[tuple[str, Any]], security: Security | None = None
) -> grpc.Channel:
    """A synchronous channel with the deployment's TLS, if any. Its calls must pass
    `metadata=security.call_metadata()` themselves (aio channels add it by interceptor)."""
    security = security or Security()
    credentials = security.channel_credentials()
    options = [*options, *security.channel_options()]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


async def wait_ready(channel: grpc.aio.Channel, timeout_s: float) -> None:
    """Wait until the channel is connected; Unavailable if that takes longer than timeout_s.
    Connected is not ready to serve: check `health_status` for that."""
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
    except TimeoutError as exc:
        raise Unavailable(f"peer not reachable within {timeout_s:g} s") from exc


async def health_status(
    channel: grpc.aio.Channel, service: str = "", timeout_s: float = 5.0
) -> str:
    """The peer's grpc.health.v1 status name for `service` ("" = the whole server): "SERVING",
    "NOT_SERVING", or "SERVICE_UNKNOWN" when the peer does not know the service. Transport
    failures raise grpc.aio.AioRpcError as usual."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        raise
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
