"""A hand-driven peer of the expert data plane for tests: one request sent and its answer read
over a real connection, and a rank that reads requests and answers only when told."""

from __future__ import annotations

import select
import socket
import time

from services.experts import framing, wire
from services.experts.dataplane import Endpoint

TIMEOUT_S = 10.0


def connect(endpoint: Endpoint) -> socket.socket:
    sock = socket.create_connection(endpoint.address(), timeout=TIMEOUT_S)
    sock.setblocking(False)
    return sock


def ask(endpoint: Endpoint, frames: list[bytes]) -> list[bytes]:
    """The rank's answer to one frame set."""
    with connect(endpoint) as sock:
        framing.send_frames(sock, frames, TIMEOUT_S)
        return [bytes(f) for f in framing.recv_frames(sock, 2**30, TIMEOUT_S)]


def refusal(endpoint: Endpoint, frames: list[bytes]) -> str:
    """The rank's error message for a request, or "ok" when it answered."""
    reply = ask(endpoint, frames)
    return reply[1].decode() if wire.Header.decode(reply[0]).kind == wire.ERROR else "ok"


class SilentRank:
    """Listens like a rank, reads requests and answers only when told (a hung or slow rank)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = Endpoint(0, f"tcp://127.0.0.1:{self.listener.getsockname()[1]}")
        self.conn: socket.socket | None = None

    def take(self) -> list[bytes]:
        if self.conn is None:
            self.listener.settimeout(TIMEOUT_S)
            self.conn, _ = self.listener.accept()
            self.conn.setblocking(False)
        framing.wait(self.conn, select.POLLIN, time.monotonic() + TIMEOUT_S)
        return [bytes(f) for f in framing.recv_frames(self.conn, 2**30, TIMEOUT_S)]

    def send(self, frames: list[wire.Frame]) -> None:
        assert self.conn is not None
        framing.send_frames(self.conn, frames, TIMEOUT_S)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
