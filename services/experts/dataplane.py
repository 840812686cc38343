"""One expert rank's data plane: callers send it the rows routed to its experts, straight (M2N).

A ZeroMQ ROUTER socket on a thread of the rank, bound on TCP. (A Unix socket was measured
slower than TCP loopback for rows of 32 tokens and more: bench/transport.py.) Each request is decoded and checked
(wire.py), computed on the rank's own expert slice and answered with its partial sums; a request
that does not fit is answered with an error frame and never computed. Requests are served in
arrival order; nothing here touches the job's collectives, so one caller's rows never wait for
another rank. bench/transport.py measured the transports this was chosen from.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass

import torch
import zmq

from services.experts import wire
from services.experts.shard import ExpertShard

log = logging.getLogger(__name__)

POLL_MS = 100  # how often the serving thread looks at its stop flag
# Largest frame a rank accepts: K2's widest step, 4,096 rows of 7,168 fp32 values, is 117 MiB.
MAX_FRAME_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Endpoint:
    """Where one rank's data plane listens."""

    rank: int
    tcp: str  # "tcp://host:port"


class DataPlane:
    def __init__(self, shard: ExpertShard, token: bytes, host: str):
        """host: the rank's deployment address (a name, e.g. a compose service, binds every
        interface and is advertised as given)."""
        self.shard, self.token = shard, token
        self.layers = frozenset(shard.experts)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a larger frame drops the peer
        port = self._sock.bind_to_random_port(f"tcp://{_bind_address(host)}")
        self.endpoint = Endpoint(shard.rank, f"tcp://{host}:{port}")
        self._stop = threading.Event()
        self.served = 0
        self._thread = threading.Thread(target=self._serve, name="experts-dataplane", daemon=True)

    def start(self) -> DataPlane:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(POLL_MS):
                continue
            who, *frames = self._sock.recv_multipart(copy=False)
            self._sock.send_multipart([who, *self.answer([f.buffer for f in frames])], copy=False)

    @torch.inference_mode()
    def answer(self, frames: list[wire.Frame]) -> list[wire.Frame]:
        step = 0
        try:
            step = wire.Header.decode(frames[0]).step if frames else 0
            request = wire.decode_request(
                frames,
                self.token,
                self.shard.spec.hidden_size,
                self.layers,
                self.shard.spec.per_rank,
            )
        except wire.WireError as exc:
            log.warning("expert data plane: refused a request: %s", exc)
            return wire.encode_error(step, str(exc))
        self.served += 1
        return wire.encode_reply(request.header, self.shard.partial(request))


def _bind_address(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    return host
