"""A Responses API response, built from a settled ChatEvent stream: the output items, the typed
stream events, and the final response object.

Output items, in the order K2 writes them: a `reasoning` item (its text as `reasoning_text`
content; K2 returns its whole reasoning, no summary), a `message` item with one `output_text`
part, then one `function_call` item per valid call (call_id = K2's own call id, which the
client sends back in `function_call_output`). Stream events follow OpenAI's sequence:
response.created, response.in_progress, then per item output_item.added, content_part.added,
*.delta ..., *.done, content_part.done, output_item.done, and last response.completed (or
response.incomplete when max_output_tokens cut the output); each carries a sequence_number.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from k2model.text.messages import Message, ToolCall
from services.chat.types import ChatEvent, TokenLogprob, Usage

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _logprobs(tokens: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    return [
        {
            "token": t.token,
            "logprob": t.logprob,
            "bytes": list(t.bytes),
            "top_logprobs": [{"token": s, "logprob": v, "bytes": list(b)} for s, v, b in t.top],
        }
        for t in tokens
    ]


@dataclass
class _Item:
    kind: str  # "reasoning" | "message" | "function_call"
    id: str
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    call: ToolCall | None = None
    done: bool = False
    cut: bool = False  # max_output_tokens ended it

    def body(self) -> dict[str, Any]:
        status = ("incomplete" if self.cut else "completed") if self.done else "in_progress"
        if self.kind == "reasoning":
            content = [{"type": "reasoning_text", "text": self.text}] if self.done else []
            return {"type": "reasoning", "id": self.id, "summary": [], "content": content}
        if self.kind == "message":
            parts = [self._part()] if self.done else []
            return {
                "type": "message",
                "id": self.id,
                "status": status,
                "role": "assistant",
                "content": parts,
            }
        assert self.call is not None
        return {
            "type": "function_call",
            "id": self.id,
            "call_id": self.call.id,
            "name": self.call.name,
            "arguments": self.call.arguments if self.done else "",
            "status": status,
        }

    def _part(self) -> dict[str, Any]:
        if self.kind == "reasoning":
            return {"type": "reasoning_text", "text": self.text}
        logprobs = self.logprobs if self.done else []
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": logprobs}


class ResponseBuilder:
    """Feed it the settled events of one choice; it returns the stream events each one makes
    and, at the end, the response object."""

    def __init__(self, response_id: str, echo: dict[str, Any]) -> None:
        """echo: the request fields the response object repeats (model, instructions, ...)."""
        self.id, self.echo = response_id, echo
        self.created_at = int(time.time())
        self.items: list[_Item] = []
        self.usage = Usage(0, 0)
        self.finish_reason: str | None = None
        self._sequence = 0

    @property
    def sequence(self) -> int:
        """The next event's sequence_number."""
        return self._sequence

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[Event]:
        snapshot = self.response("in_progress")
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, event: ChatEvent) -> list[Event]:
        out: list[Event] = []
        if event.reasoning:
            out += self._text("reasoning", event.reasoning, ())
        if event.content or (event.logprobs and not event.reasoning):
            out += self._text("message", event.content, event.logprobs)
        for call in event.tool_calls:
            out += self._close()
            item = _Item("function_call", new_id("fc"), call=ToolCall(call.id, call.name, ""))
            out += self._open(item)
            index = len(self.items) - 1
            item.call = ToolCall(call.id, call.name, call.arguments)
            args = {"item_id": item.id, "output_index": index}
            out.append(
                self._event("response.function_call_arguments.delta", **args, delta=call.arguments)
            )
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    **args,
                    arguments=call.arguments,
                    name=call.name,
                )
            )
            item.done = True
            out.append(
                self._event("response.output_item.done", output_index=index, item=item.body())
            )
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if event.usage is not None:
            self.usage = event.usage
        return out

    def finish(self) -> list[Event]:
        if self.finish_reason == "length" and self.items and not self.items[-1].done:
            self.items[-1].cut = True
        out = self._close()
        status = self.status()
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*out, self._event(kind, response=self.response(status))]

    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def _text(self, kind: str, text: str, logprobs: Sequence[TokenLogprob]) -> list[Event]:
        out: list[Event] = []
        current = self.items[-1] if self.items and not self.items[-1].done else None
        if current is None or current.kind != kind:
            out += self._close()
            current = _Item(kind, new_id("rs" if kind == "reasoning" else "msg"))
            out += self._open(current)
            out.append(self._part_event("response.content_part.added", current, empty=True))
        current.text += text
        entries = _logprobs(logprobs)
        current.logprobs += entries
        delta = (
            "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        )
        fields = self._where(current)
        if kind == "message":
            fields["logprobs"] = entries
        out.append(self._event(delta, **fields, delta=text))
        return out

    def _where(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": self.items.index(item), "content_index": 0}

    def _part_event(self, kind: str, item: _Item, *, empty: bool = False) -> Event:
        part = item._part()
        if empty:
            part = {**part, "text": ""} | ({"logprobs": []} if item.kind == "message" else {})
        return self._event(kind, **self._where(item), part=part)

    def _open(self, item: _Item) -> list[Event]:
        self.items.append(item)
        index = len(self.items) - 1
        return [self._event("response.output_item.added", output_index=index, item=item.body())]

    def _close(self) -> list[Event]:
        if not self.items or self.items[-1].done:
            return []
        item = self.items[-1]
        item.done = True
        done = (
            "response.reasoning_text.done"
            if item.kind == "reasoning"
            else "response.output_text.done"
        )
        fields = self._where(item)
        if item.kind == "message":
            fields["logprobs"] = item.logprobs
        return [
            self._event(done, **fields, text=item.text),
            self._part_event("response.content_part.done", item),
            self._event(
                "response.output_item.done", output_index=len(self.items) - 1, item=item.body()
            ),
        ]

    def response(self, status: str) -> dict[str, Any]:
        u = self.usage
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "output": [i.body() for i in self.items],
            "usage": {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            }
            if status != "in_progress"
            else None,
            **self.echo,
        }

    def assistant_turn(self) -> Message:
        """The output as the assistant message a follow-up response's prompt holds."""
        text = "".join(i.text for i in self.items if i.kind == "message")
        reasoning = "".join(i.text for i in self.items if i.kind == "reasoning") or None
        calls = tuple(i.call for i in self.items if i.call is not None)
        return Message("assistant", text or None, tool_calls=calls, reasoning_content=reasoning)
