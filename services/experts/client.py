"""Prefill and decode's side of the expert service: `RemoteExperts`, a `RoutedExperts` backend.

The model runs on one worker thread per process and calls each MoE layer's routed experts
synchronously, so the client is a synchronous gRPC stub on one channel shared by all layers of
the process (`ExpertsClient`). One call per MoE layer per model step carries the whole batch's
rows. Any failure raises (Unavailable when the pool is down or restarting, DeadlineExceeded past
the deadline): the engine then fails that step's requests cleanly. The reconnect backoff is capped
low so that calls succeed again soon after the pool has restarted.
"""

from __future__ import annotations

import grpc
import torch

from k2model.model import K2Model
from services.common.channel import open_sync_channel
from services.common.errors import DeadlineExceeded, Unavailable
from services.common.security import Security
from services.common.tensor_codec import tensor_from_proto, tensor_to_proto
from services.experts.routed import COLLECTIVE_TIMEOUT_S
from services.pb.k2.v1 import common_pb2, experts_pb2, experts_pb2_grpc

MiB = 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * MiB),
    ("grpc.max_receive_message_length", 64 * MiB),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


# A call's deadline is only a backstop: the pool itself fails a round whose peers do not answer
# within its collective timeout (UNAVAILABLE), so the caller hears the pool's own error first,
# and a round that waited behind others under load still has room.
CALL_TIMEOUT_S = 3 * COLLECTIVE_TIMEOUT_S


class ExpertsClient:
    """One synchronous channel to the expert pool (thread-safe), shared by every MoE layer."""

    def __init__(
        self, target: str, timeout_s: float = CALL_TIMEOUT_S, security: Security | None = None
    ) -> None:
        self.target, self.timeout_s = target, timeout_s
        self._channel = open_sync_channel(target, _CHANNEL_OPTIONS, security)
        self._metadata = security.call_metadata() if security else ()
        self._stub = experts_pb2_grpc.ExpertsStub(self._channel)

    def compute(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for rows x [T, D] of `layer`, [T, D] in x's dtype."""
        request = experts_pb2.ExpertsRequest(
            layer=layer,
            hidden=tensor_to_proto(x),
            expert_ids=tensor_to_proto(ids.to(torch.int32)),
            weights=tensor_to_proto(weights.float()),
        )
        try:
            reply = self._stub.Compute(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(layer, exc) from exc
        out = tensor_from_proto(reply.out, dtype=x.dtype, shape=list(x.shape), name="out")
        return out.to(x.device, copy=True)  # own the memory: the reply's bytes are read-only

    def stats(self) -> experts_pb2.ExpertsStats:
        request = common_pb2.StatsRequest()
        return self._stub.Stats(request, timeout=self.timeout_s, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()


def _error(layer: int, exc: grpc.RpcError) -> Exception:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"expert pool: layer {layer} timed out")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"expert pool unavailable (layer {layer})")
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return RuntimeError(f"expert pool refused layer {layer}: {code}: {details}")


class RemoteExperts:
    """The routed experts of one MoE layer, computed by the expert pool (a `RoutedExperts`)."""

    def __init__(self, client: ExpertsClient, layer: int) -> None:
        self.client, self.layer = client, layer

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.client.compute(self.layer, x, ids, weights)


def attach_remote_experts(
    model: K2Model, target: str, timeout_s: float = CALL_TIMEOUT_S, security: Security | None = None
) -> ExpertsClient:
    """Route every MoE layer of `model` to the pool at `target`; close the returned client
    when the process shuts down. (Load the model with routed_experts=False: it holds none.)"""
    client = ExpertsClient(target, timeout_s, security)
    for layer, moe in model.moe_layers().items():
        moe.remote = RemoteExperts(client, layer)
    return client
