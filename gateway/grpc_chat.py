"""The k2.v1.Chat servicer: the gRPC Chat API as a thin adapter onto the chat pipeline.

proto -> ChatRequest (services/chat/codec.py) -> edge checks (below) -> ChatService.chat -> proto
events.
Errors are domain errors, mapped to status codes by the shared ErrorInterceptor
(services/common/server.py): a bad request is INVALID_ARGUMENT, an unknown model NOT_FOUND.

Every call presents one of the gateway's API keys as REST does, in the metadata
`authorization: Bearer <key>`, and gets the same profile: a missing or wrong key is
UNAUTHENTICATED (compared in constant time, gateway/auth.py), a model outside the key's profile
PERMISSION_DENIED, an empty `model` the profile's default, and ListModels lists only what the key
may use, its default first. The port is meant to be reachable by internal clients; it is as
protected as the REST port, not more.
When the client cancels, grpc cancels this handler, which closes the pipeline's iterator and so
cancels the decode calls beneath it.

Edge limits (docs/reliability.md section 2; the same numbers as the REST gateway's defaults):
messages >= 1, n in [1, MAX_N], up to MAX_STOP stop strings of 1..MAX_STOP_CHARS characters,
up to MAX_TOOLS tools named [a-zA-Z0-9_-]{1,64} with at most MAX_SCHEMA_BYTES of schemas,
max_tokens >= 1, temperature <= 2, logit_bias ids inside the vocabulary, text-only content.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace

import grpc

from gateway.auth import ApiKey, KeyRing, bearer_token
from gateway.registry import LocalModel, Registry
from k2model.text.messages import ImagePart
from services.chat.codec import event_to_proto, request_from_proto
from services.chat.types import ChatEvent, ChatRequest, ChatService
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    shown,
)
from services.common.server import RunningServer, ServerOptions, start_server
from services.pb.k2.v1 import chat_pb2, chat_pb2_grpc, chat_types_pb2

SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name
MAX_N = 8
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_TOOLS = 128
MAX_SCHEMA_BYTES = 64 * 1024
MAX_TEMPERATURE = 2.0
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def check_request(request: ChatRequest, vocab_size: int) -> None:
    """InvalidArgument naming the first field outside the edge limits."""
    if not request.messages:
        raise InvalidArgument("messages: at least one message is required")
    for i, m in enumerate(request.messages):
        if isinstance(m.content, tuple) and any(isinstance(p, ImagePart) for p in m.content):
            raise InvalidArgument(f"messages[{i}]: image content is not supported (text only)")
    if not 1 <= request.n <= MAX_N:
        raise InvalidArgument(f"n: must be in [1, {MAX_N}], got {request.n}")
    if len(request.stop) > MAX_STOP:
        raise InvalidArgument(f"stop: at most {MAX_STOP} strings")
    for i, s in enumerate(request.stop):
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"stop[{i}]: must be 1 to {MAX_STOP_CHARS} characters")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise InvalidArgument(f"max_tokens: must be >= 1, got {request.max_tokens}")
    if request.sampling.temperature > MAX_TEMPERATURE:
        raise InvalidArgument(f"sampling.temperature: must be in [0, {MAX_TEMPERATURE:g}]")
    bad = [t for t, _ in request.sampling.logit_bias if t >= vocab_size]
    if bad:
        raise InvalidArgument(f"sampling.logit_bias: ids outside the vocabulary: {bad[:5]}")
    _check_tools(request)


def _check_tools(request: ChatRequest) -> None:
    if len(request.tools) > MAX_TOOLS:
        raise InvalidArgument(f"tools: at most {MAX_TOOLS}")
    schema_bytes = 0
    for i, tool in enumerate(request.tools):
        if not _TOOL_NAME.fullmatch(tool.name):
            raise InvalidArgument(f"tools[{i}].name: must match [a-zA-Z0-9_-]{{1,64}}")
        schema_bytes += len(json.dumps(tool.parameters, separators=(",", ":")).encode())
    if schema_bytes > MAX_SCHEMA_BYTES:
        raise InvalidArgument(f"tools: parameter schemas exceed {MAX_SCHEMA_BYTES} bytes")


def _caller(keyring: KeyRing, context: grpc.aio.ServicerContext) -> ApiKey:
    """The call's API key (`authorization: Bearer <key>` metadata), or UNAUTHENTICATED."""
    metadata = dict(context.invocation_metadata() or ())
    key = keyring.find(bearer_token(metadata.get("authorization")))
    if key is None:
        raise Unauthenticated(
            "missing or incorrect API key: send metadata 'authorization: Bearer <key>'"
        )
    return key


class ChatServicer(chat_pb2_grpc.ChatServicer):
    def __init__(
        self, services: Mapping[str, ChatService], vocab_size: int, keyring: KeyRing
    ) -> None:
        self.services, self.vocab_size, self.keyring = dict(services), vocab_size, keyring

    def _resolve(
        self, msg: chat_types_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> tuple[ChatService, ChatRequest]:
        key = _caller(self.keyring, context)
        model = msg.model or key.profile.default_model
        if not key.profile.allows(model):
            raise PermissionDenied(f"model: this API key may not use {shown(model)}")
        service = self.services.get(model)
        if service is None:
            raise NotFound(f"model {shown(model)} is not served here")
        request = replace(request_from_proto(msg), model=model)
        check_request(request, self.vocab_size)
        return service, request

    async def Chat(
        self, request: chat_types_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_types_pb2.ChatEvent]:
        service, chat_request = self._resolve(request, context)
        async with contextlib.aclosing(service.chat(chat_request)) as events:
            async for event in events:
                yield event_to_proto(event)

    async def CountTokens(
        self, request: chat_types_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_types_pb2.TokenCount:
        service, chat_request = self._resolve(request, context)
        return chat_types_pb2.TokenCount(prompt_tokens=await service.count_tokens(chat_request))

    async def ListModels(
        self, request: chat_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ModelList:
        profile = _caller(self.keyring, context).profile
        allowed = sorted(m for m in self.services if profile.allows(m))
        allowed.sort(key=lambda m: m != profile.default_model)
        return chat_pb2.ModelList(models=allowed)


@dataclass(frozen=True)
class WithModelDefaults:
    """A ChatService that applies a registry model's defaults (thinking on or off) before the
    pipeline, as the REST handlers do when they build the ChatRequest."""

    inner: ChatService
    model: LocalModel

    def chat(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        return self.inner.chat(self._apply(request))

    async def count_tokens(self, request: ChatRequest) -> int:
        return await self.inner.count_tokens(self._apply(request))

    def _apply(self, request: ChatRequest) -> ChatRequest:
        if request.thinking is None and self.model.thinking is not None:
            return replace(request, thinking=self.model.thinking)
        return request


def registry_services(registry: Registry, pipeline: ChatService) -> dict[str, ChatService]:
    """The registry's local models, each served by the pipeline with its own defaults."""
    return {
        m.id: WithModelDefaults(pipeline, m) for m in registry.models if isinstance(m, LocalModel)
    }


async def start_chat_server(
    services: Mapping[str, ChatService],
    vocab_size: int,
    keyring: KeyRing,
    bind: str = "127.0.0.1:0",
) -> RunningServer:
    """The Chat API on its own grpc.aio server (health, reflection, error mapping), serving;
    every call must present one of `keyring`'s keys."""
    servicer = ChatServicer(services, vocab_size, keyring)
    running = await start_server(
        "chat",
        [lambda s: chat_pb2_grpc.add_ChatServicer_to_server(servicer, s)],
        [SERVICE_NAME],
        ServerOptions(bind=bind),
    )
    running.set_serving()
    return running
