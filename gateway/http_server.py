"""The gateway's HTTP/1.1 server: uvicorn with a request head and read time bounded on the wire.

uvicorn's httptools parser accumulates a header of any size before the application sees it (a
256 MiB header was read whole, then refused), and no uvicorn protocol times out a client that
sends its request slowly. So the gateway runs uvicorn's h11 protocol, subclassed:
- the request head (request line and headers) must end within `max_header_bytes`; bytes past
  that are never buffered: the connection gets 431 and is closed (h11 itself would also stop at
  the same size, `h11_max_incomplete_event_size`);
- a request must arrive whole (head and body) within `read_timeout_s` of its first byte, or the
  connection gets 408 (nothing sent yet) or is closed;
- the header count and the body size are checked after parsing, by gateway/app.py's SizeGuard,
  whose body reads are bounded and flow-controlled.
Idle keep-alive connections are closed by uvicorn after `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.config import Limits

_HEAD_END = b"\r\n\r\n"
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _BoundedH11(H11Protocol):
    limits: Limits  # set on the subclass made per server (bounded_protocol)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # reading a request head
            self._arm()
            buffered, _ = self.conn.trailing_data
            limit = self.limits.max_header_bytes
            if len(buffered) + len(data) > limit:
                end = (buffered + data).find(_HEAD_END, 0, limit + len(_HEAD_END))
                if end < 0:
                    self._refuse(431, "request_too_large", f"Request headers exceed {limit} bytes")
                    return
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the request is in: the response may take as long as it takes

    def _arm(self) -> None:
        if self._read_timer is None:
            timeout = self.limits.read_timeout_s
            self._read_timer = self.loop.call_later(timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE:
            timeout = self.limits.read_timeout_s
            self._refuse(408, "timeout", f"The request did not arrive within {timeout} s")
        else:
            self.transport.close()  # a slow body: the app sees the disconnect

    def _refuse(self, status: int, code: str, message: str) -> None:
        """An answer on the wire and a closed connection, before any application runs (so the
        OpenAI error shape: the path is not known yet)."""
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
        body = json.dumps({"error": error}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self._disarm()
        self.transport.close()


def bounded_protocol(limits: Limits) -> type[H11Protocol]:
    return type("BoundedH11Protocol", (_BoundedH11,), {"limits": limits})


def server_config(app: Any, host: str, port: int, limits: Limits, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration every gateway server uses (the tests' servers too). uvicorn's
    own access log is off: gateway/request_ids.py logs each request once, with its id."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=bounded_protocol(limits),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        **{"access_log": False, **kwargs},
    )
