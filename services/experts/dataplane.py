"""One expert rank's data plane: callers send it the rows routed to its experts, straight (M2N).

A TCP listener on the rank (an ephemeral port), one thread per caller's connection, frame sets
as framing.py lays them out (chosen by measurement: bench/transport.py). Each request is decoded
and checked (wire.py), computed on the rank's own expert slice and answered with its partial
sums; a request that does not fit is answered with an error frame and never computed, and a
connection that breaks the framing is dropped. One request computes at a time, in the order the
connections' threads take the lock; nothing here touches the job's collectives, so one caller's
rows never wait for another rank. A caller on the rank's host sends only a header naming its
shared-memory segment (segment.py), and the partial sums are written back into it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import threading
from dataclasses import dataclass

import torch

from services.experts import framing, segment, wire
from services.experts.shard import ExpertShard

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often an idle thread looks at the stop flag
FRAME_TIMEOUT_S = 30.0  # a caller that stops sending inside a frame set is dropped after this
# Largest frame set a rank accepts: K2's widest step, 4,096 rows of 7,168 fp32 values, is 117 MiB.
MAX_FRAME_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Endpoint:
    """Where one rank's data plane listens."""

    rank: int
    tcp: str  # "tcp://host:port"

    def address(self) -> tuple[str, int]:
        host, _, port = self.tcp.removeprefix("tcp://").rpartition(":")
        return host.strip("[]"), int(port)


class DataPlane:
    def __init__(self, shard: ExpertShard, token: bytes, host: str, busy_poll_s: float = 0.0):
        """host: the rank's deployment address (a name, e.g. a compose service, binds every
        interface and is advertised as given). busy_poll_s: after each answer, spin this long
        for the caller's next request before sleeping (the deployment's expert_busy_poll_us)."""
        self.shard, self.token, self.busy_poll_s = shard, token, busy_poll_s
        self.layers = frozenset(shard.experts)
        bind = _bind_address(host)
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((bind, 0))
        self._listener.listen(64)
        self._listener.settimeout(POLL_S)
        port = self._listener.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.endpoint = Endpoint(shard.rank, f"tcp://{shown}:{port}")
        self._maps = segment.Mappings()  # callers' shared-memory segments (one host)
        if segment.available():
            segment.sweep()
        self._stop = threading.Event()
        self._compute = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.served = 0
        self.served_shared = 0  # of those, through a caller's segment
        self._thread = threading.Thread(target=self._accept, name="experts-dataplane", daemon=True)

    def start(self) -> DataPlane:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops listening and drops every connection: their callers fail at once."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        with self._conns_lock:
            for conn in self._conns:
                _drop(conn)
        with self._compute:
            self._maps.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conns_lock:
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name="experts-dataplane-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        idle = select.poll()
        idle.register(conn, select.POLLIN)
        try:
            while not self._stop.is_set():
                if not framing.poll_spinning(idle, POLL_S, self.busy_poll_s):
                    continue
                frames = framing.recv_frames(conn, MAX_FRAME_BYTES, FRAME_TIMEOUT_S)
                with self._compute:
                    if self._stop.is_set():
                        return
                    reply = self.answer(frames)
                framing.send_frames(conn, reply, FRAME_TIMEOUT_S)
        except framing.FramingError as exc:
            log.warning("expert data plane: dropped a caller: %s", exc)
        except OSError:
            pass  # the caller went away, or stalled inside a frame set
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            _drop(conn)

    @torch.inference_mode()
    def answer(self, frames: list[wire.Frame]) -> list[wire.Frame]:
        step = 0
        try:
            step = wire.Header.decode(frames[0]).step  # to answer even a refusal in kind
            header = wire.decode_header(frames, self.token, self.layers)
            if header.kind == wire.SHM_REQUEST:
                return self._answer_shared(header, frames[1])
            spec = self.shard.spec
            request = wire.decode_request(header, frames, spec.hidden_size, spec.per_rank)
        except wire.WireError as exc:
            log.warning("expert data plane: refused a request: %s", exc)
            return wire.encode_error(step, str(exc))
        self.served += 1
        return wire.encode_reply(request.header, self.shard.partial(request))

    def _answer_shared(self, header: wire.Header, descriptor: wire.Frame) -> list[wire.Frame]:
        """Rows in the caller's segment, partial sums written back into it. An empty request
        is the caller's offer of a new segment: answered once it is mapped."""
        name, nonce = wire.decode_segment(descriptor, segment.NONCE_BYTES)
        hidden, item = self.shard.spec.hidden_size, header.dtype.itemsize
        layout = segment.Layout.of(header.rows, header.pairs, hidden, item)
        try:
            buf = self._maps.get(name, nonce, layout.end)
        except ValueError as exc:
            raise wire.WireError(str(exc)) from exc
        if header.rows == header.pairs == 0:
            return wire.encode_shm_reply(header)
        request = wire.Request(
            header,
            segment.view(buf, layout.x, header.dtype, (header.rows, hidden)),
            segment.view(buf, layout.pairs, torch.int32, (header.pairs, 2)),
            segment.view(buf, layout.weights, torch.float32, (header.pairs,)),
        )
        wire.checked(request, self.shard.spec.per_rank)
        out = segment.view(buf, layout.out, header.dtype, (header.rows, hidden))
        self.shard.partial(request, out=out)
        self.served += 1
        self.served_shared += 1
        return wire.encode_shm_reply(header)


def _drop(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already reset by the peer
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()


def _bind_address(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "0.0.0.0"
    return host
