"""The gateway's one error contract: every failure becomes an `ApiError`, rendered in the exact
OpenAI or Anthropic body shape (docs/reliability.md section 1).

| HTTP | OpenAI type / code                          | Anthropic type        | from            |
|------|---------------------------------------------|-----------------------|-----------------|
| 400  | invalid_request_error / invalid_value       | invalid_request_error | InvalidArgument |
| 400  | invalid_request_error / context_length_exceeded | invalid_request_error | OutOfRange  |
| 401  | invalid_request_error / invalid_api_key     | authentication_error  | Unauthenticated |
| 403  | permission_denied / permission_denied       | permission_error      | PermissionDenied|
| 404  | invalid_request_error / model_not_found     | not_found_error       | NotFound        |
| 413  | invalid_request_error / request_too_large   | request_too_large     |                 |
| 429  | rate_limit_exceeded / rate_limit_exceeded   | rate_limit_error      | ResourceExhausted |
| 503  | server_error / service_unavailable          | overloaded_error      | Unavailable     |
| 504  | server_error / timeout                      | api_error             | DeadlineExceeded |
| 500  | server_error / internal_error               | api_error             | anything else   |

OpenAI bodies always carry all four keys (`param` and `code` may be null, `code` is a string).
429 and 503 carry Retry-After: the OpenAI SDK honours it when retrying.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse

from services.common import errors as svc

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# A service message that starts with a field path ("messages[2].content: ...") names the param.
_PARAM_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


@dataclass(eq=False)  # not frozen: the runtime sets __traceback__ / __context__ on exceptions
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    anthropic_type: str = "invalid_request_error"
    retry_after: int | None = None
    allow: str | None = None  # a 405's Allow header

    def __post_init__(self) -> None:
        self.message = svc.capped(self.message)  # it may quote the request
        if self.param is not None:
            self.param = svc.capped(self.param)

    def headers(self) -> dict[str, str]:
        out = {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}
        return out if self.allow is None else {**out, "Allow": self.allow}

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}

    def response(self, path: str) -> JSONResponse:
        body = self.anthropic_body() if is_anthropic_path(path) else self.openai_body()
        return JSONResponse(body, status_code=self.status, headers=self.headers())


def is_anthropic_path(path: str) -> bool:
    """Which error shape a path gets (also a path that matches no route): Anthropic's for
    /v1/messages... and everything under Moonshot's /anthropic base URL."""
    return path.startswith(("/anthropic/", "/v1/messages"))


def invalid_value(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def invalid_request(message: str, status: int = 400) -> ApiError:
    """A malformed request with no single field to blame (bad JSON, unknown route)."""
    return ApiError(status, message)


def context_length_exceeded(message: str) -> ApiError:
    return ApiError(400, message, code="context_length_exceeded", param="messages")


def invalid_api_key() -> ApiError:
    return ApiError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
        code="invalid_api_key",
        anthropic_type="authentication_error",
    )


def permission_denied(model: str) -> ApiError:
    return ApiError(
        403,
        f"This API key may not use the model {svc.shown(model)}",
        type="permission_denied",
        code="permission_denied",
        param="model",
        anthropic_type="permission_error",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model {svc.shown(model)} does not exist",
        code="model_not_found",
        param="model",
        anthropic_type="not_found_error",
    )


def route_not_found(method: str, path: str) -> ApiError:
    return ApiError(
        404, f"Invalid URL ({method} {svc.shown(path, 256)})", anthropic_type="not_found_error"
    )


def method_not_allowed(method: str, path: str, allow: str) -> ApiError:
    return ApiError(
        405,
        f"Method {method} is not allowed for {svc.shown(path, 256)}; allowed: {allow}",
        code="method_not_allowed",
        allow=allow,
    )


def request_too_large(limit: int, what: str = "body") -> ApiError:
    return ApiError(
        413,
        f"Request {what} exceeds the limit of {limit} bytes",
        code="request_too_large",
        anthropic_type="request_too_large",
    )


def headers_too_large(limit: int) -> ApiError:
    return ApiError(
        431,
        f"Request headers exceed the limit of {limit} bytes",
        code="request_too_large",
        anthropic_type="request_too_large",
    )


def rate_limited(message: str) -> ApiError:
    return ApiError(
        429,
        message,
        type="rate_limit_exceeded",
        code="rate_limit_exceeded",
        anthropic_type="rate_limit_error",
        retry_after=RETRY_AFTER_S,
    )


def unavailable(message: str) -> ApiError:
    return ApiError(
        503,
        message,
        type="server_error",
        code="service_unavailable",
        anthropic_type="overloaded_error",
        retry_after=RETRY_AFTER_S,
    )


def timeout(message: str) -> ApiError:
    return ApiError(504, message, type="server_error", code="timeout", anthropic_type="api_error")


def internal() -> ApiError:
    # The message is fixed: a bug's details (paths, tracebacks, peers) stay in the server log.
    return ApiError(
        500,
        "The server had an error while processing the request",
        type="server_error",
        code="internal_error",
        anthropic_type="api_error",
    )


def param_of(message: str) -> str | None:
    match = _PARAM_PREFIX.match(message)
    return match.group(1) if match else None


def from_exception(exc: BaseException) -> ApiError:
    """The ApiError for anything a handler or the chat service raised."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, svc.OutOfRange):
        return context_length_exceeded(exc.message)
    if isinstance(exc, svc.InvalidArgument | svc.FailedPrecondition):
        return invalid_value(exc.message, param_of(exc.message))
    if isinstance(exc, svc.NotFound):
        return ApiError(404, exc.message, code="model_not_found", anthropic_type="not_found_error")
    if isinstance(exc, svc.Unauthenticated):
        return invalid_api_key()
    if isinstance(exc, svc.PermissionDenied):
        return ApiError(
            403,
            exc.message,
            type="permission_denied",
            code="permission_denied",
            anthropic_type="permission_error",
        )
    if isinstance(exc, svc.ResourceExhausted):
        return rate_limited(exc.message)
    if isinstance(exc, svc.Unavailable):
        return unavailable(exc.message)
    if isinstance(exc, svc.DeadlineExceeded):
        return timeout(exc.message)
    log.error("unhandled error in a request", exc_info=exc)
    return internal()
