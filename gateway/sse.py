"""Server-sent events framing, the streaming response, and cancellation on client disconnect.

Frames follow the SSE spec exactly: `data: <json>\\n\\n` (OpenAI, ending `data: [DONE]\\n\\n`)
or `event: <name>\\ndata: <json>\\n\\n` (Anthropic). JSON is compact and one line.

A client that goes away cancels its request down the pipeline: while streaming, Starlette
cancels the response task when it sees `http.disconnect`, which raises CancelledError inside the
ChatService iterator; `EventStream.cleanup` then closes that iterator whatever happened (even if
streaming never began). A non-streaming handler runs under `cancel_on_disconnect`, which cancels
it when the disconnect arrives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def data_frame(obj: Any) -> bytes:
    return f"data: {_json(obj)}\n\n".encode()


def event_frame(event: str, obj: Any) -> bytes:
    return f"event: {event}\ndata: {_json(obj)}\n\n".encode()


class EventStream(StreamingResponse):
    """A text/event-stream response whose `cleanup` always runs once the response is over:
    finished, failed, or cut short by a disconnect."""

    def __init__(
        self, frames: AsyncIterator[bytes], cleanup: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(frames, media_type="text/event-stream", headers=HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientDisconnected after cancelling it if the client leaves
    first. Call it after the body has been read: later receives only report the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind: its cleanup runs before we answer
    if task.cancelled():
        raise ClientDisconnected
    return task.result()
