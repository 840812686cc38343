"""A ConstraintSpec as a Lark grammar for llguidance, over K2's own marker tokens.

Markers are special tokens (`<|tool_call_begin|>` in a rule matches that token, never its text);
arguments and answers are `%json` of their JSON Schema (full draft 2020-12 as llguidance documents
it: `$ref`, `anyOf`/`oneOf`/`allOf`, `pattern`, `additionalProperties`, strings of any length).

Where each grammar starts (k2model/constraints.py feeds it the tokens from there on):
- a forced call: from the first token,
      <|tool_calls_section_begin|> <|tool_call_begin|> functions.NAME:IDX
      <|tool_call_argument_begin|> {arguments} <|tool_call_end|> <|tool_calls_section_end|> <|im_end|>
  with IDX = first_call_index;
- auto-mode tools without an answer schema: after the model opens a tool-call section (the text
  before it is free), `call+ <|tool_calls_section_end|> <|im_end|>`; IDX is any number there,
  and a non-strict tool's arguments are any JSON object;
- an answer schema: from the first token, or after `</think>` (`answer_after_think`):
  `answer <|im_end|>`, or with auto-mode tools `(answer | section | answer section) <|im_end|>`.
Layout: json.dumps's (", " and ": ", no other whitespace: no run of blanks can fill the budget),
and every object schema that declares `properties` and not `additionalProperties` is closed to
them, as xgrammar's strict mode and OpenAI's strict tools do.
"""

from __future__ import annotations

import json

import llguidance

from k2model.constraint_spec import ConstraintSpec, GrammarError, ToolSchema
from k2model.text import chat_tokens as tok

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A non-strict tool's arguments in a grammar: well-formed JSON, any object (K2 writes JSON; its
# schema is not enforced).
_ANY_OBJECT = {"type": "object", "x-guidance": JSON_LAYOUT}
MARKUP = (tok.SECTION_BEGIN, tok.CALL_BEGIN, tok.ARG_BEGIN, tok.CALL_END, tok.SECTION_END)


def grammar(spec: ConstraintSpec) -> str:
    """The Lark grammar of `spec` (which must have one: spec.has_grammar)."""
    if spec.forces_call:
        rules = _calls(spec.tools, json.dumps(str(spec.first_call_index)), forced=True)
        one = " | ".join(f"call_{k}" for k in range(len(spec.tools)))
        return f"start: {tok.SECTION_BEGIN} ({one}) {tok.SECTION_END} {tok.IM_END}\n" + rules
    rules = ""
    if spec.tools:
        rules += _calls(spec.tools, "IDX", forced=False) + "IDX: /[0-9]{1,6}/\n"
        rules += f"calls: {'call' if spec.single_call else 'call+'}\n"
        rules += "call: " + " | ".join(f"call_{k}" for k in range(len(spec.tools))) + "\n"
    if spec.answer_schema is None:
        return f"start: calls {tok.SECTION_END} {tok.IM_END}\n" + rules
    rules += f"answer: %json {json.dumps(_layout(_parse(spec.answer_schema, 'the answer')))}\n"
    if not spec.tools:
        return f"start: answer {tok.IM_END}\n" + rules
    section = f"{tok.SECTION_BEGIN} calls {tok.SECTION_END}"
    body = f"answer | {section} | answer {section}"
    return f"start: ({body}) {tok.IM_END}\n" + rules


def trigger(spec: ConstraintSpec) -> str | None:
    """The token after which the grammar starts (None: from the first token)."""
    if spec.forces_call:
        return None
    if spec.answer_schema is None:
        return tok.SECTION_BEGIN
    return tok.THINK_END if spec.answer_after_think else None


def check(spec: ConstraintSpec) -> None:
    """GrammarError when the engine cannot compile `spec`."""
    error = llguidance.LLMatcher.validate_grammar(grammar(spec))
    if error:
        raise GrammarError(error)


def _calls(tools: tuple[ToolSchema, ...], index: str, *, forced: bool) -> str:
    rules = []
    for k, t in enumerate(tools):
        name = json.dumps(f"functions.{t.name}:")
        rules.append(
            f"call_{k}: {tok.CALL_BEGIN} {name} {index} {tok.ARG_BEGIN} args_{k} {tok.CALL_END}\n"
        )
        schema = _layout(_arguments(t)) if forced or t.strict else _ANY_OBJECT
        rules.append(f"args_{k}: %json {json.dumps(schema)}\n")
    return "".join(rules)


def _arguments(tool: ToolSchema) -> dict:
    if not tool.parameters_json:
        return {"type": "object"}
    return _parse(tool.parameters_json, f"tool {tool.name!r}: parameters")


def _parse(text: str, what: str) -> dict:
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise GrammarError(f"{what} are not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON Schema object")
    return schema


def _layout(schema: dict) -> dict:
    return {**_closed(schema), "x-guidance": JSON_LAYOUT}


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def _closed(schema: dict) -> dict:
    """`schema` with every object schema that declares `properties` and not
    `additionalProperties` closed, walking subschema positions only (a property named
    "properties", or a `const` / `enum` / `default` value, is data, never rewritten)."""
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) if isinstance(s, dict) else s for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {n: _closed(s) if isinstance(s, dict) else s for n, s in out[key].items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
