"""Token-level constraints on generation: banned ids, and a forced tool call in K2's own markup.

A `ConstraintSpec` is what a request asks for (it travels in GenerateRequest / PrefillRequest):
- banned ids: never sampled (tool_choice "none" bans the tool-call section's opening ids);
- tools: the output must be exactly one call of one of them, in the model's own markup, so the
  ordinary tool-call parser yields it:
      <|tool_calls_section_begin|> <|tool_call_begin|> functions.NAME:IDX
      <|tool_call_argument_begin|> {JSON arguments valid for NAME's schema}
      <|tool_call_end|> <|tool_calls_section_end|> <|im_end|>
  with IDX = first_call_index (the conversation's running call count, text/tool_ids.py).
The two are exclusive: a forced call's grammar already decides every token.

Mechanics: the grammar engine is llguidance (guidance-ai/llguidance, on PyPI): the call is a Lark
grammar whose markers are K2's special tokens (`<|tool_call_begin|>` as a token, never as text)
and whose arguments are `%json` of the tool's JSON Schema (full draft 2020-12 as llguidance
documents it: `$ref`, `anyOf`/`oneOf`/`allOf`, `pattern`, `additionalProperties`, strings of any
length). A `ConstraintState` follows one sequence with its own matcher: `allowed()` is the bool
mask of the ids the grammar accepts next (llguidance's token bitmask, unpacked), `advance(token)`
consumes one. The state is derived from the emitted tokens alone, so prefill (first token) and
decode (the rest, re-deriving from the first) agree without shipping it. Once the grammar is
finished (after <|im_end|>, a stop id) the state imposes nothing. Not thread-safe.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import llguidance
import tiktoken
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from k2model.text import chat_tokens as tok
from k2model.text.tokenizer import Tokenizer

_CALL_MARKUP = (tok.SECTION_BEGIN, tok.CALL_BEGIN, tok.ARG_BEGIN, tok.CALL_END, tok.SECTION_END)
_COMPILED_CACHE = 64  # compiled constraints kept per compiler
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BITS = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile (the message says why)."""


@dataclass(frozen=True)
class ToolSchema:
    name: str
    parameters_json: str = ""  # the arguments' JSON schema; "" = any JSON object


@dataclass(frozen=True)
class ConstraintSpec:
    banned_ids: tuple[int, ...] = ()
    tools: tuple[ToolSchema, ...] = ()  # non-empty: force one call of one of these
    first_call_index: int = 0

    def __post_init__(self) -> None:
        if any(i < 0 for i in self.banned_ids):
            raise ValueError("constraint.banned_ids must be non-negative")
        object.__setattr__(self, "banned_ids", tuple(sorted(set(self.banned_ids))))
        if self.banned_ids and self.tools:
            raise ValueError("constraint: banned_ids and a forced tool call are exclusive")
        if self.first_call_index < 0:
            raise ValueError("constraint.first_call_index must be >= 0")
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("constraint.tools: names must be unique")
        for t in self.tools:
            if not t.name or any(c.isspace() or c in "<:" for c in t.name):
                raise ValueError(f"constraint.tools: bad tool name {t.name!r}")

    @property
    def is_empty(self) -> bool:
        return not self.banned_ids and not self.tools


class Vocabulary:
    """The model's ids as the grammar engine sees them: llguidance's tokenizer over the same
    tiktoken ranks and special tokens, and the ids of the control tokens a forced call uses."""

    def __init__(
        self, encoding: tiktoken.Encoding, specials: dict[str, int], end_name: str, size: int
    ) -> None:
        """encoding: ranks and special tokens; specials: the control names a grammar may use
        -> their ids; end_name: the special that ends a turn; size: the model's vocabulary."""
        self.size = size  # masks are this long
        self.engine = lltokenizer_from_encoding(
            encoding, n_vocab=max(size, encoding.n_vocab), eos_token=specials[end_name]
        )
        self.controls = {name: i for name, i in specials.items() if i < size}

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, model_vocab_size: int) -> Vocabulary:
        names = [n for n in (*_CALL_MARKUP, tok.IM_END) if tokenizer.has_special(n)]
        specials = {n: tokenizer.special_id(n) for n in names}
        return cls(tokenizer.encoding, specials, tok.IM_END, model_vocab_size)

    @classmethod
    def from_dir(cls, checkpoint: str | Path, model_vocab_size: int) -> Vocabulary:
        return cls.from_tokenizer(Tokenizer.from_dir(checkpoint), model_vocab_size)

    def control(self, name: str) -> int:
        if name not in self.controls:
            raise ValueError(f"the vocabulary has no {name} token: cannot force a tool call")
        return self.controls[name]


def call_grammar(spec: ConstraintSpec) -> str:
    """The Lark grammar of one forced call of one of `spec.tools` (validated by the engine)."""
    calls = []
    for k, t in enumerate(spec.tools):
        head = json.dumps(f"functions.{t.name}:{spec.first_call_index}")
        calls.append(
            f"call_{k}: {tok.CALL_BEGIN} {head} {tok.ARG_BEGIN} args_{k} {tok.CALL_END}\n"
            f"args_{k}: %json {json.dumps(_schema(t))}\n"
        )
    alternatives = " | ".join(f"call_{k}" for k in range(len(spec.tools)))
    start = f"start: {tok.SECTION_BEGIN} ({alternatives}) {tok.SECTION_END} {tok.IM_END}\n"
    return start + "".join(calls)


def check_arguments_schema(name: str, parameters: dict | None) -> None:
    """GrammarError when the engine cannot compile `parameters` as a tool's arguments."""
    grammar = call_grammar(ConstraintSpec(tools=(ToolSchema(name, _dumps(parameters)),)))
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error)


class CompiledConstraint:
    """A spec bound to a vocabulary: the banned mask, or the call grammar's compiled matcher
    (each sequence starts from a copy of it)."""

    def __init__(self, spec: ConstraintSpec, vocab: Vocabulary) -> None:
        self.spec, self.vocab = spec, vocab
        self.end_id: int | None = None
        self._banned: torch.Tensor | None = None
        self._matcher: llguidance.LLMatcher | None = None
        if spec.banned_ids:
            if spec.banned_ids[-1] >= vocab.size:
                raise ValueError(f"constraint.banned_ids: ids must be < {vocab.size}")
            self._banned = torch.ones(vocab.size, dtype=torch.bool)
            self._banned[list(spec.banned_ids)] = False
        if spec.tools:
            for name in (*_CALL_MARKUP, tok.IM_END):
                vocab.control(name)
            self.end_id = vocab.control(tok.IM_END)
            matcher = llguidance.LLMatcher(vocab.engine, call_grammar(spec), log_level=0)
            if matcher.is_error():
                raise GrammarError(matcher.get_error())
            self._matcher = matcher

    def start(self) -> ConstraintState:
        return ConstraintState(self, None if self._matcher is None else self._matcher.deep_copy())

    @property
    def banned(self) -> torch.Tensor | None:
        return self._banned


def _dumps(parameters: dict | None) -> str:
    return "" if parameters is None else json.dumps(parameters, ensure_ascii=False)


def _schema(tool: ToolSchema) -> dict:
    """The tool's schema as the grammar compiles it: json.dumps's layout (", " and ": ", no
    other whitespace, so no run of blanks can fill the budget), and every object with declared
    `properties` that does not say `additionalProperties` closed to them, as xgrammar's strict
    mode and OpenAI's strict tools do: a forced call spells the declared arguments only."""
    return {**_closed(_user_schema(tool)), "x-guidance": JSON_LAYOUT}


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


def _user_schema(tool: ToolSchema) -> dict:
    if not tool.parameters_json:
        return {"type": "object"}
    try:
        schema = json.loads(tool.parameters_json)
    except ValueError as e:
        raise GrammarError(f"tool {tool.name!r}: parameters are not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"tool {tool.name!r}: parameters must be a JSON object schema")
    return schema


def unpack_bitmask(words: torch.Tensor, size: int) -> torch.Tensor:
    """llguidance's int32 bitmask (bit b of word w = id 32 w + b) -> bool [size]."""
    bits = (words.to(torch.int64)[:, None] & _BITS) != 0
    return bits.flatten()[:size]


class ConstraintState:
    """One sequence's position in its constraint."""

    def __init__(self, compiled: CompiledConstraint, matcher: llguidance.LLMatcher | None) -> None:
        self.compiled = compiled
        self._matcher = matcher  # None: no grammar (banned ids, or nothing)
        self._mask: torch.Tensor | None = None  # the mask at the current position, once asked

    @property
    def end_id(self) -> int | None:
        """The id that finishes a forced call (must be a stop id of the sequence)."""
        return self.compiled.end_id

    def allowed(self) -> torch.Tensor | None:
        """Bool [vocab size]: the ids allowed next; None = anything."""
        if self._matcher is None:
            return self.compiled.banned
        if self._matcher.is_stopped():
            return None
        if self._mask is None:
            n = self.compiled.vocab.engine.vocab_size
            words = torch.zeros((n + 31) // 32, dtype=torch.int32)
            self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
            if self._matcher.is_error():
                raise GrammarError(self._matcher.get_error())
            self._mask = unpack_bitmask(words, self.compiled.vocab.size)
        return self._mask

    def accepts(self, token_id: int) -> bool:
        mask = self.allowed()
        return mask is None or (0 <= token_id < mask.numel() and bool(mask[token_id]))

    def advance(self, token_id: int) -> None:
        """ValueError if the token was not allowed (the sampler never picks such a token)."""
        if not self.accepts(token_id):
            raise ValueError(f"token {token_id} violates the generation constraint")
        if self._matcher is not None and not self._matcher.is_stopped():
            if not self._matcher.consume_token(token_id):
                raise ValueError(f"token {token_id} violates the generation constraint")
            self._mask = None


class ConstraintCompiler:
    """Compiles specs against one vocabulary, reusing recent compilations (n choices of one
    request, and repeated tool sets, share one automaton and its masks)."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self._cache: OrderedDict[ConstraintSpec, CompiledConstraint] = OrderedDict()

    def start(self, spec: ConstraintSpec) -> ConstraintState:
        """ValueError (GrammarError) for a spec this vocabulary cannot honour."""
        compiled = self._cache.get(spec)
        if compiled is None:
            compiled = CompiledConstraint(spec, self.vocab)
            self._cache[spec] = compiled
            if len(self._cache) > _COMPILED_CACHE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec)
        return compiled.start()
