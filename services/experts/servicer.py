"""gRPC adapter for the expert pool: ExpertsRequest -> checked `Routed` -> batcher -> ExpertsReply."""

from __future__ import annotations

from dataclasses import asdict

import grpc
import torch

from services.common.errors import InvalidArgument, Unavailable
from services.common.tensor_codec import DTYPES, tensor_from_proto, tensor_to_proto
from services.experts.batcher import Batcher
from services.experts.dataplane import DataPlane, Endpoint
from services.experts.routed import ROW_DTYPES, PoolSpec, Routed, check
from services.pb.k2.v1 import common_pb2, experts_pb2, experts_pb2_grpc


class ExpertsServicer(experts_pb2_grpc.ExpertsServicer):
    def __init__(self, batcher: Batcher, spec: PoolSpec) -> None:
        self.batcher, self.spec = batcher, spec
        self.endpoints: list[Endpoint] = []  # every rank's data plane, once the job is up
        self.token = b""
        self.dataplane: DataPlane | None = None  # rank 0's own

    async def Endpoints(
        self, request: experts_pb2.EndpointsRequest, context: grpc.aio.ServicerContext
    ) -> experts_pb2.ExpertsEndpoints:
        if not self.endpoints or self.batcher.broken is not None:
            raise Unavailable("the expert pool is starting or restarting")
        return experts_pb2.ExpertsEndpoints(
            ranks=[experts_pb2.ExpertEndpoint(**asdict(e)) for e in self.endpoints],
            token=self.token,
            experts_per_rank=self.spec.per_rank,
            hidden_size=self.spec.hidden_size,
        )

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
            dataplane_requests=self.dataplane.served if self.dataplane else 0,
            dataplane_shared_requests=self.dataplane.served_shared if self.dataplane else 0,
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
