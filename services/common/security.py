"""Optional mutual TLS and a shared-secret check on the suite's internal gRPC (docs/reliability.md section 3).

Configured in the deployment description; paths are relative to it:

    security:
      ca: certs/ca.pem                # the CA that signed the internal certificate
      cert: certs/internal.pem        # the services' identity, as servers and as clients
      key: certs/internal.key
      server_name: k2serve.internal   # the name clients check in that certificate
      secret_file: certs/secret       # a shared secret every internal call carries

TLS (ca, cert and key, all three) and the secret can each be used alone. With TLS a server
accepts only clients that present a certificate signed by the CA; with a secret it answers any
call whose `x-k2serve-secret` metadata is missing or wrong with UNAUTHENTICATED (constant-time
comparison). Clients opened through services.common.channel present both.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SECRET_HEADER = "x-k2serve-secret"
_KEYS = {"ca", "cert", "key", "server_name", "secret_file"}


class SecurityError(ValueError):
    """A security section that is malformed or names files that cannot be read."""


@dataclass(frozen=True)
class Security:
    """Paths, resolved against the description; the files are read when a server or channel is
    made, so a description can name files that exist only on the nodes (compose)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    secret_file: Path | None = None
    server_name: str = "k2serve.internal"

    @classmethod
    def from_dict(cls, raw: Any, base: Path) -> Security:
        if not isinstance(raw, dict) or set(raw) - _KEYS:
            raise SecurityError(f"security must be a mapping of {sorted(_KEYS)}")
        tls = [k for k in ("ca", "cert", "key") if k in raw]
        if tls and len(tls) != 3:
            raise SecurityError("security: TLS needs all of ca, cert and key")
        if not tls and "secret_file" not in raw:
            raise SecurityError("security: give TLS files (ca, cert, key), a secret_file, or both")
        paths = {k: (base / str(raw[k])).resolve() for k in (*tls, "secret_file") if k in raw}
        return cls(**paths, server_name=str(raw.get("server_name", "k2serve.internal")))

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def files(self) -> dict[str, Path]:
        """The configured files by key (what a container must mount)."""
        named = {"ca": self.ca, "cert": self.cert, "key": self.key, "secret_file": self.secret_file}
        return {k: v for k, v in named.items() if v is not None}

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(_read(self.key), _read(self.cert))],
            root_certificates=_read(self.ca),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(_read(self.ca), _read(self.key), _read(self.cert))

    def channel_options(self) -> list[tuple[str, str]]:
        """Peers are dialled by address; the certificate names the suite, not each host."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls else []

    def secret(self) -> bytes | None:
        if self.secret_file is None:
            return None
        secret = _read(self.secret_file).strip()
        if len(secret) < 16:
            raise SecurityError(f"{self.secret_file}: the shared secret must be >= 16 bytes")
        return secret

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        secret = self.secret()
        return [SecretCheck(secret)] if secret else []

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """What each call sends (synchronous channels pass it per call)."""
        secret = self.secret()
        return ((SECRET_HEADER, secret.decode()),) if secret else ()

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """Adds call_metadata() to every call of an aio channel."""
        metadata = self.call_metadata()
        return [kind(metadata) for kind in _SECRET_SENDERS] if metadata else []


def _read(path: Path | None) -> bytes:
    assert path is not None
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecurityError(f"security: cannot read {path}: {e.strerror}") from e


class SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every call that does not carry the shared secret, before its handler runs."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        sent = dict(details.invocation_metadata or ()).get(SECRET_HEADER, "")
        sent = sent if isinstance(sent, bytes) else sent.encode()
        if handler is None or hmac.compare_digest(sent, self._secret):
            return handler
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal credentials")


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind that refuses the call before reading any message."""
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_refuse, **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_refuse, **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(_refuse, **codecs)


class _SecretSender:
    """Adds the secret to every call's metadata (one subclass per gRPC call kind)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _with_secret(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*(details.metadata or ()), *self._metadata),
            details.credentials,
            details.wait_for_ready,
        )

    async def _call(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_secret(details), request)


class _UnaryUnary(_SecretSender, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _SecretSender._call


class _UnaryStream(_SecretSender, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _SecretSender._call


class _StreamUnary(_SecretSender, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _SecretSender._call


class _StreamStream(_SecretSender, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _SecretSender._call


_SECRET_SENDERS = (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)
