"""What a request's tools, tool_choice and response_format mean for generation and parsing.

- tool_choice "auto": the model decides; its calls are parsed (names checked against the declared
  tools). When a tool is `strict`, parallel_tool_calls is false, or a response_format asks for
  JSON, the calls the model starts are constrained (k2model/constraint_grammar.py): once it opens
  a tool-call section, every call names a declared tool, a strict tool's arguments are valid for
  its schema, and parallel_tool_calls false allows one call. The markers stay K2's own.
- "none": the tools are still rendered, but the ids that open a tool-call section are banned at
  sampling, so the model cannot call; nothing is parsed as a call.
- "required" / a tool's name: the output is forced, token by token, to be one call of one of the
  declared tools (of that tool) with arguments valid for its JSON schema, in K2's own markup; the
  ordinary parser then yields the call. The call's index continues the conversation's numbering
  (text/tool_ids.py). Exactly one call is forced, whatever parallel_tool_calls says, and a
  response_format is moot (the output is the call).
- response_format json_object / json_schema: the answer is one JSON value (an object, or valid
  for the schema, objects closed to their declared properties as OpenAI's strict mode does); on a
  thinking turn it starts after `</think>`, the reasoning is free. With tools in auto mode the
  model may call instead of (or after) answering.
A tool_choice that names no declared tool, or a forced choice without tools, is InvalidArgument.
Schemas are checked here once (the grammar engine validates them), so a schema it cannot compile
fails before any backend call, naming its field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from k2model.constraint_grammar import check
from k2model.constraint_spec import ConstraintSpec, GrammarError, ToolSchema
from k2model.text import chat_tokens as tok
from k2model.text.tokenizer import Tokenizer
from k2model.text.tool_ids import count_tool_calls
from services.chat.types import ChatRequest, ResponseFormat
from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class ToolPlan:
    parse_tool_calls: bool
    tool_names: tuple[str, ...]  # the declared set the parser checks calls against
    tools: tuple[ToolSchema, ...] = ()  # what a tool grammar would hold
    forced: bool = False  # the output is one call of one of `tools`
    single_call: bool = False  # auto mode: parallel_tool_calls false
    first_call_index: int = 0
    banned_ids: tuple[int, ...] = ()

    def constraint(
        self, extra_banned: Sequence[int] = (), answer: str | None = None, after_think: bool = False
    ) -> ConstraintSpec | None:
        """The decode-side constraint. `answer`: the answer's JSON Schema text (response_format),
        `after_think`: it follows the reasoning. A forced call ignores both and `extra_banned`
        (the grammar decides every token)."""
        if self.forced:
            return ConstraintSpec(tools=self.tools, first_call_index=self.first_call_index)
        banned = (*self.banned_ids, *extra_banned)
        tools = self.tools
        if answer is None and not self.single_call and not any(t.strict for t in tools):
            tools = ()  # free calls, parsed as they come: no grammar needed
        if not tools and answer is None:
            return ConstraintSpec(banned_ids=banned) if banned else None
        return ConstraintSpec(
            banned_ids=banned,
            tools=tools,
            auto_tools=bool(tools),
            single_call=self.single_call and bool(tools),
            answer_schema=answer,
            answer_after_think=after_think and answer is not None,
        )


def plan_tools(request: ChatRequest, tokenizer: Tokenizer) -> ToolPlan:
    names = tuple(t.name for t in request.tools)
    choice = request.tool_choice
    if not request.tools:
        if choice not in ("auto", "none"):
            raise InvalidArgument(f"tool_choice: {choice!r} needs tools, and none are declared")
        return ToolPlan(parse_tool_calls=False, tool_names=())
    if choice == "auto":
        tools = tuple(
            _schema(t.name, t.parameters, t.name in request.strict_tools) for t in request.tools
        )
        single = not request.parallel_tool_calls
        return ToolPlan(parse_tool_calls=True, tool_names=names, tools=tools, single_call=single)
    if choice == "none":
        opening = (tok.SECTION_BEGIN, tok.CALL_BEGIN)  # a non-K2 vocabulary may have neither
        banned = tuple(tokenizer.special_id(n) for n in opening if tokenizer.has_special(n))
        return ToolPlan(parse_tool_calls=False, tool_names=(), banned_ids=banned)
    if choice != "required" and choice not in names:
        raise InvalidArgument(f"tool_choice: {choice!r} is not a declared tool")
    forced = tuple(
        _schema(t.name, t.parameters, True) for t in request.tools if choice in ("required", t.name)
    )
    return ToolPlan(
        parse_tool_calls=True,
        tool_names=names,
        tools=forced,
        forced=True,
        first_call_index=count_tool_calls(request.messages),
    )


def answer_schema(response_format: ResponseFormat | None) -> str | None:
    """The answer's JSON Schema text, checked (None: a text answer)."""
    if response_format is None:
        return None
    schema = response_format.schema if response_format.schema is not None else {"type": "object"}
    text = json.dumps(schema, ensure_ascii=False)
    try:
        check(ConstraintSpec(answer_schema=text))
    except GrammarError as e:
        raise InvalidArgument(f"response_format.json_schema.schema: {e}") from None
    return text


def _schema(name: str, parameters: dict | None, strict: bool) -> ToolSchema:
    text = "" if parameters is None else json.dumps(parameters, ensure_ascii=False)
    schema = ToolSchema(name, text, strict)
    if strict:
        try:
            check(ConstraintSpec(tools=(schema,)))
        except GrammarError as e:
            raise InvalidArgument(f"tools[{name}].parameters: {e}") from None
    return schema
