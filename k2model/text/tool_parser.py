"""Tool calls (and, for Thinking models, reasoning) in a complete K2 output.

The output comes as pieces (pieces.py): text, and markers that stand for control ids. Structure
is decided by the markers alone; text that spells a marker's name is text (docs/text.md, tool calls):

    content [SECTION_BEGIN]
      [CALL_BEGIN]functions.NAME:IDX[ARG_BEGIN]{json}[CALL_END] ...
    [SECTION_END]

Grammar, shared with the streaming parser (stream_parser.py), which must agree exactly:
- Outside a call, text is content. A section begin opens a section; a call begin opens a call
  even without a section. Text inside a section but between calls is dropped; a section end
  returns to content (so text after the section is content too). Stray markers are dropped.
- The singular section markers the model sometimes writes are not tokens of any K2 vocabulary,
  so they can only be text (docs/text.md, tool calls). Two places read them anyway, where no other reading
  makes sense: a singular begin (then only white space) right before a section or call begin is
  dropped from the content, and a singular end between calls ends the section.
- In a call, text before the argument marker is the id, after it the arguments. The call ends
  at CALL_END; any other marker (or the end of the output) cuts it short: the call is an error
  and the marker is then read as between calls.
- Id and arguments are whitespace-stripped. A well-formed id `functions.NAME:IDX` is kept (NAME
  = text up to the last colon); otherwise the name is recovered leniently (optional "functions."
  prefix, optional ":IDX" suffix) and the id is re-issued as functions.NAME:{history_calls +
  index}, continuing the conversation-wide numbering (tool_ids.py).
- A call is valid only if terminated, its name is declared (when a declared set is given) and
  its arguments are a JSON object; anything else is a ToolCallError, never a call.
- `index` counts call attempts (valid or not) in this output, from 0.
With reasoning=True the output first goes through reasoning.split_reasoning, and <think> /
</think> are markers everywhere (dropped outside calls, cutting a call short inside one).
"""

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from k2model.text import chat_tokens as tok
from k2model.text.pieces import Marker, Piece, as_text_unless, merge
from k2model.text.reasoning import (
    CALLING_BEGINS,
    THINK_MARKERS,
    split_reasoning,
    strip_singular_begin,
)
from k2model.text.tool_ids import canonical_id

TOOL_MARKERS = frozenset(
    {tok.SECTION_BEGIN, tok.SECTION_END, tok.CALL_BEGIN, tok.ARG_BEGIN, tok.CALL_END}
)


def markers_for(reasoning: bool) -> frozenset[str]:
    return TOOL_MARKERS | THINK_MARKERS if reasoning else TOOL_MARKERS


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON object text, as the model wrote it (stripped)
    index: int


@dataclass(frozen=True)
class ToolCallError:
    index: int
    raw: str  # the call's exact text, from <|tool_call_begin|> to where it ended
    reason: str


@dataclass(frozen=True)
class ParsedOutput:
    content: str
    tool_calls: tuple[ParsedToolCall, ...] = ()
    errors: tuple[ToolCallError, ...] = ()
    reasoning_content: str | None = None  # None when reasoning parsing is off

    @property
    def finish_reason(self) -> str:
        """ "tool_calls" when at least one valid call; the caller substitutes "length" when the
        engine stopped at max_tokens."""
        return "tool_calls" if self.tool_calls else "stop"


_CANONICAL_ID = re.compile(r"functions\.(?P<name>\S+):\d+")
_INDEX_SUFFIX = re.compile(r":\d+$")


def resolve_id(
    id_text: str, index: int, declared: Collection[str] | None, history_calls: int
) -> tuple[str, str] | str:
    """(id, name) for a call, or the reason it cannot be one."""
    raw_id = id_text.strip()
    match = _CANONICAL_ID.fullmatch(raw_id)
    if match:
        call_id, name = raw_id, match["name"]
    else:
        name = _INDEX_SUFFIX.sub("", raw_id.removeprefix("functions."))
        if not name or any(c.isspace() for c in name):
            return f"malformed tool-call id {raw_id!r}"
        call_id = canonical_id(name, history_calls + index)
    if declared is not None and name not in declared:
        return f"undeclared tool {name!r}"
    return call_id, name


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def arguments_error(arguments: str) -> str | None:
    """Why stripped argument text is not a JSON object, or None if it is one."""
    try:
        value = json.loads(arguments, parse_constant=_reject_constant)
    except ValueError as e:
        return f"arguments are not valid JSON: {e}"
    except RecursionError:
        return "arguments are not valid JSON: nested too deeply"
    if not isinstance(value, dict):
        return f"arguments are not a JSON object (got {type(value).__name__})"
    return None


def finish_call(
    *,
    index: int,
    raw: str,
    id_text: str,
    args_text: str | None,
    terminated: bool,
    declared: Collection[str] | None,
    history_calls: int,
) -> ParsedToolCall | ToolCallError:
    """A finished call attempt; args_text is None when the argument marker never came."""
    if args_text is None:
        return ToolCallError(index, raw, f"missing {tok.ARG_BEGIN}")
    if not terminated:
        return ToolCallError(index, raw, f"unterminated tool call (no {tok.CALL_END})")
    resolved = resolve_id(id_text, index, declared, history_calls)
    if isinstance(resolved, str):
        return ToolCallError(index, raw, resolved)
    arguments = args_text.strip()
    problem = arguments_error(arguments)
    if problem:
        return ToolCallError(index, raw, problem)
    return ParsedToolCall(resolved[0], resolved[1], arguments, index)


class _Call:
    def __init__(self, index: int):
        self.index = index
        self.raw = tok.CALL_BEGIN
        self.id_text = ""
        self.args_text: str | None = None


def parse_output(
    pieces: Sequence[Piece],
    *,
    reasoning: bool = False,
    declared: Collection[str] | None = None,
    history_calls: int = 0,
) -> ParsedOutput:
    pieces = merge(as_text_unless(markers_for(reasoning), pieces))
    reasoning_text = None
    if reasoning:
        reasoning_text, pieces = split_reasoning(pieces)
    content: list[str] = []
    results: list[ParsedToolCall | ToolCallError] = []
    in_section = False
    call: _Call | None = None

    def end_call(c: _Call, terminated: bool) -> None:
        results.append(
            finish_call(
                index=c.index,
                raw=c.raw,
                id_text=c.id_text,
                args_text=c.args_text,
                terminated=terminated,
                declared=declared,
                history_calls=history_calls,
            )
        )

    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            if call is not None:
                call.raw += piece
                if call.args_text is None:
                    call.id_text += piece
                else:
                    call.args_text += piece
                continue
            if in_section:  # text between calls is dropped, up to a singular section end
                end = piece.find(tok.SECTION_END_SINGULAR)
                if end < 0:
                    continue
                in_section = False
                piece = piece[end + len(tok.SECTION_END_SINGULAR) :]
            following = pieces[i + 1] if i + 1 < len(pieces) else None
            opens = isinstance(following, Marker) and following.name in CALLING_BEGINS
            content.append(strip_singular_begin(piece) if opens else piece)
            continue
        marker = piece.name
        if call is not None:
            if marker == tok.ARG_BEGIN and call.args_text is None:
                call.raw += marker
                call.args_text = ""
                continue
            if marker == tok.CALL_END:
                call.raw += marker
                end_call(call, terminated=True)
                call, in_section = None, True
                continue
            end_call(call, terminated=False)  # any other marker cuts the call short
            call, in_section = None, True
        if marker == tok.CALL_BEGIN:
            call = _Call(len(results))
        elif marker == tok.SECTION_BEGIN:
            in_section = True
        elif marker == tok.SECTION_END:
            in_section = False
    if call is not None:
        end_call(call, terminated=False)
    return ParsedOutput(
        content="".join(content),
        tool_calls=tuple(r for r in results if isinstance(r, ParsedToolCall)),
        errors=tuple(r for r in results if isinstance(r, ToolCallError)),
        reasoning_content=reasoning_text,
    )
