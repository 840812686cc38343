"""The caller's side of the expert data plane: each MoE layer's rows go straight to the ranks that
hold their experts (M2N), and their partial sums come back and are added.

`submit` splits a layer's assignments by owning rank, sends each rank only its rows (one
ZeroMQ DEALER socket per rank, over TCP) and returns at once, so the caller computes its shared expert while the rows are out;
`Pending.result` collects the replies. Waits are bounded: a rank that disconnects or refuses the
connection fails the step at once, one that does not answer fails it after `timeout_s` (Unavailable either way, and the
client is then closed: the caller asks the control plane for fresh endpoints, since a restarted
pool has new ones). Replies are matched to their step by its number: several steps may be in flight (one per
micro-batch), and a reply to an abandoned step is dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch
import zmq

from services.common.errors import InvalidArgument, Unavailable
from services.experts import wire
from services.experts.dataplane import Endpoint

POLL_MS = 50


class DataPlaneClient:
    """Several steps may be in flight (micro-batches); one thread at a time submits or collects.
    close() on failure and build a new one."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        token: bytes,
        per_rank: int,
        hidden: int,
        timeout_s: float,
    ) -> None:
        self.token, self.per_rank, self.hidden, self.timeout_s = token, per_rank, hidden, timeout_s
        self._ctx = zmq.Context()
        self._socks: list[zmq.Socket] = []
        self._monitors: list[zmq.Socket] = []
        for ep in endpoints:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # a connection that drops, or one refused (a stale endpoint of a dead rank)
            lost = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
            self._monitors.append(sock.get_monitor_socket(lost))
            sock.connect(ep.tcp)
            self._socks.append(sock)
        self._lock = threading.Lock()
        self._step = 0
        # step -> rank -> partial sums that arrived while another step was being collected
        self._early: dict[int, dict[int, torch.Tensor]] = {}
        self.closed = False

    def submit(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> Pending:
        """Sends layer's rows to their ranks and returns; `Pending.result` collects them."""
        with self._lock:
            if self.closed:
                raise Unavailable("expert data plane: closed after a failure")
            self._step += 1
            owner = torch.div(ids, self.per_rank, rounding_mode="floor")
            sent = []
            try:
                for rank in owner.unique().tolist():
                    t, j = (owner == rank).nonzero(as_tuple=True)
                    rows = t.unique()  # sorted
                    local = ids[t, j] - rank * self.per_rank
                    pairs = torch.stack((torch.searchsorted(rows, t), local), 1)
                    frames = wire.encode_request(
                        layer, self._step, self.token, x[rows], pairs, weights[t, j]
                    )
                    self._socks[rank].send_multipart(frames, copy=False)
                    sent.append((rank, rows))
            except BaseException:
                self.close()
                raise
            self._early[self._step] = {}
            return Pending(self, self._step, sent, x)

    def _collect(self, pending: Pending) -> torch.Tensor:
        with self._lock:
            try:
                return self._wait(pending)
            except BaseException:
                self.close()
                raise
            finally:
                self._early.pop(pending.step, None)

    def _wait(self, pending: Pending) -> torch.Tensor:
        x = pending.x
        out = torch.zeros(x.shape, dtype=x.dtype)
        waiting = dict(pending.sent)
        for rank, partial in self._early.get(pending.step, {}).items():
            out.index_add_(0, waiting.pop(rank), partial)
        poller = zmq.Poller()
        for rank in waiting:
            poller.register(self._socks[rank], zmq.POLLIN)
            poller.register(self._monitors[rank], zmq.POLLIN)
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"expert data plane: ranks {sorted(waiting)} did not answer")
            events = dict(poller.poll(min(POLL_MS, 1000 * left)))
            for rank in list(waiting):
                if self._monitors[rank] in events:
                    raise Unavailable(f"expert data plane: rank {rank} is unreachable")
                while rank in waiting and self._socks[rank].poll(0):
                    step, result = self._receive(rank, x.dtype)
                    if step == pending.step:
                        rows = waiting.pop(rank)
                        if result.shape[0] != rows.numel():
                            raise Unavailable(f"expert rank {rank} answered {result.shape[0]} rows")
                        out.index_add_(0, rows, result)
                    elif step in self._early:  # another micro-batch's, still in flight
                        self._early[step][rank] = result
                    # else: the answer to an abandoned step
        return out.to(x.device)

    def _receive(self, rank: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        frames = [f.buffer for f in self._socks[rank].recv_multipart(copy=False)]
        header = wire.Header.decode(frames[0])
        step, result = wire.decode_reply(frames, header.rows, self.hidden, dtype)
        if isinstance(result, str):
            raise InvalidArgument(f"expert rank {rank} refused the rows: {result}")
        return step, result

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (*self._socks, *self._monitors):
            sock.close(linger=0)
        self._ctx.term()


class Pending:
    """One layer's rows in flight; `result()` once (the partial sums added, [T, D] in x's dtype)."""

    def __init__(
        self,
        client: DataPlaneClient,
        step: int,
        sent: list[tuple[int, torch.Tensor]],
        x: torch.Tensor,
    ) -> None:
        self.client, self.step, self.sent, self.x = client, step, sent, x

    def result(self) -> torch.Tensor:
        return self.client._collect(self)
