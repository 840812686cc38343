"""gRPC adapter for the decode engine: proto -> engine sequence -> streamed token events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from services.common.constraint_codec import constraint_from_proto
from services.common.sampling_codec import sampled_token_to_proto, sampling_from_proto
from services.decode.engine import DecodeEngine
from services.pb.k2.v1 import common_pb2, decode_pb2, decode_pb2_grpc


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine

    async def Generate(
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.GenerateEvent]:
        seq = self.engine.submit(
            request.request_id or uuid.uuid4().hex,
            list(request.prompt_ids),
            sampling_from_proto(request.sampling),
            request.max_new_tokens,
            frozenset(request.stop_ids),
            constraint_from_proto(request.constraint),
            request.min_new_tokens,
        )
        first = True
        async for batch in self.engine.events(seq):
            yield decode_pb2.GenerateEvent(
                tokens=[sampled_token_to_proto(t) for t in batch.tokens],
                finish_reason=batch.finish_reason or "",
                prompt_tokens=len(seq.prompt) if first else 0,
            )
            first = False

    async def Stats(
        self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> decode_pb2.DecodeStats:
        backend = common_pb2.Backend(**self.engine.model.rt.fields())
        return decode_pb2.DecodeStats(**self.engine.stats(), backend=backend)
