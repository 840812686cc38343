"""Domain errors for the services, one class per gRPC status a service decides to send.

Service and engine code raise these; `services.common.server.ErrorInterceptor` is the one place
that turns them into status codes, so this module does not import grpc. The message is shown to
the caller as the status details: it must name the offending field or limit and never carry
internals (paths, tracebacks, peer addresses).
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 2048  # a message longer than this is cut: it may quote the caller's input


def shown(text: str, limit: int = 128) -> str:
    """A caller-supplied value as a message quotes it: repr, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def capped(message: str) -> str:
    """A message bounded to MAX_MESSAGE_CHARS, whatever it quotes."""
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 3] + "..."


class ServiceError(Exception):
    """Base of the errors a caller is allowed to see. `message` is the caller-safe text, bounded
    (`capped`): it becomes gRPC status details, which a client's metadata limit bounds too."""

    def __init__(self, message: str) -> None:
        message = capped(message)
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError, ValueError):
    """A request field is malformed or outside its allowed range."""


class OutOfRange(ServiceError, ValueError):
    """A request is valid on its own but exceeds a model limit (prompt + new tokens > context)."""


class NotFound(ServiceError):
    """A named thing (model, request id, service) does not exist here."""


class ResourceExhausted(ServiceError):
    """Shedding: the queue is full or a quota is spent. The caller may retry later."""


class Unavailable(ServiceError):
    """This service or a peer it needs cannot take the request now (down, draining)."""


class DeadlineExceeded(ServiceError):
    """An internal deadline passed before the work finished."""


class FailedPrecondition(ServiceError):
    """The request does not fit the current state (e.g. a stream message out of order)."""


class PermissionDenied(ServiceError):
    """The caller is known but not allowed to do this."""


class Unauthenticated(ServiceError):
    """The caller's credentials are missing or wrong."""
