"""The gRPC Chat API authenticates like REST: a real grpc.aio Chat server over a scripted pipeline
(tests/gateway/rest_fakes.py), a real grpc client.

Regression: `k2.v1.Chat` answered ListModels, Chat and CountTokens without any
key, and the compose files publish its port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gateway.grpc_chat import registry_services, start_chat_server
from services.pb.k2.v1 import chat_pb2, chat_pb2_grpc, chat_types_pb2
from tests.gateway.rest_fakes import ENTERPRISE_KEY, ORDINARY_KEY, ScriptedChat, make_config

HELLO = [chat_types_pb2.ChatMessage(role="user", text="hello there")]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def _with_server(body) -> None:
    config = make_config()
    pipeline = ScriptedChat()
    services = registry_services(config.registry, pipeline)
    running = await start_chat_server(services, 4096, config.keyring())
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            await body(chat_pb2_grpc.ChatStub(channel), pipeline)
    finally:
        await running.server.stop(None)


def serve(body) -> None:
    asyncio.run(_with_server(body))


async def _code(call: AsyncIterator | object) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[union-attr]
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        bearer("sk-wrong-key-0000"),
        bearer(""),
        (("authorization", f"Basic {ORDINARY_KEY}"),),
        (("x-api-key", "sk-wrong-key-0000"),),
        bearer(ORDINARY_KEY[:-1]),
    ],
)
def test_every_rpc_without_a_valid_key_is_unauthenticated(metadata) -> None:
    """No key, a wrong key, another scheme or a key's prefix: UNAUTHENTICATED on every RPC, and
    the pipeline never sees the request."""

    async def body(stub: chat_pb2_grpc.ChatStub, pipeline: ScriptedChat) -> None:
        request = chat_types_pb2.ChatRequest(model="kimi-k2-instruct", messages=HELLO)
        calls = [
            stub.ListModels(chat_pb2.ListModelsRequest(), metadata=metadata, timeout=10),
            stub.Chat(request, metadata=metadata, timeout=10),
            stub.CountTokens(request, metadata=metadata, timeout=10),
        ]
        assert [await _code(c) for c in calls] == [grpc.StatusCode.UNAUTHENTICATED] * 3
        assert pipeline.requests == []

    serve(body)


def test_profiles_apply_as_on_rest() -> None:
    """A model outside the key's profile is PERMISSION_DENIED; an empty model is the profile's
    default; ListModels shows only what the key may use, its default first."""

    async def body(stub: chat_pb2_grpc.ChatStub, pipeline: ScriptedChat) -> None:
        ordinary, enterprise = bearer(ORDINARY_KEY), bearer(ENTERPRISE_KEY)
        listed = await stub.ListModels(chat_pb2.ListModelsRequest(), metadata=ordinary)
        assert list(listed.models) == ["kimi-k2-instruct"]
        listed = await stub.ListModels(chat_pb2.ListModelsRequest(), metadata=enterprise)
        assert list(listed.models) == ["kimi-k2-thinking", "kimi-k2-instruct"]

        thinking = chat_types_pb2.ChatRequest(model="kimi-k2-thinking", messages=HELLO)
        code = await _code(stub.Chat(thinking, metadata=ordinary, timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert pipeline.requests == []

        events = [e async for e in stub.Chat(thinking, metadata=enterprise, timeout=10)]
        assert "".join(e.content for e in events) == "hello there"
        default = chat_types_pb2.ChatRequest(messages=HELLO)
        counted = await stub.CountTokens(default, metadata=ordinary, timeout=10)
        assert counted.prompt_tokens == 2
        assert [r.model for r in pipeline.requests] == ["kimi-k2-thinking", "kimi-k2-instruct"]
        assert [r.thinking for r in pipeline.requests] == [True, False]

    serve(body)


def test_unknown_model_names_are_cut_in_the_error() -> None:
    """A 1 MiB model name is NOT_FOUND with a short message (it used to be echoed whole)."""

    async def body(stub: chat_pb2_grpc.ChatStub, pipeline: ScriptedChat) -> None:
        request = chat_types_pb2.ChatRequest(model="m" * (1 << 20), messages=HELLO)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CountTokens(request, metadata=bearer(ENTERPRISE_KEY), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(info.value.details()) < 300

    serve(body)
