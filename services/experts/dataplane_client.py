"""The caller's side of the expert data plane: each MoE layer's rows go straight to the ranks that
hold their experts (M2N), and their partial sums come back and are added.

`submit` splits a layer's assignments by owning rank, sends each rank only its rows (one
TCP connection per rank, framing.py) and returns at once, so the caller computes its shared
expert while the rows are out; `Pending.result` collects the replies. A rank on this host gets
its rows through a shared-memory segment instead (segment.py; the socket then carries only the
header): whether it can is asked once, with an empty request, before its first rows, and a rank
that cannot open the segment (another host) is sent bytes from then on. Waits are bounded: a rank
that disconnects or refuses the connection fails the step at once, one that does not answer
fails it after `timeout_s` (Unavailable either way, and the client is then closed: the caller
asks the control plane for fresh endpoints, since a restarted pool has new ones). Replies are
matched to their step by its number: several steps may be in flight (one per micro-batch), and a
reply to an abandoned step is dropped.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from services.common.errors import InvalidArgument, Unavailable
from services.experts import framing, segment, wire
from services.experts.dataplane import Endpoint

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 512 * 2**20  # a rank's reply is the rows it was sent: as large as a request
SEGMENTS_PER_RANK = 4  # steps in flight to one rank through shared memory; more go as bytes


@dataclass
class _Lane:
    """One rank: its connection (made on first use), its segments."""

    rank: int
    address: tuple[str, int]
    shared: bool  # still worth trying shared memory
    sock: socket.socket | None = None
    segments: list[segment.Segment] = field(default_factory=list)  # made for this rank
    free: list[segment.Segment] = field(default_factory=list)  # of those, not in flight

    def drop(self, seg: segment.Segment) -> None:
        self.segments.remove(seg)
        seg.close()

    def drop_all(self) -> None:
        for seg in self.segments:
            seg.close()
        self.segments.clear()
        self.free.clear()

    def close(self) -> None:
        self.drop_all()
        if self.sock is not None:
            self.sock.close()


@dataclass
class _Sent:
    rank: int
    rows: torch.Tensor  # the caller's row of each row sent, sorted
    seg: segment.Segment | None  # where the reply's partial sums lie, or None: in the reply
    out: int = 0  # their offset in seg


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
        shared_memory: bool = True,
        busy_poll_s: float = 0.0,
    ) -> None:
        """busy_poll_s: spin this long for replies before sleeping (expert_busy_poll_us)."""
        self.token, self.per_rank, self.hidden, self.timeout_s = token, per_rank, hidden, timeout_s
        self.busy_poll_s = busy_poll_s
        shared = shared_memory and segment.available()
        if shared:
            segment.sweep()
        self._lanes = [_Lane(ep.rank, ep.address(), shared) for ep in endpoints]
        self._lock = threading.Lock()
        self._step = 0
        # step -> rank -> (rows answered, partial sums or None: in the segment) that arrived
        # while another step was being collected
        self._early: dict[int, dict[int, tuple[int, torch.Tensor | None]]] = {}
        self.closed = False

    @property
    def shared_ranks(self) -> list[int]:
        """The ranks this client reaches through shared memory (asked on first use)."""
        return [lane.rank for lane in self._lanes if lane.shared]

    def submit(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> Pending:
        """Sends layer's rows to their ranks and returns; `Pending.result` collects them."""
        with self._lock:
            if self.closed:
                raise Unavailable("expert data plane: closed after a failure")
            step, sent = self._next_step(), []
            self._early[step] = {}  # before the first send: a reply may come while we send
            try:
                for rank, rows, row_of_pair, local, w in self._split(ids, weights):
                    sent.append(self._send(layer, step, rank, x, rows, row_of_pair, local, w))
            except BaseException:
                self.close()
                raise
            return Pending(self, step, sent, x)

    def _split(self, ids: torch.Tensor, weights: torch.Tensor) -> Iterator[tuple]:
        """Per owning rank: (rank, the rows it needs (sorted), each pair's index into them, each
        pair's expert local to the rank, each pair's weight)."""
        owner = torch.div(ids, self.per_rank, rounding_mode="floor")
        ranks = owner.unique().tolist()
        if len(ranks) == 1:  # every row's experts on one rank: all rows, pairs in order
            rank, (n, k) = ranks[0], ids.shape
            rows = torch.arange(n)
            local = (ids - rank * self.per_rank).flatten()
            yield rank, rows, rows.repeat_interleave(k), local, weights.flatten()
            return
        for rank in ranks:
            t, j = (owner == rank).nonzero(as_tuple=True)
            rows = t.unique()  # sorted
            local = ids[t, j] - rank * self.per_rank
            yield rank, rows, torch.searchsorted(rows, t), local, weights[t, j]

    def _next_step(self) -> int:
        self._step += 1
        return self._step

    def _send(
        self,
        layer: int,
        step: int,
        rank: int,
        x: torch.Tensor,
        rows: torch.Tensor,
        row_of_pair: torch.Tensor,
        local: torch.Tensor,
        weights: torch.Tensor,
    ) -> _Sent:
        lane = self._lanes[rank]
        n, p = rows.numel(), local.numel()
        layout = segment.Layout.of(n, p, self.hidden, x.element_size())
        seg = self._segment(lane, layout.end, x.dtype) if lane.shared else None
        if seg is None:
            pairs = torch.stack((row_of_pair, local), 1)
            frames = wire.encode_request(layer, step, self.token, x[rows], pairs, weights)
        else:
            segment.view(seg.buf, layout.x, x.dtype, (n, self.hidden)).copy_(x[rows])
            pairs = segment.view(seg.buf, layout.pairs, torch.int32, (p, 2))
            pairs[:, 0], pairs[:, 1] = row_of_pair, local
            segment.view(seg.buf, layout.weights, torch.float32, (p,)).copy_(weights)
            frames = wire.encode_shm_request(
                layer, step, self.token, x.dtype, n, p, seg.name, seg.nonce
            )
        self._push(lane, frames)
        return _Sent(rank, rows, seg, layout.out)

    def _connected(self, lane: _Lane) -> socket.socket:
        if lane.sock is None:
            try:
                sock = socket.create_connection(lane.address, timeout=self.timeout_s)
            except OSError as exc:  # refused (a stale endpoint of a dead rank), or no route
                raise Unavailable(
                    f"expert data plane: rank {lane.rank} is unreachable: {exc}"
                ) from exc
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            lane.sock = sock
        return lane.sock

    def _push(self, lane: _Lane, frames: list[wire.Frame]) -> None:
        """Sends a frame set; replies that arrive meanwhile are kept for their steps (a rank
        blocked sending one to us would otherwise never read the rest of ours)."""
        try:
            framing.send_frames(
                self._connected(lane), frames, self.timeout_s, lambda: self._keep(lane)
            )
        except (framing.Closed, ConnectionError) as exc:
            raise Unavailable(f"expert data plane: rank {lane.rank} is unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise Unavailable(f"expert data plane: rank {lane.rank} did not take the rows") from exc

    def _keep(self, lane: _Lane) -> None:
        step, rows, result = self._receive(lane)
        if step in self._early:
            self._early[step][lane.rank] = (rows, result)

    def _segment(self, lane: _Lane, need: int, dtype: torch.dtype) -> segment.Segment | None:
        """A free segment of at least `need` bytes for one step to `lane`'s rank, made (and
        offered to the rank) if none is; None: send bytes."""
        fits = [s for s in lane.free if s.size >= need]
        if fits:
            lane.free.remove(fits[0])
            return fits[0]
        if len(lane.segments) >= SEGMENTS_PER_RANK:
            if not lane.free:
                return None
            lane.drop(lane.free.pop(0))  # too small: make room for a bigger one
        try:
            seg = segment.Segment(max(segment.SMALLEST, 1 << (need - 1).bit_length()))
        except OSError as exc:  # /dev/shm is full: this step's rows go as bytes
            log.warning("expert rank %d: no shared memory for %d bytes (%s)", lane.rank, need, exc)
            return None
        lane.segments.append(seg)
        refusal = self._offer(lane, seg, dtype)
        if refusal is not None:
            lane.shared = False
            lane.drop_all()
            log.info("expert rank %d: rows go as bytes (%s)", lane.rank, refusal)
            return None
        return seg

    def _offer(self, lane: _Lane, seg: segment.Segment, dtype: torch.dtype) -> str | None:
        """An empty request through `seg`: None once the rank has mapped it, else its refusal."""
        step = self._next_step()
        self._early[step] = {}
        self._push(
            lane, wire.encode_shm_request(0, step, self.token, dtype, 0, 0, seg.name, seg.nonce)
        )
        try:
            self._wait(step, [_Sent(lane.rank, torch.empty(0, dtype=torch.long), seg)], dtype)
        except InvalidArgument as exc:
            if segment.REFUSAL not in str(exc):
                raise  # not about the segment (a stale token, say): the step fails
            return str(exc)
        finally:
            self._early.pop(step, None)
        return None

    def _release(self, sent: list[_Sent]) -> None:
        for s in sent:
            if s.seg is not None and s.seg in self._lanes[s.rank].segments:
                self._lanes[s.rank].free.append(s.seg)

    def _collect(self, pending: Pending) -> torch.Tensor:
        with self._lock:
            try:
                return self._sum(pending)
            except BaseException:
                self.close()
                raise
            finally:
                self._early.pop(pending.step, None)

    def _sum(self, pending: Pending) -> torch.Tensor:
        x = pending.x
        out = torch.zeros(x.shape, dtype=x.dtype)
        try:
            for sent, partial in self._wait(pending.step, pending.sent, x.dtype):
                out.index_add_(0, sent.rows, partial)
        finally:
            self._release(pending.sent)
        return out.to(x.device)

    def _wait(
        self, step: int, sent: list[_Sent], dtype: torch.dtype
    ) -> list[tuple[_Sent, torch.Tensor]]:
        """Each rank's partial sums for `step` (views of its segment where it has one), once all
        have answered; replies to other steps in flight are kept for them."""
        waiting = {s.rank: s for s in sent}
        done = []
        for rank, answer in self._early.get(step, {}).items():
            done.append(self._partial(waiting.pop(rank), *answer, dtype))
        poller, lanes = select.poll(), {}
        for rank in waiting:
            sock = self._connected(self._lanes[rank])
            poller.register(sock, select.POLLIN)
            lanes[sock.fileno()] = self._lanes[rank]
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"expert data plane: ranks {sorted(waiting)} did not answer")
            for fd, _ in framing.poll_spinning(poller, left, self.busy_poll_s):
                lane = lanes[fd]
                got, rows, result = self._receive(lane)
                if got == step and lane.rank in waiting:
                    done.append(self._partial(waiting.pop(lane.rank), rows, result, dtype))
                    poller.unregister(fd)
                elif got in self._early:  # another micro-batch's, still in flight
                    self._early[got][lane.rank] = (rows, result)
                # else: the answer to an abandoned step
        return done

    def _partial(
        self, sent: _Sent, rows: int, result: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[_Sent, torch.Tensor]:
        if rows != sent.rows.numel():
            raise Unavailable(f"expert rank {sent.rank} answered {rows} rows")
        if result is None:
            if sent.seg is None:
                raise Unavailable(f"expert rank {sent.rank} answered in a segment it was not sent")
            result = segment.view(sent.seg.buf, sent.out, dtype, (rows, self.hidden))
        elif result.dtype != dtype:
            raise Unavailable(f"expert rank {sent.rank} answered in {result.dtype}, not {dtype}")
        return sent, result

    def _receive(self, lane: _Lane) -> tuple[int, int, torch.Tensor | None]:
        """One reply: (step, rows, partial sums or None: in the step's segment)."""
        assert lane.sock is not None
        try:
            frames = framing.recv_frames(lane.sock, MAX_REPLY_BYTES, self.timeout_s)
            header = wire.Header.decode(frames[0])
            step, result = wire.decode_reply(frames, header.rows, self.hidden, header.dtype)
        except (framing.Closed, ConnectionError) as exc:
            raise Unavailable(f"expert data plane: rank {lane.rank} is unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise Unavailable(f"expert data plane: rank {lane.rank} stalled in a reply") from exc
        except (framing.FramingError, wire.WireError) as exc:
            raise Unavailable(f"expert data plane: rank {lane.rank} sent {exc}") from exc
        if isinstance(result, str):
            raise InvalidArgument(f"expert rank {lane.rank} refused the rows: {result}")
        return step, header.rows, result

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for lane in self._lanes:
            lane.close()


class Pending:
    """One layer's rows in flight; `result()` once (the partial sums added, [T, D] in x's dtype)."""

    def __init__(
        self, client: DataPlaneClient, step: int, sent: list[_Sent], x: torch.Tensor
    ) -> None:
        self.client, self.step, self.sent, self.x = client, step, sent, x

    def result(self) -> torch.Tensor:
        return self.client._collect(self)
