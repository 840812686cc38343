"""gRPC adapter for the prefill engine: proto -> engine job, its events -> streamed chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common.constraint_codec import constraint_from_proto
from services.common.sampling_codec import sampled_token_to_proto, sampling_from_proto
from services.common.tensor_codec import tensor_to_proto
from services.pb.k2.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from services.prefill.engine import Failed, FirstToken, KvPart, PrefillEngine


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: PrefillEngine) -> None:
        self.engine = engine

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
        job = self.engine.submit(
            request.request_id,
            list(request.prompt_ids),
            sampling_from_proto(request.sampling),
            constraint_from_proto(request.constraint),
        )
        try:
            while True:
                match await job.out.get():
                    case KvPart(layer, start, latent):
                        kv = prefill_pb2.KvChunk(
                            layer=layer, token_start=start, latent=tensor_to_proto(latent)
                        )
                        yield prefill_pb2.PrefillChunk(kv=kv)
                    case FirstToken(sampled):
                        yield prefill_pb2.PrefillChunk(first_token=sampled_token_to_proto(sampled))
                        return
                    case Failed(error):
                        raise error
        finally:
            self.engine.cancel(job)

    async def Stats(
        self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillStats:
        backend = common_pb2.Backend(**self.engine.model.rt.fields())
        return prefill_pb2.PrefillStats(**self.engine.stats(), backend=backend)
