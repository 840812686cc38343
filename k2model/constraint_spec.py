"""What a request asks of generation: banned ids, tool calls in K2's own markup, a JSON answer.

A `ConstraintSpec` travels in GenerateRequest / PrefillRequest (services/common/constraint_codec.py)
and is compiled by k2model/constraints.py. Its parts:
- banned ids: never sampled (tool_choice "none" bans the ids that open a tool-call section;
  thinking off bans the think ids);
- tools, forced (`auto_tools` false): the output is exactly one call of one of them, its
  arguments valid for that tool's schema, numbered `first_call_index`;
- tools, auto (`auto_tools` true): the model may answer in text or call; once it opens a
  tool-call section, every call names a declared tool, a `strict` tool's arguments are valid for
  its schema (other tools' arguments are free text), and `single_call` allows one call only
  (parallel_tool_calls false);
- an answer schema (response_format json_object / json_schema): the answer (the text after the
  reasoning when `answer_after_think`) is one JSON value valid for it, optionally followed by
  tool calls when tools are declared in auto mode.
"""

from __future__ import annotations

from dataclasses import dataclass


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile (the message says why)."""


@dataclass(frozen=True)
class ToolSchema:
    name: str
    parameters_json: str = ""  # the arguments' JSON schema; "" = any JSON object
    strict: bool = False  # auto mode: arguments follow the schema (forced calls always do)


@dataclass(frozen=True)
class ConstraintSpec:
    banned_ids: tuple[int, ...] = ()
    tools: tuple[ToolSchema, ...] = ()
    auto_tools: bool = False  # False: tools force one call; True: the model may call them
    single_call: bool = False  # auto mode: at most one call
    first_call_index: int = 0
    answer_schema: str | None = None  # JSON schema text the answer must satisfy
    answer_after_think: bool = False  # the answer follows </think>

    def __post_init__(self) -> None:
        if any(i < 0 for i in self.banned_ids):
            raise ValueError("constraint.banned_ids must be non-negative")
        object.__setattr__(self, "banned_ids", tuple(sorted(set(self.banned_ids))))
        if self.first_call_index < 0:
            raise ValueError("constraint.first_call_index must be >= 0")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("constraint.tools: names must be unique")
        for t in self.tools:
            if not t.name or any(c.isspace() or c in "<:" for c in t.name):
                raise ValueError(f"constraint.tools: bad tool name {t.name!r}")
        if self.forces_call and self.answer_schema is not None:
            raise ValueError("constraint: a forced tool call and an answer schema are exclusive")
        if (self.auto_tools or self.single_call) and not self.tools:
            raise ValueError("constraint.auto_tools / single_call need tools")
        if self.answer_after_think and self.answer_schema is None:
            raise ValueError("constraint.answer_after_think needs an answer schema")

    @property
    def forces_call(self) -> bool:
        return bool(self.tools) and not self.auto_tools

    @property
    def has_grammar(self) -> bool:
        return bool(self.tools) or self.answer_schema is not None

    @property
    def is_empty(self) -> bool:
        return not self.banned_ids and not self.has_grammar
