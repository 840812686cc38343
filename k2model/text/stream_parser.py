"""Incremental tool-call / reasoning parsing of a K2 output fed as text deltas.

Deltas come from a detokenizer, so a marker can be split across any number of them. Text that
could still become a marker (a suffix of the buffer that is a prefix of one) is held back until
it can be decided, so no part of a raw marker is ever emitted as content or reasoning. Events
follow OpenAI's streaming shape: a call's start (index, id, name) once its id is complete, then
argument fragments, then Done or an error.

The grammar is tool_parser.py's; the contract, tested over every way of splitting an output, is
`aggregate(all events) == parse_output(full text)`. A ToolCallError may follow a
ToolCallStart and argument deltas (the arguments turn out not to be JSON, or the call is cut
short): such a call is not valid and the consumer must not present it as one. Calls whose id
is malformed or undeclared get no start, only the error.
"""

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum, auto

from k2model.text import chat_tokens as tok
from k2model.text.tool_parser import (
    SECTION_BEGINS,
    SECTION_ENDS,
    ParsedOutput,
    ParsedToolCall,
    ToolCallError,
    finish_call,
    markers_for,
    resolve_id,
)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallDone:
    call: ParsedToolCall


Event = (
    ContentDelta | ReasoningDelta | ToolCallStart | ToolCallArgsDelta | ToolCallDone | ToolCallError
)


class _Mode(Enum):
    REASONING = auto()
    CONTENT = auto()
    SECTION = auto()  # between calls
    CALL_ID = auto()
    CALL_ARGS = auto()


class _Call:
    def __init__(self, index: int):
        self.index = index
        self.raw = tok.CALL_BEGIN
        self.id_text = ""
        self.args_text: str | None = None
        self.started = False  # a ToolCallStart went out
        self.args_begun = False  # a non-whitespace argument char went out
        self.pending_ws = ""  # trailing whitespace held back until more arguments come


class StreamParser:
    def __init__(
        self,
        *,
        reasoning: bool = False,
        declared: Collection[str] | None = None,
        history_calls: int = 0,
    ):
        self._markers = markers_for(reasoning)
        self._marker_re = re.compile("|".join(re.escape(m) for m in sorted(self._markers)))
        self._max_marker = max(len(m) for m in self._markers)
        self._declared = declared
        self._history_calls = history_calls
        self._mode = _Mode.REASONING if reasoning else _Mode.CONTENT
        self._buf = ""
        self._call: _Call | None = None
        self._n_calls = 0
        self._events: list[Event] = []

    def feed(self, delta: str) -> list[Event]:
        self._buf += delta
        while match := self._marker_re.search(self._buf):
            self._text(self._buf[: match.start()])
            self._buf = self._buf[match.end() :]
            self._marker(match.group())
        hold = self._held_prefix_start()
        self._text(self._buf[:hold])
        self._buf = self._buf[hold:]
        return self._take()

    def finish(self) -> list[Event]:
        """Flushes held text (it cannot become a marker any more) and ends an open call."""
        self._text(self._buf)
        self._buf = ""
        if self._call is not None:
            self._end_call(terminated=False)
        return self._take()

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _held_prefix_start(self) -> int:
        # Every marker holds "<" only at its start, so only a suffix from the last "<" can be
        # the beginning of a marker.
        start = self._buf.rfind("<")
        if start < 0 or len(self._buf) - start >= self._max_marker:
            return len(self._buf)
        tail = self._buf[start:]
        return start if any(m.startswith(tail) for m in self._markers) else len(self._buf)

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._mode is _Mode.REASONING:
            self._events.append(ReasoningDelta(text))
        elif self._mode is _Mode.CONTENT:
            self._events.append(ContentDelta(text))
        elif self._call is not None:
            self._call.raw += text
            if self._mode is _Mode.CALL_ID:
                self._call.id_text += text
            else:
                self._call_args(self._call, text)

    def _call_args(self, call: _Call, text: str) -> None:
        call.args_text = (call.args_text or "") + text
        if not call.started:
            return
        if not call.args_begun:
            text = text.lstrip()
            call.args_begun = bool(text)
        if not text:
            return
        text = call.pending_ws + text
        kept = text.rstrip()
        call.pending_ws = text[len(kept) :]
        if kept:
            self._events.append(ToolCallArgsDelta(call.index, kept))

    def _marker(self, marker: str) -> None:
        call = self._call
        if call is not None:
            if marker == tok.ARG_BEGIN and self._mode is _Mode.CALL_ID:
                call.raw += marker
                call.args_text = ""
                self._mode = _Mode.CALL_ARGS
                self._start(call)
                return
            if marker == tok.CALL_END:
                call.raw += marker
                self._end_call(terminated=True)
                return
            self._end_call(terminated=False)  # cut short; the marker is read between calls
        if marker == tok.CALL_BEGIN:
            self._call = _Call(self._n_calls)
            self._n_calls += 1
            self._mode = _Mode.CALL_ID
        elif marker in SECTION_BEGINS:
            self._mode = _Mode.SECTION
        elif (marker in SECTION_ENDS and self._mode is _Mode.SECTION) or (
            marker == tok.THINK_END and self._mode is _Mode.REASONING
        ):
            self._mode = _Mode.CONTENT
        # Anything else is a stray marker: dropped.

    def _start(self, call: _Call) -> None:
        resolved = resolve_id(call.id_text, call.index, self._declared, self._history_calls)
        if isinstance(resolved, tuple):
            call.started = True
            self._events.append(ToolCallStart(call.index, *resolved))

    def _end_call(self, *, terminated: bool) -> None:
        call = self._call
        assert call is not None
        result = finish_call(
            index=call.index,
            raw=call.raw,
            id_text=call.id_text,
            args_text=call.args_text,
            terminated=terminated,
            declared=self._declared,
            history_calls=self._history_calls,
        )
        self._events.append(ToolCallDone(result) if isinstance(result, ParsedToolCall) else result)
        self._call = None
        self._mode = _Mode.SECTION


def aggregate(events: Iterable[Event], *, reasoning: bool) -> ParsedOutput:
    """What a non-streaming client would receive for this event stream."""
    content: list[str] = []
    thought: list[str] = []
    calls: list[ParsedToolCall] = []
    errors: list[ToolCallError] = []
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ReasoningDelta):
            thought.append(event.text)
        elif isinstance(event, ToolCallDone):
            calls.append(event.call)
        elif isinstance(event, ToolCallError):
            errors.append(event)
    return ParsedOutput(
        content="".join(content),
        tool_calls=tuple(calls),
        errors=tuple(errors),
        reasoning_content="".join(thought) if reasoning else None,
    )
