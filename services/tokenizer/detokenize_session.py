"""One choice's detokenization: generated ids in, text that is safe to show out. No grpc here.

Per push, with a parse option on: PieceDecoder (complete UTF-8 text, and a marker for each
tool-call or reasoning control id; the same characters written with ordinary tokens stay text)
-> StreamParser (structured events) -> StopMatcher over content. With neither option: the plain
IncrementalDetokenizer -> StopMatcher.

Stop strings are matched in the content only, the answer text the client shows. They are not
matched inside reasoning (a thinking model's scratchpad would otherwise end the answer before it
starts) nor inside tool-call ids or arguments (JSON the client parses; a stop string such as "}"
would cut a call in half). A stop string must lie within one run of content: held-back content
is released before any tool-call or reasoning delta, so deltas keep the model's order, and a
stop string never completes across a tool call. Once a stop string completes, that output has
`stopped` set, the stop string and everything the model wrote after it are dropped, and every
later output is empty with `stopped` set.

Parse options:
- neither: a plain detokenizer (completions); the text is exactly the decode, markers included.
- parse_tool_calls: calls become ToolCallDeltas (id and name on a call's first delta, then
  argument fragments; a call found invalid when it ends gets a delta with `error`). tool_names,
  when given, is the declared set; empty means any name is accepted.
- parse_reasoning alone: tool-call markup is still recognised, so no raw marker reaches content,
  but no tool is declared, so each call the model writes is reported as an error delta.
A call whose id the model wrote malformed is re-issued as functions.NAME:IDX counting from 0:
the session is given no count of the conversation's earlier calls.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from k2model.text.detokenizer import IncrementalDetokenizer
from k2model.text.pieces import PieceDecoder, marker_ids
from k2model.text.stops import StopMatcher
from k2model.text.stream_parser import (
    ContentDelta,
    Event,
    ReasoningDelta,
    StreamParser,
    ToolCallArgsDelta,
    ToolCallError,
    ToolCallStart,
)
from k2model.text.tokenizer import Tokenizer
from k2model.text.tool_parser import markers_for
from services.chat.types import ToolCallDelta
from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class DetokenizeOptions:
    stop: tuple[str, ...] = ()
    parse_tool_calls: bool = False
    parse_reasoning: bool = False
    tool_names: tuple[str, ...] = ()
    skip_special_tokens: bool = False


@dataclass(frozen=True)
class Output:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    stopped: bool = False


def _check_options(options: DetokenizeOptions) -> StopMatcher:
    if options.tool_names and not options.parse_tool_calls:
        raise InvalidArgument("tool_names: declaring tools requires parse_tool_calls")
    seen: set[str] = set()
    for i, name in enumerate(options.tool_names):
        if not name or any(c.isspace() for c in name) or name in seen:
            raise InvalidArgument(f"tool_names[{i}]: empty, has whitespace or repeated: {name!r}")
        seen.add(name)
    try:
        return StopMatcher(options.stop)
    except ValueError as e:
        raise InvalidArgument(f"stop: {e}") from None


def _make_parser(options: DetokenizeOptions) -> StreamParser | None:
    if options.parse_tool_calls:
        declared = frozenset(options.tool_names) or None
        return StreamParser(reasoning=options.parse_reasoning, declared=declared)
    if options.parse_reasoning:
        return StreamParser(reasoning=True, declared=frozenset())
    return None


def _tool_delta(event: Event) -> ToolCallDelta | None:
    if isinstance(event, ToolCallStart):
        return ToolCallDelta(event.index, id=event.id, name=event.name)
    if isinstance(event, ToolCallArgsDelta):
        return ToolCallDelta(event.index, arguments=event.text)
    if isinstance(event, ToolCallError):
        return ToolCallDelta(event.index, error=event.reason)
    return None  # ToolCallDone: its id, name and arguments have already gone out


def _append(deltas: list[ToolCallDelta], delta: ToolCallDelta) -> None:
    """Argument fragments join the previous delta of the same call, so one output holds one
    delta per call (an error delta stays separate)."""
    last = deltas[-1] if deltas else None
    fragment = not (delta.id or delta.name or delta.error)
    if fragment and last is not None and last.index == delta.index and not last.error:
        deltas[-1] = dataclasses.replace(last, arguments=last.arguments + delta.arguments)
    else:
        deltas.append(delta)


class DetokenizeSession:
    def __init__(self, tokenizer: Tokenizer, options: DetokenizeOptions):
        self._stops = _check_options(options)
        self._parser = _make_parser(options)
        skip = options.skip_special_tokens
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip)
        markers = marker_ids(tokenizer, markers_for(options.parse_reasoning))
        self._pieces = PieceDecoder(tokenizer, markers, skip)
        self._stopped = False

    def push(self, ids: Sequence[int]) -> Output:
        if self._stopped:
            return Output(stopped=True)
        try:
            decoded = (
                self._detokenizer.push(ids) if self._parser is None else self._pieces.push(ids)
            )
        except ValueError as e:  # an id outside the vocabulary
            raise InvalidArgument(f"ids: {e}") from None
        if isinstance(decoded, str):
            return self._route([ContentDelta(decoded)], final=False)
        assert self._parser is not None
        return self._route(self._parser.feed(decoded), final=False)

    def finish(self) -> Output:
        """End of the id stream: releases everything held back and ends an open tool call."""
        if self._stopped:
            return Output(stopped=True)
        if self._parser is None:
            events: list[Event] = [ContentDelta(self._detokenizer.flush())]
        else:
            events = self._parser.feed(self._pieces.flush()) + self._parser.finish()
        return self._route(events, final=True)

    def _route(self, events: list[Event], *, final: bool) -> Output:
        content: list[str] = []
        reasoning: list[str] = []
        deltas: list[ToolCallDelta] = []
        for event in events:
            if isinstance(event, ContentDelta):
                visible, self._stopped = self._stops.push(event.text)
                content.append(visible)
                if self._stopped:
                    break  # what follows the stop string in the model's text is dropped
                continue
            content.append(self._stops.flush())
            if isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif (delta := _tool_delta(event)) is not None:
                _append(deltas, delta)
        if final and not self._stopped:
            content.append(self._stops.flush())
        return Output("".join(content), "".join(reasoning), tuple(deltas), self._stopped)
