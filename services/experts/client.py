"""Prefill and decode's side of the expert service: `RemoteExperts`, a `RoutedExperts` backend.

The model runs on one worker thread per process and calls each MoE layer's routed experts
synchronously, so the client is a synchronous gRPC stub on one channel shared by all layers of
the process (`ExpertsClient`). Per MoE layer per model step, the whole batch's rows go either
straight to the ranks that hold their experts (`transport: dataplane`, the default: M2N over
ZeroMQ, through shared memory to ranks on this host, the shared expert computing meanwhile) or in one Compute call through rank 0 (`grpc`). Any failure raises (Unavailable when the pool is down or restarting, DeadlineExceeded past
the deadline): the engine then fails that step's requests cleanly. The reconnect backoff is capped
low so that calls succeed again soon after the pool has restarted.
"""

from __future__ import annotations

import threading

import grpc
import torch

from k2model.model import K2Model
from services.common.channel import open_sync_channel
from services.common.errors import DeadlineExceeded, Unavailable
from services.common.security import Security
from services.common.tensor_codec import tensor_from_proto, tensor_to_proto
from services.experts.dataplane import Endpoint
from services.experts.dataplane_client import DataPlaneClient, Pending
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
    """One synchronous channel to the expert pool (thread-safe), shared by every MoE layer;
    with the data plane, also one socket per rank (services/experts/dataplane_client.py),
    rebuilt from the pool's Endpoints after a failure."""

    def __init__(
        self,
        target: str,
        timeout_s: float = CALL_TIMEOUT_S,
        security: Security | None = None,
        transport: str = "dataplane",
        shared_memory: bool = True,
        busy_poll_s: float = 0.0,
    ) -> None:
        """shared_memory: reach ranks on this host through shared memory (the data plane).
        busy_poll_s: spin this long for a rank's reply before sleeping."""
        self.target, self.timeout_s, self.transport = target, timeout_s, transport
        self.shared_memory, self.busy_poll_s = shared_memory, busy_poll_s
        self._channel = open_sync_channel(target, _CHANNEL_OPTIONS, security)
        self._metadata = security.call_metadata() if security else ()
        self._stub = experts_pb2_grpc.ExpertsStub(self._channel)
        self._plane: DataPlaneClient | None = None
        self._plane_lock = threading.Lock()

    def submit(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> Pending:
        """Sends `layer`'s rows x [T, D] over the data plane; `.result()` is their weighted sum,
        [T, D] in x's dtype. The rows are out while the caller goes on."""
        return self._dataplane().submit(layer, x, ids, weights)

    def compute(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for rows x [T, D] of `layer`, [T, D] in x's dtype."""
        if self.transport == "grpc":
            return self._compute_grpc(layer, x, ids, weights)
        return self.submit(layer, x, ids, weights).result()

    def _dataplane(self) -> DataPlaneClient:
        with self._plane_lock:
            if self._plane is None or self._plane.closed:
                self._plane = self._connect()
            return self._plane

    def _connect(self) -> DataPlaneClient:
        try:
            reply = self._stub.Endpoints(
                experts_pb2.EndpointsRequest(), timeout=self.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _error("endpoints", exc) from exc
        endpoints = [Endpoint(e.rank, e.tcp) for e in reply.ranks]
        return DataPlaneClient(
            endpoints,
            reply.token,
            reply.experts_per_rank,
            reply.hidden_size,
            COLLECTIVE_TIMEOUT_S,
            self.shared_memory,
            self.busy_poll_s,
        )

    def _compute_grpc(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        request = experts_pb2.ExpertsRequest(
            layer=layer,
            hidden=tensor_to_proto(x),
            expert_ids=tensor_to_proto(ids.to(torch.int32)),
            weights=tensor_to_proto(weights.float()),
        )
        try:
            reply = self._stub.Compute(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(f"layer {layer}", exc) from exc
        out = tensor_from_proto(reply.out, dtype=x.dtype, shape=list(x.shape), name="out")
        return out.to(x.device, copy=True)  # own the memory: the reply's bytes are read-only

    def stats(self) -> experts_pb2.ExpertsStats:
        request = common_pb2.StatsRequest()
        return self._stub.Stats(request, timeout=self.timeout_s, metadata=self._metadata)

    def close(self) -> None:
        if self._plane is not None:
            self._plane.close()
        self._channel.close()


def _error(what: str, exc: grpc.RpcError) -> Exception:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"expert pool: {what} timed out")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"expert pool unavailable ({what})")
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return RuntimeError(f"expert pool refused {what}: {code}: {details}")


class RemoteExperts:
    """The routed experts of one MoE layer, computed by the expert pool (a `RoutedExperts`)."""

    def __init__(self, client: ExpertsClient, layer: int) -> None:
        self.client, self.layer = client, layer

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.client.compute(self.layer, x, ids, weights)


class SubmittedRemoteExperts(RemoteExperts):
    """Over the data plane: the rows can be sent before they are collected (the shared expert
    and the other micro-batch run meanwhile: k2model.moe.SubmitsExperts)."""

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Pending:
        return self.client.submit(self.layer, x, ids, weights)


def attach_remote_experts(
    model: K2Model,
    target: str,
    timeout_s: float = CALL_TIMEOUT_S,
    security: Security | None = None,
    transport: str = "dataplane",
    busy_poll_s: float = 0.0,
) -> ExpertsClient:
    """Route every MoE layer of `model` to the pool at `target` over `transport` (a deployment's
    expert_transport); close the returned client when the process shuts down. (Load the model
    with routed_experts=False: it holds none.)"""
    shared = transport != "dataplane-tcp"
    transport = "grpc" if transport == "grpc" else "dataplane"
    client = ExpertsClient(target, timeout_s, security, transport, shared, busy_poll_s)
    remote = SubmittedRemoteExperts if transport == "dataplane" else RemoteExperts
    for layer, moe in model.moe_layers().items():
        moe.remote = remote(client, layer)
    return client
