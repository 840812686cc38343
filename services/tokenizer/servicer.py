"""The k2.v1.Tokenizer servicer: proto <-> domain around ChatText and ChatPipeline, nothing more.

Render runs in a worker thread (a long prompt must not stall the event loop that serves every
stream); Chat and CountTokens render there too (chat_pipeline.py). Chat's budget is the call's
own deadline (the gateway's request timeout), capped by the pipeline's default.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from services.chat.codec import (
    event_to_proto,
    messages_from_proto,
    request_from_proto,
    tools_from_proto,
)
from services.pb.k2.v1 import chat_types_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from services.tokenizer.chat_pipeline import ChatPipeline
from services.tokenizer.chat_text import ChatText

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, text: ChatText, pipeline: ChatPipeline) -> None:
        self.text, self.pipeline = text, pipeline

    async def Chat(
        self, request: chat_types_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[chat_types_pb2.ChatEvent]:
        chat = request_from_proto(request)
        async with contextlib.aclosing(self.pipeline.chat(chat, context.time_remaining())) as it:
            async for event in it:
                yield event_to_proto(event)

    async def CountTokens(
        self, request: chat_types_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_types_pb2.TokenCount:
        count = await self.pipeline.count_tokens(request_from_proto(request))
        return chat_types_pb2.TokenCount(prompt_tokens=count)

    async def Render(
        self, request: tokenizer_pb2.RenderRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.RenderReply:
        messages = messages_from_proto(request.messages)
        tools = tools_from_proto(request.tools)
        rendered = await asyncio.to_thread(
            self.text.render, messages, tools, request.add_generation_prompt
        )
        return tokenizer_pb2.RenderReply(
            prompt_ids=rendered.prompt_ids,
            prompt_text=rendered.prompt_text,
            stop_ids=rendered.stop_ids,
        )

    async def Info(
        self, request: tokenizer_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.ModelInfo:
        return tokenizer_pb2.ModelInfo(
            context_length=self.text.context,
            vocab_size=self.text.vocab_size,
            reasoning=self.text.reasoning,
        )

    async def Placement(
        self, request: tokenizer_pb2.PlacementRequest, context: grpc.aio.ServicerContext
    ) -> tokenizer_pb2.PlacementReply:
        await self.pipeline.decodes.polled(wait_s=self.pipeline.decodes.stats_timeout_s)
        return tokenizer_pb2.PlacementReply(
            decodes=[
                tokenizer_pb2.PeerLoad(name=p.name, stats=p.last)
                for p in self.pipeline.decodes.answered()
            ]
        )
