"""gRPC adapter for the expert pool: ExpertsRequest -> checked `Routed` -> batcher -> ExpertsReply."""

from __future__ import annotations

import grpc
import torch

from services.common.errors import InvalidArgument
from services.common.tensor_codec import DTYPES, tensor_from_proto, tensor_to_proto
from services.experts.batcher import Batcher
from services.experts.routed import ROW_DTYPES, PoolSpec, Routed, check
from services.pb.k2.v1 import common_pb2, experts_pb2, experts_pb2_grpc


class ExpertsServicer(experts_pb2_grpc.ExpertsServicer):
    def __init__(self, batcher: Batcher, spec: PoolSpec) -> None:
        self.batcher, self.spec = batcher, spec

    async def Compute(
        self, request: experts_pb2.ExpertsRequest, context: grpc.aio.ServicerContext
    ) -> experts_pb2.ExpertsReply:
        out = await self.batcher.compute(routed_from_proto(request, self.spec))
        return experts_pb2.ExpertsReply(out=tensor_to_proto(out))

    async def Stats(
        self, request: common_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> experts_pb2.ExpertsStats:
        b = self.batcher
        return experts_pb2.ExpertsStats(
            ranks=self.spec.ranks,
            experts_per_rank=self.spec.per_rank,
            calls=b.calls,
            rows=b.rows,
            rounds=b.rounds,
        )


def routed_from_proto(request: experts_pb2.ExpertsRequest, spec: PoolSpec) -> Routed:
    """Decode and check one request against the pool's config (InvalidArgument if it does not fit)."""
    dtype = DTYPES.get(request.hidden.dtype)
    if dtype not in ROW_DTYPES:
        raise InvalidArgument(
            f"hidden: dtype must be bfloat16 or float32, got {request.hidden.dtype!r}"
        )
    x = tensor_from_proto(
        request.hidden, dtype=dtype, shape=[None, spec.hidden_size], name="hidden"
    )
    rows, k = x.shape[0], spec.top_k
    ids = tensor_from_proto(
        request.expert_ids, dtype=torch.int32, shape=[rows, k], name="expert_ids"
    )
    weights = tensor_from_proto(
        request.weights, dtype=torch.float32, shape=[rows, k], name="weights"
    )
    return check(Routed(request.layer, x, ids.long(), weights), spec)
