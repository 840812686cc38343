"""tool_choice, honoured: what a request's tools and tool_choice mean for generation and parsing.

- "auto": the model decides; its calls are parsed (names checked against the declared tools).
- "none": the tools are still rendered, but the ids that open a tool-call section are banned at
  sampling, so the model cannot call; nothing is parsed as a call.
- "required" / a tool's name: the output is forced, token by token, to be one call of one of the
  declared tools (of that tool) with arguments valid for its JSON schema, in K2's own markup
  (k2model/constraints.py); the ordinary parser then yields the call. The call's index continues
  the conversation's numbering (text/tool_ids.py). Exactly one call is forced, whatever
  parallel_tool_calls says.
A tool_choice that names no declared tool, or a forced choice without tools, is InvalidArgument.
Schemas are checked here once (the grammar engine validates them), so a schema it cannot compile
fails before any backend call.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from k2model.constraints import ConstraintSpec, GrammarError, ToolSchema, check_arguments_schema
from k2model.text import chat_tokens as tok
from k2model.text.tokenizer import Tokenizer
from k2model.text.tool_ids import count_tool_calls
from services.chat.types import ChatRequest
from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class ToolPlan:
    parse_tool_calls: bool
    tool_names: tuple[str, ...]  # the declared set the parser checks calls against
    forced: tuple[ToolSchema, ...] = ()  # non-empty: the output is one call of one of these
    first_call_index: int = 0
    banned_ids: tuple[int, ...] = ()

    def constraint(self, extra_banned: Sequence[int] = ()) -> ConstraintSpec | None:
        """The decode-side constraint; `extra_banned` is ignored when a call is forced (the
        grammar already decides every token)."""
        if self.forced:
            return ConstraintSpec(tools=self.forced, first_call_index=self.first_call_index)
        banned = (*self.banned_ids, *extra_banned)
        return ConstraintSpec(banned_ids=banned) if banned else None


def plan_tools(request: ChatRequest, tokenizer: Tokenizer) -> ToolPlan:
    names = tuple(t.name for t in request.tools)
    choice = request.tool_choice
    if not request.tools:
        if choice not in ("auto", "none"):
            raise InvalidArgument(f"tool_choice: {choice!r} needs tools, and none are declared")
        return ToolPlan(parse_tool_calls=False, tool_names=())
    if choice == "auto":
        return ToolPlan(parse_tool_calls=True, tool_names=names)
    if choice == "none":
        banned = tuple(tokenizer.special_id(name) for name in (tok.SECTION_BEGIN, tok.CALL_BEGIN))
        return ToolPlan(parse_tool_calls=False, tool_names=(), banned_ids=banned)
    if choice != "required" and choice not in names:
        raise InvalidArgument(f"tool_choice: {choice!r} is not a declared tool")
    forced = tuple(
        _schema(t.name, t.parameters) for t in request.tools if choice in ("required", t.name)
    )
    return ToolPlan(
        parse_tool_calls=True,
        tool_names=names,
        forced=forced,
        first_call_index=count_tool_calls(request.messages),
    )


def _schema(name: str, parameters: dict | None) -> ToolSchema:
    text = "" if parameters is None else json.dumps(parameters, ensure_ascii=False)
    try:
        check_arguments_schema(name, parameters)
    except GrammarError as e:
        raise InvalidArgument(f"tools[{name}].parameters: {e}") from None
    return ToolSchema(name, text)
