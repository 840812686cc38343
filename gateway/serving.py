"""The state every REST handler shares, and one admitted generation's event stream.

`Gateway.resolve` turns a key and a requested model id into a registry entry (404 unknown,
403 not allowed for the key's profile; no id means the profile's default). `Gateway.start`
admits a request (429 past `max_concurrent_requests`), starts it on the model's ChatService and
waits for its first event, so that a failure before any output (bad prompt, context exceeded,
queue full, backend down) is an ordinary HTTP error even on a streaming route.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import Request

from gateway import errors
from gateway.auth import ApiKey, KeyRing
from gateway.config import GatewayConfig
from gateway.events import settle
from gateway.metrics import GatewayMetrics
from gateway.registry import LocalModel, Model
from gateway.response_store import ResponseStore
from services.chat.types import ChatEvent, ChatRequest, ChatService


class Generation:
    """An admitted request's settled events. `close()` (idempotent) closes every iterator of the
    chain innermost last, so the ChatService sees its iterator closed, and frees the slot."""

    def __init__(
        self, chain: list[AsyncIterator[ChatEvent]], first: ChatEvent | None, gateway: Gateway
    ) -> None:
        self._chain = chain
        self._first: ChatEvent | None = first
        self._gateway: Gateway | None = gateway

    async def __aiter__(self) -> AsyncIterator[ChatEvent]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for event in self._chain[0]:
            yield event

    async def close(self) -> None:
        await _close_all(self._chain)
        if self._gateway is not None:
            self._gateway.release()
            self._gateway = None


@dataclass
class Gateway:
    config: GatewayConfig
    keyring: KeyRing
    services: dict[str, ChatService]
    metrics: GatewayMetrics
    in_flight: int = 0
    responses: ResponseStore = field(default_factory=ResponseStore)  # /v1/responses, stored

    def resolve(self, key: ApiKey, requested: str | None) -> Model:
        """No model: the key's default; an empty name is a mistake, not a request for it."""
        if requested == "":
            raise errors.invalid_value(
                "model: must not be empty (omit it for the default)", "model"
            )
        model_id = key.profile.default_model if requested is None else requested
        model = self.config.registry.get(model_id)
        if not key.profile.allows(model_id):
            raise errors.permission_denied(model_id)
        return model

    @staticmethod
    def default_thinking(model: Model) -> bool | None:
        return model.thinking if isinstance(model, LocalModel) else None

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)

    async def start(self, request: ChatRequest, request_id: str) -> Generation:
        if self.in_flight >= self.config.limits.max_concurrent_requests:
            raise errors.rate_limited("Too many requests in flight; retry shortly")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        source = self.services[request.model].chat(replace(request, request_id=request_id))
        timed = self.metrics.timed(source, request.model, time.perf_counter())
        settled = settle(timed)
        chain = [settled, timed, source]
        try:
            first = await anext(settled, None)
        except BaseException:
            await _close_all(chain)
            self.release()
            raise
        return Generation(chain, first, self)


async def _close_all(chain: list[AsyncIterator[ChatEvent]]) -> None:
    for it in chain:
        aclose = getattr(it, "aclose", None)  # a ChatService may return any AsyncIterator
        if aclose is not None:
            await aclose()


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway
