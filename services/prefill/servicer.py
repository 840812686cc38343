"""gRPC adapter for the prefill engine: proto -> engine job -> streamed KV chunks -> first token."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import grpc

from services.common.constraint_codec import constraint_from_proto
from services.common.sampling_codec import sampled_token_to_proto, sampling_from_proto
from services.common.tensor_codec import tensor_to_proto
from services.pb.k2.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from services.prefill.engine import KvPart, PrefillEngine


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine) -> None:
        self.engine = engine

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
        params = sampling_from_proto(request.sampling)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        constraint = constraint_from_proto(request.constraint)
        job = self.engine.submit(
            request.request_id, list(request.prompt_ids), params, seed, constraint
        )
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, KvPart):
                    latent = tensor_to_proto(item.latent)
                    self.engine.kv_bytes_sent += len(latent.data)
                    kv = prefill_pb2.KvChunk(
                        layer=item.layer, token_start=item.token_start, latent=latent
                    )
                    yield prefill_pb2.PrefillChunk(kv=kv)
                else:
                    yield prefill_pb2.PrefillChunk(first_token=sampled_token_to_proto(*item))
                    return
        finally:
            self.engine.cancel(job)

    async def Stats(
        self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillStats:
        return prefill_pb2.PrefillStats(**self.engine.stats())
