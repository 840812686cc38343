"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens, served both at the
root and under /anthropic (Moonshot's Anthropic-compatible base URL, what Claude Code's
ANTHROPIC_BASE_URL points at).

Streaming follows Anthropic's event sequence: message_start, then per content block
content_block_start / content_block_delta (thinking_delta, text_delta, input_json_delta) /
content_block_stop, then message_delta (stop_reason and the usage totals) and message_stop. A
failure mid-stream is an `event: error` frame. message_start reports input_tokens 0: the prompt
is counted by the pipeline as it runs, and message_delta carries the final totals, which the
SDKs take over the start values.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway import errors
from gateway.anthropic_models import CountTokensRequest, MessagesRequest
from gateway.auth import Key
from gateway.events import collect
from gateway.serving import gateway_of
from gateway.sse import EventStream, cancel_on_disconnect, event_frame
from services.chat.types import ChatEvent, ToolCallDelta, Usage

router = APIRouter()

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _usage(usage: Usage) -> dict[str, int]:
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}


def _tool_input(call: ToolCallDelta) -> dict[str, Any] | None:
    """A tool_use input must be a JSON object; other arguments are not a call on this API."""
    try:
        value = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _message(
    msg_id: str, model: str, content: list[dict[str, Any]], stop: str | None, usage: Usage
) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _usage(usage),
    }


class _Blocks:
    """The content blocks of one streamed message: numbered in order, at most one open."""

    def __init__(self) -> None:
        self.index = -1
        self.open = ""  # "" | "thinking" | "text" | "tool_use"
        self.tool_uses = 0

    def close(self) -> list[bytes]:
        if not self.open:
            return []
        self.open = ""
        return [
            event_frame("content_block_stop", {"type": "content_block_stop", "index": self.index})
        ]

    def start(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        frames = self.close()
        self.index, self.open = self.index + 1, kind
        body = {"type": "content_block_start", "index": self.index, "content_block": block}
        return [*frames, event_frame("content_block_start", body)]

    def delta(self, body: dict[str, Any]) -> bytes:
        frame = {"type": "content_block_delta", "index": self.index, "delta": body}
        return event_frame("content_block_delta", frame)

    def frames(self, e: ChatEvent) -> list[bytes]:
        out: list[bytes] = []
        if e.reasoning:
            if self.open != "thinking":
                out += self.start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self.delta({"type": "thinking_delta", "thinking": e.reasoning}))
        if e.content:
            if self.open != "text":
                out += self.start("text", {"type": "text", "text": ""})
            out.append(self.delta({"type": "text_delta", "text": e.content}))
        for call in e.tool_calls:
            if _tool_input(call) is not None:
                block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
                out += self.start("tool_use", block)
                out.append(self.delta({"type": "input_json_delta", "partial_json": call.arguments}))
                self.tool_uses += 1
        return out


def _stop_reason(finish: str | None, tool_uses: int) -> str:
    stop = STOP_REASONS.get(finish or "", "end_turn")
    return "end_turn" if stop == "tool_use" and not tool_uses else stop


async def _events(
    msg_id: str, model: str, events: AsyncIterator[ChatEvent]
) -> AsyncIterator[bytes]:
    start = _message(msg_id, model, [], None, Usage(0, 0))
    yield event_frame("message_start", {"type": "message_start", "message": start})
    blocks = _Blocks()
    usage, finish = Usage(0, 0), None
    try:
        async for e in events:
            for frame in blocks.frames(e):
                yield frame
            finish = e.finish_reason or finish
            usage = e.usage or usage
        for frame in blocks.close():
            yield frame
        delta = {"stop_reason": _stop_reason(finish, blocks.tool_uses), "stop_sequence": None}
        body = {"type": "message_delta", "delta": delta, "usage": _usage(usage)}
        yield event_frame("message_delta", body)
        yield event_frame("message_stop", {"type": "message_stop"})
    except Exception as exc:
        yield event_frame("error", errors.from_exception(exc).anthropic_body())


def _content(reasoning: str, text: str, calls: list[ToolCallDelta]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text:
        blocks.append({"type": "text", "text": text})
    for call in calls:
        args = _tool_input(call)
        if args is not None:
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": args})
    return blocks


async def messages(body: MessagesRequest, request: Request, key: Key) -> Response:
    gw = gateway_of(request)
    model = gw.resolve(key, body.model)
    chat = body.to_chat_request(model, gw.default_thinking(model), gw.config.limits)
    msg_id = f"msg_{uuid.uuid4().hex}"
    request.state.completion_id = msg_id
    gen = await cancel_on_disconnect(request, gw.start(chat, msg_id))
    if body.stream:
        return EventStream(_events(msg_id, model.id, aiter(gen)), gen.close)
    try:
        (choice,), usage = await cancel_on_disconnect(request, collect(aiter(gen), 1))
    finally:
        await gen.close()
    content = _content(choice.reasoning, choice.content, choice.tool_calls)
    stop = _stop_reason(choice.finish_reason, sum(b["type"] == "tool_use" for b in content))
    return JSONResponse(_message(msg_id, model.id, content, stop, usage))


async def count_tokens(body: CountTokensRequest, request: Request, key: Key) -> dict[str, int]:
    gw = gateway_of(request)
    model = gw.resolve(key, body.model)
    chat = body.to_chat_request(model, gw.default_thinking(model), gw.config.limits)
    return {"input_tokens": await gw.services[model.id].count_tokens(chat)}


for prefix in ("", "/anthropic"):
    router.add_api_route(f"{prefix}/v1/messages", messages, methods=["POST"])
    router.add_api_route(f"{prefix}/v1/messages/count_tokens", count_tokens, methods=["POST"])
