"""The gateway's ChatService: every chat goes to a tokenizer instance's Chat RPC, which owns text.

The gateway holds no tokenizer, model config or checkpoint: it converts the public request to a
k2.v1.ChatRequest (services/chat/codec.py), streams ChatEvents back, and asks a tokenizer for the
model's shape (Info) and the decode load it places by (Placement, for /metrics). Each call goes to
the tokenizer instance with the fewest calls from this gateway in flight, among those whose
channel is not failing (all of them when every one is). The call's deadline is the gateway's
request timeout; cancelling the iteration (the client went away) cancels the call, and with it
every decode stream beneath. A tokenizer's status comes back as the domain error it stands for.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from gateway.metrics import DecodeLoad
from gateway.registry import ModelShape
from services.chat.codec import event_from_proto, request_to_proto
from services.chat.types import ChatEvent, ChatRequest
from services.common.channel import error_from_status, open_channel
from services.common.security import Security
from services.pb.k2.v1 import tokenizer_pb2, tokenizer_pb2_grpc


@dataclass(eq=False)
class _Tokenizer:
    target: str
    channel: grpc.aio.Channel
    stub: tokenizer_pb2_grpc.TokenizerStub
    inflight: int = 0

    def failing(self) -> bool:
        return self.channel.get_state(True) == grpc.ChannelConnectivity.TRANSIENT_FAILURE


class TokenizerBackend:
    def __init__(
        self,
        targets: Sequence[str],
        *,
        security: Security | None = None,
        request_timeout_s: float = 600.0,
    ) -> None:
        if not targets:
            raise ValueError("the gateway needs at least one tokenizer instance")
        self.timeout_s = request_timeout_s
        self._tokenizers = []
        for target in targets:
            channel = open_channel(target, security=security)
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            self._tokenizers.append(_Tokenizer(target, channel, stub))

    async def close(self) -> None:
        for t in self._tokenizers:
            await t.channel.close()

    def _pick(self) -> _Tokenizer:
        candidates = [t for t in self._tokenizers if not t.failing()] or self._tokenizers
        return min(candidates, key=lambda t: t.inflight)

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        tokenizer = self._pick()
        tokenizer.inflight += 1
        call = tokenizer.stub.Chat(request_to_proto(request), timeout=self.timeout_s)
        try:
            async for event in call:
                yield event_from_proto(event)
        except grpc.aio.AioRpcError as e:
            raise error_from_status(e) from None
        finally:
            tokenizer.inflight -= 1
            call.cancel()

    async def count_tokens(self, request: ChatRequest) -> int:
        try:
            reply = await self._pick().stub.CountTokens(
                request_to_proto(request), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise error_from_status(e) from None
        return reply.prompt_tokens

    async def shape(self, wait_s: float) -> ModelShape:
        """The served model's shape, waiting up to wait_s for a tokenizer to come up."""
        try:
            info = await self._pick().stub.Info(
                tokenizer_pb2.InfoRequest(), timeout=wait_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as e:
            raise error_from_status(e) from None
        return ModelShape(info.context_length, info.vocab_size)

    async def decode_loads(self) -> list[DecodeLoad]:
        """The decode load a tokenizer places by (none when no tokenizer answers)."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await self._pick().stub.Placement(tokenizer_pb2.PlacementRequest(), timeout=5)
            return [
                DecodeLoad(
                    p.name,
                    p.stats.queued,
                    p.stats.running,
                    p.stats.kv_blocks_total,
                    p.stats.kv_blocks_free,
                    p.stats.backend.device,
                    p.stats.backend.ops,
                    p.stats.backend.dtype,
                )
                for p in reply.decodes
            ]
        return []
