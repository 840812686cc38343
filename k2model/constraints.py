"""Constrained generation on llguidance: a ConstraintSpec (k2model/constraint_spec.py) compiled
against the model's vocabulary, followed token by token.

The grammar engine is llguidance (guidance-ai/llguidance, on PyPI); k2model/constraint_grammar.py
writes the spec as a Lark grammar over K2's marker tokens. A `ConstraintState` follows one
sequence: `allowed()` is the bool mask of the ids allowed next (the grammar's token bitmask,
unpacked, less the banned ids), `advance(token)` consumes one. A grammar with a trigger (the
tool-call section's opening token in auto mode, `</think>` for an answer after reasoning) waits
for it: until then only the banned ids are masked. The state is derived from the emitted tokens
alone, so prefill (first token) and decode (the rest, re-deriving from the first) agree without
shipping it. Once the grammar is finished (after <|im_end|>, a stop id) the state imposes
nothing. Not thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import llguidance
import tiktoken
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from k2model import constraint_grammar
from k2model.constraint_spec import ConstraintSpec, GrammarError
from k2model.text import chat_tokens as tok
from k2model.text.hf_tokenizer import HFTokenizer
from k2model.text.tokenizer import Tokenizer

_COMPILED_CACHE = 64  # compiled constraints kept per compiler
_BITS = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)


class Vocabulary:
    """The model's ids as the grammar engine sees them: llguidance's tokenizer over the same
    tiktoken ranks and special tokens, and the ids of the control tokens grammars use."""

    def __init__(
        self, encoding: tiktoken.Encoding | str, specials: dict[str, int], end: int, size: int
    ) -> None:
        """encoding: tiktoken's (ranks and special tokens) or an HF tokenizer.json text;
        specials: the control names a grammar may use -> their ids; end: the id that ends a
        turn; size: the model's vocabulary."""
        self.size = size  # masks are this long
        if isinstance(encoding, str):
            self.engine = llguidance.LLTokenizer(encoding, n_vocab=size, eos_token=end)
        else:
            n_vocab = max(size, encoding.n_vocab)
            self.engine = lltokenizer_from_encoding(encoding, n_vocab=n_vocab, eos_token=end)
        self.controls = {name: i for name, i in specials.items() if i < size}

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, model_vocab_size: int) -> Vocabulary:
        """K2's tokenizer, or an HF one (whose vocabulary may lack K2's markers: grammars that
        need them are then refused by name, while banned ids still work)."""
        wanted = (*constraint_grammar.MARKUP, tok.IM_END, tok.THINK_END)
        specials = {n: tokenizer.special_id(n) for n in wanted if tokenizer.has_special(n)}
        end = specials.get(tok.IM_END, tokenizer.eos_id)
        encoding = tokenizer.json if isinstance(tokenizer, HFTokenizer) else tokenizer.encoding
        return cls(encoding, specials, end, model_vocab_size)

    @classmethod
    def from_dir(cls, checkpoint: str | Path, model_vocab_size: int) -> Vocabulary:
        return cls.from_tokenizer(Tokenizer.from_dir(checkpoint), model_vocab_size)

    def control(self, name: str) -> int:
        if name not in self.controls:
            raise ValueError(f"the vocabulary has no {name} token: cannot constrain the output")
        return self.controls[name]


class CompiledConstraint:
    """A spec bound to a vocabulary: the allowed mask of its banned ids, and its grammar's
    compiled matcher (each sequence starts from a copy of it)."""

    def __init__(self, spec: ConstraintSpec, vocab: Vocabulary) -> None:
        self.spec, self.vocab = spec, vocab
        self.end_id: int | None = None
        self.trigger_id: int | None = None
        self._unbanned: torch.Tensor | None = None
        self._matcher: llguidance.LLMatcher | None = None
        if spec.banned_ids:
            if spec.banned_ids[-1] >= vocab.size:
                raise ValueError(f"constraint.banned_ids: ids must be < {vocab.size}")
            self._unbanned = torch.ones(vocab.size, dtype=torch.bool)
            self._unbanned[list(spec.banned_ids)] = False
        if spec.has_grammar:
            for name in (*constraint_grammar.MARKUP, tok.IM_END):
                vocab.control(name)
            self.end_id = vocab.control(tok.IM_END)
            trigger = constraint_grammar.trigger(spec)
            self.trigger_id = None if trigger is None else vocab.control(trigger)
            text = constraint_grammar.grammar(spec)
            matcher = llguidance.LLMatcher(vocab.engine, text, log_level=0)
            if matcher.is_error():
                raise GrammarError(matcher.get_error())
            self._matcher = matcher

    def start(self) -> ConstraintState:
        matcher = None if self._matcher is None else self._matcher.deep_copy()
        return ConstraintState(self, matcher, waiting=self.trigger_id is not None)

    @property
    def unbanned(self) -> torch.Tensor | None:
        """Bool [vocab]: False at the banned ids; None when nothing is banned."""
        return self._unbanned


def unpack_bitmask(words: torch.Tensor, size: int) -> torch.Tensor:
    """llguidance's int32 bitmask (bit b of word w = id 32 w + b) -> bool [size]."""
    bits = (words.to(torch.int64)[:, None] & _BITS) != 0
    return bits.flatten()[:size]


class ConstraintState:
    """One sequence's position in its constraint."""

    def __init__(
        self,
        compiled: CompiledConstraint,
        matcher: llguidance.LLMatcher | None,
        *,
        waiting: bool,
    ) -> None:
        self.compiled = compiled
        self._matcher = matcher  # None: no grammar (banned ids, or nothing)
        self._waiting = waiting  # the grammar starts after its trigger token
        self._mask: torch.Tensor | None = None  # the mask at the current position, once asked

    @property
    def end_id(self) -> int | None:
        """The id that finishes a grammar (must be a stop id of the sequence)."""
        return self.compiled.end_id

    def allowed(self) -> torch.Tensor | None:
        """Bool [vocab size]: the ids allowed next; None = anything."""
        if self._matcher is None or self._waiting:
            return self.compiled.unbanned
        if self._matcher.is_stopped():
            return None
        if self._mask is None:
            n = self.compiled.vocab.engine.vocab_size
            words = torch.zeros((n + 31) // 32, dtype=torch.int32)
            self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
            if self._matcher.is_error():
                raise GrammarError(self._matcher.get_error())
            mask = unpack_bitmask(words, self.compiled.vocab.size)
            unbanned = self.compiled.unbanned
            self._mask = mask if unbanned is None else mask & unbanned
        return self._mask

    def accepts(self, token_id: int) -> bool:
        mask = self.allowed()
        return mask is None or (0 <= token_id < mask.numel() and bool(mask[token_id]))

    def advance(self, token_id: int) -> None:
        """ValueError if the token was not allowed (the sampler never picks such a token)."""
        if not self.accepts(token_id):
            raise ValueError(f"token {token_id} violates the generation constraint")
        if self._matcher is None or self._matcher.is_stopped():
            return
        if self._waiting:
            self._waiting = token_id != self.compiled.trigger_id
            return
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
