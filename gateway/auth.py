"""API keys and the profiles they carry: who may call, which models they may use, and their default.

Keys are compared in constant time (CVE-2025-59425 was a `==` on keys): the presented key and
every configured key are hashed to equal-length SHA-256 digests and each is compared with
`hmac.compare_digest`, without stopping at the first match, so the time taken does not depend
on which key (or how much of one) matched.

The check is a FastAPI dependency of each protected route, not a middleware matching path
prefixes: a request reaches a handler only through the router, so `//v1/...`, `/v1/../` or
percent-encoded paths either route to a handler (and its key check) or 404 (CVE-2026-48746).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from gateway import errors

ALL_MODELS = "*"


@dataclass(frozen=True)
class Profile:
    """What a key may do. `models` lists registry ids, or ALL_MODELS; `default_model` answers a
    request that names no model and is listed first by GET /v1/models."""

    name: str
    models: tuple[str, ...]
    default_model: str

    def allows(self, model: str) -> bool:
        return ALL_MODELS in self.models or model in self.models


@dataclass(frozen=True)
class ApiKey:
    name: str  # for logs and metrics; never the secret
    secret: str = field(repr=False)
    profile: Profile


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._keys = tuple((_digest(k.secret), k) for k in keys)

    def find(self, presented: str | None) -> ApiKey | None:
        """The key's record, or None. Every configured key is compared, match or not."""
        digest = _digest(presented or "")
        found: ApiKey | None = None
        for expected, key in self._keys:
            if hmac.compare_digest(digest, expected) and presented:
                found = key
        return found

    def authenticate(self, presented: str | None) -> ApiKey:
        """The key's record, or 401."""
        found = self.find(presented)
        if found is None:
            raise errors.invalid_api_key()
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value; None for any other scheme."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def presented_key(request: Request) -> str | None:
    """`Authorization: Bearer <key>` (OpenAI, Moonshot) or `x-api-key: <key>` (Anthropic)."""
    auth = request.headers.get("authorization")
    if auth is not None:
        return bearer_token(auth)
    return request.headers.get("x-api-key")


def require_key(request: Request) -> ApiKey:
    """FastAPI dependency: the caller's key, or 401."""
    keyring: KeyRing = request.app.state.keyring
    return keyring.authenticate(presented_key(request))


Key = Annotated[ApiKey, Depends(require_key)]  # a handler parameter `key: Key` requires a key
