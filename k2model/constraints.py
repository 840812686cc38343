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

Mechanics: the call is one NFA over bytes plus control symbols (byte_nfa.py), determinised
lazily. A `ConstraintState` follows one sequence: `allowed()` is the mask of token ids whose
bytes (or control symbol) keep the automaton alive, found by walking the vocabulary's sorted
pieces with shared prefixes and pruning at the first dead byte; `advance(token)` steps it. Only
the grammar's own control ids are ever allowed; the state is derived from the emitted tokens
alone, so prefill (first token) and decode (the rest, re-deriving from the first) agree without
shipping it. Because every live automaton state can still reach the end and every single byte
is a token, a non-finished state always allows some token: no dead ends. Once the grammar is
finished (after <|im_end|>, a stop id) the state imposes nothing.

Cost: one vocabulary walk per new automaton state, memoised per compiled constraint (a few ms
for the embedded vocabulary; proportionally more for K2's 163k pieces). Not thread-safe.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch

from k2model.byte_nfa import DEAD, GrammarError, LazyDfa, Nfa
from k2model.json_schema_grammar import SchemaGrammar
from k2model.text import chat_tokens as tok
from k2model.text.tokenizer import Tokenizer

CONTROL_BASE = 256  # control token id t is the grammar symbol CONTROL_BASE + t
_CALL_MARKUP = (tok.SECTION_BEGIN, tok.CALL_BEGIN, tok.ARG_BEGIN, tok.CALL_END, tok.SECTION_END)
_MASK_CACHE = 4096  # masks kept per compiled constraint
_COMPILED_CACHE = 64  # compiled constraints kept per compiler


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
    """The model's ids as grammar input: byte pieces of ordinary ids (sorted, with the length of
    each one's common prefix with the previous) and the ids of named control tokens."""

    def __init__(self, pieces: dict[int, bytes], controls: dict[str, int], size: int) -> None:
        self.size = size
        self.controls = {name: i for name, i in controls.items() if i < size}
        self.control_ids = frozenset(self.controls.values())
        self.by_id = pieces
        order = sorted(pieces.items(), key=lambda item: item[1])
        self.ids = [i for i, _ in order]
        self.pieces = [p for _, p in order]
        self.lcp = [0] + [_common_prefix(a, b) for a, b in pairwise(self.pieces)]

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, model_vocab_size: int) -> Vocabulary:
        n_base = min(tokenizer.n_base, model_vocab_size)
        pieces = {i: tokenizer.id_to_piece(i) for i in range(n_base)}
        controls = {}
        for name in (*_CALL_MARKUP, tok.IM_END):
            try:
                controls[name] = tokenizer.special_id(name)
            except ValueError:
                continue
        return cls(pieces, controls, model_vocab_size)

    @classmethod
    def from_dir(cls, checkpoint: str | Path, model_vocab_size: int) -> Vocabulary:
        return cls.from_tokenizer(Tokenizer.from_dir(checkpoint), model_vocab_size)

    def control(self, name: str) -> int:
        if name not in self.controls:
            raise ValueError(f"the vocabulary has no {name} token: cannot force a tool call")
        return self.controls[name]


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class CompiledConstraint:
    """A spec bound to a vocabulary: the automaton (if a call is forced) and memoised masks."""

    def __init__(self, spec: ConstraintSpec, vocab: Vocabulary) -> None:
        self.spec, self.vocab = spec, vocab
        self.end_id: int | None = None
        self._dfa: LazyDfa | None = None
        self._controls: list[int] = []
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._banned: torch.Tensor | None = None
        if spec.banned_ids:
            if spec.banned_ids[-1] >= vocab.size:
                raise ValueError(f"constraint.banned_ids: ids must be < {vocab.size}")
            self._banned = torch.ones(vocab.size, dtype=torch.bool)
            self._banned[list(spec.banned_ids)] = False
        if spec.tools:
            self._build_call_grammar()

    def _build_call_grammar(self) -> None:
        vocab, spec = self.vocab, self.spec
        ids = {name: vocab.control(name) for name in (*_CALL_MARKUP, tok.IM_END)}
        self.end_id = ids[tok.IM_END]
        self._controls = sorted(ids.values())
        nfa = Nfa()
        schemas = SchemaGrammar(nfa)

        def control(name: str) -> tuple[int, int]:
            return nfa.literal([CONTROL_BASE + ids[name]])

        calls = []
        for t in spec.tools:
            head = f"functions.{t.name}:{spec.first_call_index}".encode()
            args = schemas.arguments(_schema(t))
            calls.append(nfa.seq([nfa.literal(head), control(tok.ARG_BEGIN), args]))
        frag = nfa.seq(
            [
                control(tok.SECTION_BEGIN),
                control(tok.CALL_BEGIN),
                nfa.alt(calls),
                control(tok.CALL_END),
                control(tok.SECTION_END),
                control(tok.IM_END),
            ]
        )
        self._dfa = LazyDfa(nfa, frag)

    def start(self) -> ConstraintState:
        return ConstraintState(self, self._dfa.start if self._dfa is not None else 0)

    @property
    def has_grammar(self) -> bool:
        return self._dfa is not None

    def mask(self, state: int) -> torch.Tensor | None:
        """Bool [vocab.size]: the ids allowed in automaton state `state`; None = anything."""
        if self._dfa is None:
            return self._banned
        if self._dfa.finished(state):
            return None
        mask = self._masks.get(state)
        if mask is None:
            mask = torch.zeros(self.vocab.size, dtype=torch.bool)
            mask[self._allowed_ids(state)] = True
            self._masks[state] = mask
            if len(self._masks) > _MASK_CACHE:
                self._masks.popitem(last=False)
        return mask

    def _allowed_ids(self, state: int) -> list[int]:
        dfa, vocab = self._dfa, self.vocab
        assert dfa is not None
        allowed = [t for t in self._controls if dfa.step(state, CONTROL_BASE + t) != DEAD]
        pieces, lcp, n = vocab.pieces, vocab.lcp, len(vocab.pieces)
        path = [state]  # path[k]: the state after the first k bytes of the current piece
        i = 0
        while i < n:
            piece = pieces[i]
            del path[lcp[i] + 1 :]
            while len(path) <= len(piece) and path[-1] != DEAD:
                path.append(dfa.step(path[-1], piece[len(path) - 1]))
            if path[-1] != DEAD:
                allowed.append(vocab.ids[i])
                i += 1
                continue
            dead_at = len(path) - 1  # pieces sharing these bytes die at the same byte
            i += 1
            while i < n and lcp[i] >= dead_at:
                i += 1
        return allowed

    def step(self, state: int, token_id: int) -> int:
        assert self._dfa is not None
        if token_id in self.vocab.control_ids:
            return self._dfa.step(state, CONTROL_BASE + token_id)
        piece = self.vocab.by_id.get(token_id)
        return DEAD if piece is None else self._dfa.walk(state, piece)


def _schema(tool: ToolSchema) -> dict | None:
    if not tool.parameters_json:
        return None
    try:
        schema = json.loads(tool.parameters_json)
    except ValueError as e:
        raise GrammarError(f"tool {tool.name!r}: parameters are not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"tool {tool.name!r}: parameters must be a JSON object schema")
    return schema


class ConstraintState:
    """One sequence's position in its constraint."""

    def __init__(self, compiled: CompiledConstraint, state: int) -> None:
        self.compiled = compiled
        self._state = state  # the automaton state (unused without a grammar)

    @property
    def end_id(self) -> int | None:
        """The id that finishes a forced call (must be a stop id of the sequence)."""
        return self.compiled.end_id

    def allowed(self) -> torch.Tensor | None:
        return self.compiled.mask(self._state)

    def accepts(self, token_id: int) -> bool:
        mask = self.allowed()
        return mask is None or (0 <= token_id < mask.numel() and bool(mask[token_id]))

    def advance(self, token_id: int) -> None:
        """ValueError if the token was not allowed (the sampler never picks such a token)."""
        if not self.accepts(token_id):
            raise ValueError(f"token {token_id} violates the generation constraint")
        if self.compiled.has_grammar and self.allowed() is not None:
            self._state = self.compiled.step(self._state, token_id)


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
