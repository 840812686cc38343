"""Decode's side of the KV handoff: pick a prefill instance by load, receive and check its stream.

Prefill addresses come from the deployment configuration only. A handoff is complete only when
every layer holds every prompt token and the first token has arrived; anything short of that is a
failure, and the request is retried on another instance (its blocks are rewritten from scratch)
or failed with UNAVAILABLE - never decoded from a partial cache. What a prefill sends is checked
as untrusted input: KV must be finite, and the first token (and its top logprob ids) inside the
vocabulary with a logprob that is a number. A bad handoff fails that request alone; the decode
batch it would have joined never sees it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import grpc
import torch

from k2model.config import K2Config
from k2model.sampled import Sampled
from services.common.channel import wait_ready
from services.common.constraint_codec import constraint_to_proto
from services.common.errors import InvalidArgument, OutOfRange, ServiceError, Unavailable
from services.common.placement import Peer, Placement
from services.common.sampling_codec import sampled_token_from_proto, sampling_to_proto
from services.common.security import Security
from services.common.tensor_codec import tensor_from_proto
from services.decode.scheduler import Seq
from services.pb.k2.v1 import prefill_pb2, prefill_pb2_grpc

log = logging.getLogger(__name__)

_NOT_RETRIED = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
}


PrefillPeer = Peer[prefill_pb2_grpc.PrefillStub]


class PrefillPool:
    """Prefill instances from configuration, tried best-ranked first by the one placement policy
    (services/common/placement.py: polled Stats plus the handoffs in flight from here)."""

    def __init__(
        self,
        addresses: list[str],
        cfg: K2Config,
        kv_dtype: torch.dtype,
        poll_interval_s: float = 0.25,
        transfer_timeout_s: float = 120.0,
        connect_timeout_s: float = 2.0,
        security: Security | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("decode needs at least one prefill address")
        self.cfg, self.kv_dtype = cfg, kv_dtype
        self.transfer_timeout_s, self.connect_timeout_s = transfer_timeout_s, connect_timeout_s
        self.placement = Placement(
            [(a, a) for a in addresses],
            prefill_pb2_grpc.PrefillStub,
            security=security,
            poll_interval_s=poll_interval_s,
            stats_timeout_s=1.0,
        )

    def start(self) -> None:
        self.placement.start()

    async def close(self) -> None:
        await self.placement.close()

    async def prefill(self, seq: Seq, write: Callable[[int, int, torch.Tensor], None]) -> Sampled:
        """Fill seq's blocks through `write(layer, token_start, latent)`; return the first token."""
        errors = []
        peers = self.placement.ranked()
        for peer in peers:
            try:
                with peer.busy():
                    return await self._receive(peer, seq, write)
            except grpc.aio.AioRpcError as e:
                if e.code() in _NOT_RETRIED:
                    raise _NOT_RETRIED[e.code()](e.details() or "prefill refused the prompt") from e
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    peer.healthy = False
                errors.append(f"{peer.target}: {e.code().name}")
            except ServiceError as e:
                errors.append(f"{peer.target}: {e}")
            log.warning(
                "prefill of %s failed on %s; %d peers left",
                seq.request_id,
                peer.target,
                len(peers) - len(errors),
            )
        log.error("prefill of %s failed everywhere: %s", seq.request_id, "; ".join(errors))
        raise Unavailable(f"prefill failed on all {len(errors)} instance(s); try again")

    async def _receive(
        self, peer: PrefillPeer, seq: Seq, write: Callable[[int, int, torch.Tensor], None]
    ) -> Sampled:
        n_layers, n_tokens = self.cfg.num_hidden_layers, len(seq.prompt)
        request = prefill_pb2.PrefillRequest(
            request_id=seq.request_id,
            prompt_ids=seq.prompt,
            sampling=sampling_to_proto(seq.params),
            constraint=constraint_to_proto(seq.constraint),
        )
        covered = [0] * n_layers
        # A channel whose last dial failed fails calls at once until its reconnect backoff ends,
        # even when the peer is back (a restart, or decode starting first): wait that out.
        await wait_ready(peer.channel, self.connect_timeout_s)
        call = peer.stub.Prefill(request, timeout=self.transfer_timeout_s)
        try:
            async for chunk in call:
                if chunk.HasField("first_token"):
                    if any(c != n_tokens for c in covered):
                        raise Unavailable("prefill sent the first token before the whole KV")
                    return _checked(sampled_token_from_proto(chunk.first_token), self.cfg)
                kv = chunk.kv
                if not 0 <= kv.layer < n_layers or kv.token_start != covered[kv.layer]:
                    raise Unavailable(
                        f"prefill sent KV out of order (layer {kv.layer}, start {kv.token_start})"
                    )
                latent = tensor_from_proto(
                    kv.latent, dtype=self.kv_dtype, shape=(None, self.cfg.kv_cache_dim)
                )
                if kv.token_start + latent.shape[0] > n_tokens:
                    raise Unavailable("prefill sent KV past the end of the prompt")
                if not bool(torch.isfinite(latent).all()):
                    raise Unavailable(f"prefill sent non-finite KV (layer {kv.layer})")
                write(kv.layer, kv.token_start, latent)
                covered[kv.layer] += latent.shape[0]
        finally:
            call.cancel()
        raise Unavailable("prefill stream ended before the KV was complete")


def _checked(first: Sampled, cfg: K2Config) -> Sampled:
    """The first token, if it is one this model can have sampled."""
    ids = [first.token_id, *(t for t, _ in first.top)]
    if not all(0 <= t < cfg.vocab_size for t in ids):
        raise Unavailable(f"prefill sent a token id outside the vocabulary: {ids[:4]}")
    logprobs = [lp for _, lp in first.top] + ([] if first.logprob is None else [first.logprob])
    if any(math.isnan(lp) for lp in logprobs):
        raise Unavailable("prefill sent a NaN logprob")
    return first
