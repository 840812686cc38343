"""Constrained generation (k2model/constraints.py, json_schema_grammar.py, byte_nfa.py) on the
embedded vocabulary: forced calls always parse to a valid call with schema-valid arguments, the
masks never lead to a dead end and equal a brute-force check, and the sampler honours masks
while leaving unconstrained rows exactly as they were."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model import EMBEDDED_CHECKPOINT
from k2model.byte_nfa import DEAD, GrammarError, LazyDfa, Nfa
from k2model.constraints import (
    CONTROL_BASE,
    CompiledConstraint,
    ConstraintCompiler,
    ConstraintSpec,
    ToolSchema,
    Vocabulary,
)
from k2model.json_schema_grammar import SchemaGrammar
from k2model.sampling import sample
from k2model.sampling_params import SamplingParams, SamplingRow
from k2model.text import chat_tokens as tok
from k2model.text.pieces import decode_pieces
from k2model.text.tokenizer import Tokenizer
from k2model.text.tool_parser import markers_for, parse_output

MODEL_VOCAB = 4096
MAX_CALL_TOKENS = 2000  # a bound no walk comes near: the grammar's language is finite

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "offset": {"type": "integer", "minimum": -120, "exclusiveMaximum": 45},
        "temp": {"type": "number", "minimum": -40.5, "maximum": 60},
        "exact": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
            "required": ["lat"],
        },
        "kind": {"anyOf": [{"const": "a"}, {"type": "integer", "minimum": 1000}]},
    },
    "required": ["city", "days", "where"],
}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED_CHECKPOINT)


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> ConstraintCompiler:
    return ConstraintCompiler(Vocabulary.from_tokenizer(tokenizer, MODEL_VOCAB))


def forced(*tools: tuple[str, dict | None], index: int = 0) -> ConstraintSpec:
    schemas = tuple(ToolSchema(n, json.dumps(s) if s is not None else "") for n, s in tools)
    return ConstraintSpec(tools=schemas, first_call_index=index)


def random_walk(compiler: ConstraintCompiler, spec: ConstraintSpec, seed: int) -> list[int]:
    """Uniform choices among allowed ids until the constraint is finished; asserts that every
    unfinished state allows something (no dead end)."""
    rng = random.Random(seed)
    state = compiler.start(spec)
    out: list[int] = []
    while (mask := state.allowed()) is not None:
        allowed = mask.nonzero().flatten().tolist()
        assert allowed, f"dead end after {out}"
        token = rng.choice(allowed)
        state.advance(token)
        out.append(token)
        assert len(out) < MAX_CALL_TOKENS
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_forced_call_always_parses_to_a_schema_valid_call(compiler, tokenizer, seed) -> None:
    spec = forced(("get_weather", WEATHER), ("search", SEARCH), ("ping", None), index=3)
    ids = random_walk(compiler, spec, seed)
    assert ids[-1] == tokenizer.special_id(tok.IM_END)
    parsed = parse_output(
        decode_pieces(tokenizer, ids, markers_for(False)),
        declared={"get_weather", "search", "ping"},
    )
    assert parsed.errors == () and parsed.content == ""
    [call] = parsed.tool_calls
    assert call.id == f"functions.{call.name}:3"
    arguments = json.loads(call.arguments)
    schema = {"get_weather": WEATHER, "search": SEARCH, "ping": {"type": "object"}}[call.name]
    jsonschema.validate(arguments, schema)
    assert parsed.finish_reason == "tool_calls"


def test_named_tool_is_the_only_one_called(compiler, tokenizer) -> None:
    spec = forced(("search", SEARCH))
    for seed in range(5):
        pieces = decode_pieces(tokenizer, random_walk(compiler, spec, seed), markers_for(False))
        [call] = parse_output(pieces, declared={"search"}).tool_calls
        assert call.name == "search" and isinstance(json.loads(call.arguments)["query"], str)


def test_masks_equal_a_brute_force_check_of_every_token(compiler, tokenizer) -> None:
    """The trie walk with pruning allows exactly the ids whose whole piece keeps the automaton
    alive (checked token by token, without the walk), plus the grammar's own control ids."""
    spec = forced(("get_weather", WEATHER))
    state = compiler.start(spec)
    compiled: CompiledConstraint = state.compiled
    rng = random.Random(7)
    dfa_state = state._state
    for _ in range(25):
        mask = compiled.mask(dfa_state)
        assert mask is not None
        brute = set()
        for token in range(MODEL_VOCAB):
            if compiled.step(dfa_state, token) != DEAD:
                brute.add(token)
        assert set(mask.nonzero().flatten().tolist()) == brute
        token = rng.choice(sorted(brute))
        dfa_state = compiled.step(dfa_state, token)
        if compiled.mask(dfa_state) is None:
            break


def test_only_grammar_controls_are_ever_allowed(compiler, tokenizer) -> None:
    markup = {tok.SECTION_BEGIN, tok.CALL_BEGIN, tok.ARG_BEGIN, tok.CALL_END, tok.SECTION_END}
    grammar_ids = {tokenizer.special_id(n) for n in (*markup, tok.IM_END)}
    state = compiler.start(forced(("search", SEARCH)))
    rng = random.Random(3)
    while (mask := state.allowed()) is not None:
        allowed = set(mask.nonzero().flatten().tolist())
        assert all(t < tokenizer.n_base or t in grammar_ids for t in allowed)
        state.advance(rng.choice(sorted(allowed)))
    first = compiler.start(forced(("search", SEARCH))).allowed()
    assert first is not None and first.nonzero().flatten().tolist() == [
        tokenizer.special_id(tok.SECTION_BEGIN)
    ]


def test_advance_rejects_a_token_outside_the_mask(compiler) -> None:
    state = compiler.start(forced(("search", SEARCH)))
    with pytest.raises(ValueError, match="violates"):
        state.advance(5)  # an ordinary token where the section must open


def dfa_for(build) -> LazyDfa:
    nfa = Nfa()
    return LazyDfa(nfa, build(SchemaGrammar(nfa)))


def accepts(dfa: LazyDfa, text: str) -> bool:
    return dfa.accepting(dfa.walk(dfa.start, text.encode()))


@pytest.mark.parametrize("lo,hi", [(0, 0), (-7, 3), (5, 123), (-1200, -999), (98, 1001)])
def test_integer_ranges_accept_exactly_the_canonical_integers_inside(lo: int, hi: int) -> None:
    dfa = dfa_for(lambda g: g.int_range(lo, hi))
    for n in range(lo - 60, hi + 60):
        assert accepts(dfa, str(n)) == (lo <= n <= hi), n
    for text in ("-0", "007", "1.5", "", "-"):
        assert not accepts(dfa, text)


def test_strings_respect_length_bounds_and_json_escapes() -> None:
    dfa = dfa_for(lambda g: g.string(2, 4))
    assert accepts(dfa, '"ab"') and accepts(dfa, '"a\\nc"') and accepts(dfa, '"日本語x"')
    assert not accepts(dfa, '"a"') and not accepts(dfa, '"abcde"')
    assert not accepts(dfa, '"a\\qb"') and not accepts(dfa, '"a\x01b"')
    # No overlong, surrogate or truncated UTF-8 gets through.
    for bad in (b'"\xc0\xafa"', b'"\xed\xa0\x80a"', b'"\xe6\x97a"'):
        assert not dfa.accepting(dfa.walk(dfa.start, bad))


def test_object_fields_in_schema_order_required_always_optional_maybe() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"const": 1}},
        "required": ["b"],
    }
    dfa = dfa_for(lambda g: g.arguments(schema))
    for text in ('{"b":null}', '{"a":true, "b": null,"c":1}', '{"b":null,"c":1}'):
        assert accepts(dfa, text), text
    for text in ('{"a":true}', '{"b":null,"a":true}', "{}", '{,"b":null}', '{"b":null,}'):
        assert not accepts(dfa, text), text


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"enum": []}}},
        {"type": "object", "properties": {"x": {"type": "string", "minLength": 100_000}}},
        {"type": "object", "properties": {"x": {"type": "integer", "minimum": 5, "maximum": 4}}},
        {"type": "object", "properties": {"x": {"type": "widget"}}},
        {"type": "object", "properties": {"x": {"type": 7}}},
    ],
)
def test_schemas_that_cannot_be_bounded_are_refused(schema: dict) -> None:
    with pytest.raises(GrammarError):
        SchemaGrammar(Nfa()).arguments(schema)


def test_grammar_size_is_capped() -> None:
    deep: dict = {"type": "string"}
    for _ in range(6):
        deep = {"type": "array", "items": deep, "minItems": 16}
    with pytest.raises(GrammarError, match="states"):
        SchemaGrammar(Nfa(max_states=50_000)).arguments(
            {"type": "object", "properties": {"x": deep}}
        )


def test_spec_checks() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        ConstraintSpec(banned_ids=(1,), tools=(ToolSchema("f"),))
    with pytest.raises(ValueError, match="unique"):
        ConstraintSpec(tools=(ToolSchema("f"), ToolSchema("f")))
    with pytest.raises(ValueError, match="name"):
        ConstraintSpec(tools=(ToolSchema("a:b"),))
    assert ConstraintSpec(banned_ids=(3, 1, 3)).banned_ids == (1, 3)


def test_banned_ids_are_never_sampled_even_when_biased_up(compiler) -> None:
    banned = (10, 20, 30)
    mask = compiler.start(ConstraintSpec(banned_ids=banned)).allowed()
    assert mask is not None and mask.sum() == MODEL_VOCAB - len(banned)
    logits = torch.randn(4, MODEL_VOCAB)
    logits[:, 20] += 50.0
    bias = {10: 100.0, 30: 100.0}
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias=bias),
        SamplingParams(temperature=1.0, seed=1, logit_bias=bias),
        SamplingParams(temperature=1.5, top_k=3, seed=2, presence_penalty=-2.0),
    ]
    rows = [SamplingRow(p, p.seed or 0, 0, (), (10, 20), mask) for p in params]
    for step in range(20):
        for r in rows:
            r.step = step
        tokens = sample(logits, rows).token_ids.tolist()
        assert not set(tokens) & set(banned)


def test_masked_greedy_is_the_argmax_over_allowed_ids_and_logprobs_stay_raw() -> None:
    logits = torch.randn(3, MODEL_VOCAB)
    allowed = torch.zeros(MODEL_VOCAB, dtype=torch.bool)
    allowed[[5, 77, 900]] = True
    greedy = SamplingParams(temperature=0.0, logprobs=True)
    rows = [SamplingRow(greedy, 0, 0, allowed=allowed), SamplingRow(greedy, 0, 0)]
    result = sample(logits[:2], rows)
    expected = [5, 77, 900][int(logits[0, [5, 77, 900]].argmax())]
    assert result.token_ids.tolist() == [expected, int(logits[1].argmax())]
    raw = logits[0].log_softmax(-1)[expected]
    assert result.logprobs is not None and torch.isclose(result.logprobs[0], raw)


def test_unconstrained_rows_are_unchanged_by_a_masked_neighbour() -> None:
    """A row with no mask samples exactly what it samples alone, and an all-True mask changes
    nothing: the masked path only ever removes ids."""
    logits = torch.randn(2, MODEL_VOCAB)
    everything = torch.ones(MODEL_VOCAB, dtype=torch.bool)
    some = torch.rand(MODEL_VOCAB) > 0.5
    for params in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.9, seed=11),
        SamplingParams(temperature=1.0, repetition_penalty=1.3, seed=4),
    ):
        alone = sample(logits[1:], [SamplingRow(params, 9, 2, (1, 2), (3,))]).token_ids
        mixed = sample(
            logits,
            [
                SamplingRow(params, 9, 2, (1, 2), (3,), some),
                SamplingRow(params, 9, 2, (1, 2), (3,)),
            ],
        ).token_ids
        full = sample(logits[1:], [SamplingRow(params, 9, 2, (1, 2), (3,), everything)])
        assert mixed[1] == alone[0] == full.token_ids[0]
        assert bool(some[mixed[0]])


def test_control_symbols_stay_apart_from_bytes() -> None:
    nfa = Nfa()
    dfa = LazyDfa(nfa, nfa.seq([nfa.literal([CONTROL_BASE + 7]), nfa.literal(b"x")]))
    assert dfa.step(dfa.start, 7) == DEAD
    assert dfa.accepting(dfa.walk(dfa.start, [CONTROL_BASE + 7, ord("x")]))
