"""Incremental tool-call / reasoning parsing of a K2 output fed as pieces (pieces.py).

Markers arrive as whole pieces, one per control id, so structure never waits on text. Only the
singular section markers the model may spell as text (tool_parser.py) are looked for in text:
content or reasoning that could still be a singular begin directly before a call is held back
until the next piece decides, and so is a possible singular end between calls. Events follow
OpenAI's streaming shape: a call's start (index, id, name) once its id is complete, then
argument fragments, then Done or an error.

The grammar is tool_parser.py's; the contract, tested over every way of splitting an output, is
`aggregate(all events) == parse_output(all pieces)`. A ToolCallError may follow a
ToolCallStart and argument deltas (the arguments turn out not to be JSON, or the call is cut
short): such a call is not valid and the consumer must not present it as one. Calls whose id
is malformed or undeclared get no start, only the error.
"""

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import Enum, auto

from k2model.text import chat_tokens as tok
from k2model.text.pieces import Piece, as_text_unless
from k2model.text.reasoning import CALLING_BEGINS, strip_singular_begin
from k2model.text.tool_parser import (
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
        self._declared = declared
        self._history_calls = history_calls
        self._mode = _Mode.REASONING if reasoning else _Mode.CONTENT
        self._buf = ""  # text that may still be a singular section marker
        self._call: _Call | None = None
        self._n_calls = 0
        self._events: list[Event] = []

    def feed(self, pieces: Iterable[Piece]) -> list[Event]:
        for piece in as_text_unless(self._markers, pieces):
            if isinstance(piece, str):
                self._buf += piece
                self._scan()
            else:
                self._release(before=piece.name)
                self._marker(piece.name)
        return self._take()

    def finish(self) -> list[Event]:
        """Flushes held text (it cannot become a marker any more) and ends an open call."""
        self._release(before=None)
        if self._call is not None:
            self._end_call(terminated=False)
        return self._take()

    def _take(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _scan(self) -> None:
        if self._mode is _Mode.SECTION:
            end = self._buf.find(tok.SECTION_END_SINGULAR)
            if end < 0:  # dropped, but for what may begin a singular end
                self._buf = self._buf[_held_from(self._buf, tok.SECTION_END_SINGULAR) :]
                return
            self._buf = self._buf[end + len(tok.SECTION_END_SINGULAR) :]
            self._mode = _Mode.CONTENT
        if self._mode in (_Mode.REASONING, _Mode.CONTENT):
            hold = _held_from(self._buf, tok.SECTION_BEGIN_SINGULAR, trailing_space=True)
        else:
            hold = len(self._buf)
        self._text(self._buf[:hold])
        self._buf = self._buf[hold:]

    def _release(self, *, before: str | None) -> None:
        """Held text, decided by what comes next: a marker (its name) or the end (None)."""
        held, self._buf = self._buf, ""
        if self._mode is _Mode.SECTION:
            return
        self._text(strip_singular_begin(held) if before in CALLING_BEGINS else held)

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
        elif marker == tok.SECTION_BEGIN:
            self._mode = _Mode.SECTION
        elif (marker == tok.SECTION_END and self._mode is _Mode.SECTION) or (
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


def _held_from(text: str, name: str, *, trailing_space: bool = False) -> int:
    """Where the suffix of `text` that may still become `name` starts (len(text): none). The
    name holds "<" only at its start; with trailing_space, the whole name followed by white
    space is held too (it is decided by the piece after it)."""
    start = text.rfind("<")
    if start < 0:
        return len(text)
    tail = text[start:]
    if name.startswith(tail):
        return start
    if trailing_space and tail.startswith(name) and not tail[len(name) :].strip():
        return start
    return len(text)


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
