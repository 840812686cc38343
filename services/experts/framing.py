"""Frame sets over a non-blocking stream socket, for the expert data plane.

    u32 count | count x u64 length | the frames' bytes, back to back   (little-endian)

The socket is read and written by the thread that waits on it, with poll(2) between: a small
frame set's round trip costs 20-50 us on loopback here, against ~200 us through ZeroMQ, whose I/O
threads add a hand-off at each end (bench/transport.py). Frames are sent with scatter-gather
`sendmsg` straight from the tensors' memory. Every wait has a deadline. A receiver names its
limit: a frame set over it, or one that announces more than MAX_FRAMES frames, is a FramingError
before a byte of it is allocated.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Sequence

MAX_FRAMES = 8
_COUNT = struct.Struct("<I")
Frame = bytes | bytearray | memoryview


class FramingError(ValueError):
    """The peer sent something that is not a frame set within our limits."""


class Closed(ConnectionError):
    """The peer closed the connection (at a frame-set boundary or inside one)."""


def wait(sock: socket.socket, events: int, deadline: float) -> int:
    """poll(2) on one socket until one of `events` (or an error) or TimeoutError at `deadline`
    (time.monotonic)."""
    poller = select.poll()
    poller.register(sock, events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the peer did not keep up")
        ready = poller.poll(1000 * left)
        if ready:
            return ready[0][1]


def poll_spinning(poller: select.poll, timeout_s: float, spin_s: float) -> list[tuple[int, int]]:
    """poller.poll(timeout), first spinning up to `spin_s` without sleeping: a sleeping
    process's wake-up costs more than a short round trip on a virtual machine, so where the
    process has a core of its own, spinning for the next frame set saves it (0: never spin)."""
    if spin_s > 0:
        until = time.monotonic() + min(spin_s, timeout_s)
        while time.monotonic() < until:
            ready = poller.poll(0)
            if ready:
                return ready
        timeout_s -= spin_s
    return poller.poll(1000 * max(timeout_s, 0.0))


def send_frames(
    sock: socket.socket,
    frames: Sequence[Frame],
    timeout_s: float,
    on_readable: Callable[[], None] | None = None,
) -> None:
    """All of the frame set within `timeout_s`, or OSError (TimeoutError included). While the
    peer is not reading, `on_readable` (if given) is called whenever there is something to read:
    a peer that is itself blocked sending to us then goes on, so neither waits for the other."""
    views = [memoryview(f).cast("B") for f in frames]
    prefix = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    pending = [memoryview(prefix), *(v for v in views if v.nbytes)]
    deadline = time.monotonic() + timeout_s
    events = select.POLLOUT | (select.POLLIN if on_readable else 0)
    while pending:
        try:
            sent = sock.sendmsg(pending)
        except BlockingIOError:
            sent = 0
        while sent:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.pop(0)
            else:
                pending[0], sent = head[sent:], 0
        if pending and wait(sock, events, deadline) & select.POLLIN and on_readable:
            on_readable()


def recv_frames(sock: socket.socket, max_bytes: int, timeout_s: float) -> list[memoryview]:
    """The next frame set (views of one fresh buffer), all of it within `timeout_s`. Closed when
    the peer has gone."""
    deadline = time.monotonic() + timeout_s
    head = memoryview(bytearray(_COUNT.size))
    _recv_into(sock, head, deadline)
    (count,) = _COUNT.unpack(head)
    if not 0 < count <= MAX_FRAMES:
        raise FramingError(f"a set of {count} frames (1 to {MAX_FRAMES})")
    sizes = memoryview(bytearray(8 * count))
    _recv_into(sock, sizes, deadline)
    lengths = struct.unpack(f"<{count}Q", sizes)
    total = sum(lengths)
    if total > max_bytes:
        raise FramingError(f"a frame set of {total} bytes (at most {max_bytes})")
    data = memoryview(bytearray(total))
    _recv_into(sock, data, deadline)
    frames, at = [], 0
    for n in lengths:
        frames.append(data[at : at + n])
        at += n
    return frames


def _recv_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    while view.nbytes:
        try:
            got = sock.recv_into(view)
        except BlockingIOError:
            wait(sock, select.POLLIN, deadline)
            continue
        if not got:
            raise Closed("the peer closed the connection")
        view = view[got:]
