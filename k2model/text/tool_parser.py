"""Tool calls (and, for Thinking models, reasoning) in a complete K2 output text.

The text is a skip-special decode, so tool-call markers and <think> / </think> are still there
(K2_SPEC 6.1):

    content <|tool_calls_section_begin|>
      <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}<|tool_call_end|> ...
    <|tool_calls_section_end|>

Grammar, shared with the streaming parser (stream_parser.py), which must agree exactly:
- Outside a call, text is content. A section begin (plural or the singular variant the model
  sometimes writes) opens a section; a call begin opens a call even without a section. Text
  inside a section but between calls is dropped; a section end returns to content (so text
  after the section is content too). Stray markers are dropped, never shown as content.
- In a call, text before the argument marker is the id, after it the arguments. The call ends
  at <|tool_call_end|>; any other marker (or the end of the text) cuts it short: the call is an
  error and the marker is then read as between calls.
- Id and arguments are whitespace-stripped. A well-formed id `functions.NAME:IDX` is kept (NAME
  = text up to the last colon); otherwise the name is recovered leniently (optional "functions."
  prefix, optional ":IDX" suffix) and the id is re-issued as functions.NAME:{history_calls +
  index}, continuing the conversation-wide numbering (tool_ids.py).
- A call is valid only if terminated, its name is declared (when a declared set is given) and
  its arguments are a JSON object; anything else is a ToolCallError, never a call.
- `index` counts call attempts (valid or not) in this output, from 0.
With reasoning=True the text first goes through reasoning.split_reasoning, and <think> /
</think> are markers everywhere (dropped outside calls, cutting a call short inside one).
"""

import json
import re
from collections.abc import Collection
from dataclasses import dataclass

from k2model.text import chat_tokens as tok
from k2model.text.reasoning import THINK_MARKERS, split_reasoning
from k2model.text.tool_ids import canonical_id

SECTION_BEGINS = frozenset({tok.SECTION_BEGIN, tok.SECTION_BEGIN_SINGULAR})
SECTION_ENDS = frozenset({tok.SECTION_END, tok.SECTION_END_SINGULAR})
TOOL_MARKERS = SECTION_BEGINS | SECTION_ENDS | {tok.CALL_BEGIN, tok.ARG_BEGIN, tok.CALL_END}


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
    text: str,
    *,
    reasoning: bool = False,
    declared: Collection[str] | None = None,
    history_calls: int = 0,
) -> ParsedOutput:
    reasoning_text = None
    if reasoning:
        reasoning_text, text = split_reasoning(text)
    markers = markers_for(reasoning)
    pattern = "(" + "|".join(re.escape(m) for m in sorted(markers)) + ")"
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

    for piece in re.split(pattern, text):
        is_marker = piece in markers
        if call is not None:
            if not is_marker:
                call.raw += piece
                if call.args_text is None:
                    call.id_text += piece
                else:
                    call.args_text += piece
                continue
            if piece == tok.ARG_BEGIN and call.args_text is None:
                call.raw += piece
                call.args_text = ""
                continue
            if piece == tok.CALL_END:
                call.raw += piece
                end_call(call, terminated=True)
                call, in_section = None, True
                continue
            end_call(call, terminated=False)  # any other marker cuts the call short
            call, in_section = None, True
        if piece == tok.CALL_BEGIN:
            call = _Call(len(results))
        elif piece in SECTION_BEGINS:
            in_section = True
        elif piece in SECTION_ENDS:
            in_section = False
        elif not is_marker and not in_section:
            content.append(piece)
    if call is not None:
        end_call(call, terminated=False)
    return ParsedOutput(
        content="".join(content),
        tool_calls=tuple(r for r in results if isinstance(r, ParsedToolCall)),
        errors=tuple(r for r in results if isinstance(r, ToolCallError)),
        reasoning_content=reasoning_text,
    )
