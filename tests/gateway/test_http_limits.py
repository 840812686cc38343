"""The request head and read time are bounded on the wire, before anything is buffered: raw
sockets against the gateway on its own server protocol (gateway/http_server.py).

Regression: uvicorn's httptools parser read a header of any size before the
gateway's 16 KiB check ran (a 256 MiB header got its 431 after 104 s; 16 unfinished 64 MiB
headers took the gateway from 284 MB to 1,334 MB), and a client that sent its request slowly
held its connection forever."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from gateway.config import GatewayConfig
from tests.gateway.rest_fakes import ORDINARY_KEY, SHAPE, ScriptedChat, config_dict
from tests.gateway.rest_server import HTTP, running

READ_TIMEOUT_S = 2
CHUNK = 64 * 1024


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    raw = config_dict()
    raw["limits"] = {"read_timeout_s": READ_TIMEOUT_S}
    with running(ScriptedChat(), GatewayConfig.from_dict(raw, SHAPE)) as url:
        yield url


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def send_until_refused(sock: socket.socket, head: bytes, total: int) -> int:
    """Sends `head` then filler header bytes up to `total`; returns how many bytes went out
    before the server closed the connection."""
    sent = 0
    try:
        sock.sendall(head)
        sent = len(head)
        while sent < total:
            sock.sendall(b"a" * CHUNK)
            sent += CHUNK
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def test_an_endless_header_is_refused_early_with_431(base: str) -> None:
    sock = connect(base)
    sent = send_until_refused(sock, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", 64 << 20)
    try:
        reply = read_all(sock)
    except ConnectionResetError:
        reply = b""  # the server closed with our unread bytes in its buffer
    sock.close()
    assert sent < 16 << 20, f"the server kept reading: {sent} bytes"
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431 ")
    assert HTTP.get(f"{base}/health", timeout=10).status_code == 200


def test_many_unfinished_heads_are_each_cut_off(base: str) -> None:
    socks = [connect(base) for _ in range(16)]
    for s in socks:
        s.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (15 * 1024))
    sent = [send_until_refused(s, b"", 8 << 20) for s in socks]
    for s in socks:
        s.close()
    assert max(sent) < 8 << 20, sent
    assert HTTP.get(f"{base}/health", timeout=10).status_code == 200


def test_a_head_just_under_the_limit_is_served(base: str) -> None:
    headers = {"X-Pad": "p" * (12 * 1024), "Authorization": f"Bearer {ORDINARY_KEY}"}
    assert HTTP.get(f"{base}/v1/models", headers=headers).status_code == 200


def test_too_many_headers_is_431(base: str) -> None:
    headers = {f"X-H{i}": "v" for i in range(150)}
    response = HTTP.get(f"{base}/health", headers=headers)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_slow_head_is_answered_408_and_closed(base: str) -> None:
    sock = connect(base)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
    started = time.monotonic()
    reply = read_all(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:80]
    assert time.monotonic() - started >= READ_TIMEOUT_S * 0.9


def test_a_slow_body_is_cut_off(base: str) -> None:
    sock = connect(base)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + ORDINARY_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
    )
    reply = read_all(sock)  # returns once the server closes the connection
    sock.close()
    assert b" 200 " not in reply[:20]


def test_idle_keep_alive_then_requests_still_work(base: str) -> None:
    sock = connect(base)
    for _ in range(2):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200 ")
    sock.close()
