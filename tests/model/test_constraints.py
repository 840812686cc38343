"""Constrained generation (k2model/constraints.py, on llguidance) on the embedded vocabulary:
forced calls always parse to a valid call with schema-valid arguments, the masks never lead to a
dead end and equal a token-by-token check, JSON Schema is honoured in full (unbounded strings,
$ref, pattern, additionalProperties), and the sampler honours masks while leaving unconstrained
rows exactly as they were."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model.constraint_grammar import check
from k2model.constraint_spec import ConstraintSpec, GrammarError, ToolSchema
from k2model.constraints import ConstraintCompiler, unpack_bitmask
from k2model.sampling import sample
from k2model.sampling_params import SamplingParams, SamplingRow
from k2model.text import chat_tokens as tok
from k2model.text.pieces import decode_pieces
from k2model.text.tokenizer import Tokenizer
from k2model.text.tool_parser import markers_for, parse_output

MODEL_VOCAB = 4096
MAX_CALL_TOKENS = 4000  # walks prefer closing tokens, so they end long before this
CLOSERS = set(b'"}],0123456789')  # pieces a walk prefers: they end strings, numbers, containers

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


def forced(*tools: tuple[str, dict | None], index: int = 0) -> ConstraintSpec:
    schemas = tuple(ToolSchema(n, json.dumps(s) if s is not None else "") for n, s in tools)
    return ConstraintSpec(tools=schemas, first_call_index=index)


def random_walk(
    compiler: ConstraintCompiler,
    tokenizer: Tokenizer,
    spec: ConstraintSpec,
    seed: int,
    prefix: tuple[int, ...] = (),
) -> list[int]:
    """`prefix` (fed as the model's tokens), then random choices among allowed ids until the
    grammar is finished, half the time among the allowed one-byte closers and control ids (so
    unbounded strings end); asserts that every unfinished state allows something (no dead end)."""
    rng = random.Random(seed)
    state = compiler.start(spec)
    out: list[int] = []
    for token in prefix:
        state.advance(token)
        out.append(token)
    while (mask := state.allowed()) is not None and not _only_bans(mask, spec):
        allowed = mask.nonzero().flatten().tolist()
        assert allowed, f"dead end after {out}"
        closing = [t for t in allowed if t >= tokenizer.n_base or _closer(tokenizer, t)]
        token = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        state.advance(token)
        out.append(token)
        assert len(out) < MAX_CALL_TOKENS
    return out


def _only_bans(mask: torch.Tensor, spec: ConstraintSpec) -> bool:
    """The mask is the banned ids' alone: the grammar is waiting or finished."""
    return int((~mask).sum()) == len(spec.banned_ids) and not any(mask[list(spec.banned_ids)])


def _closer(tokenizer: Tokenizer, token: int) -> bool:
    piece = tokenizer.id_to_piece(token)
    return len(piece) == 1 and piece[0] in CLOSERS


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_forced_call_always_parses_to_a_schema_valid_call(compiler, tokenizer, seed) -> None:
    spec = forced(("get_weather", WEATHER), ("search", SEARCH), ("ping", None), index=3)
    ids = random_walk(compiler, tokenizer, spec, seed)
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


def auto(*tools: tuple[str, dict | None, bool], **fields) -> ConstraintSpec:
    schemas = tuple(ToolSchema(n, json.dumps(s) if s else "", strict) for n, s, strict in tools)
    return ConstraintSpec(tools=schemas, auto_tools=True, **fields)


def test_auto_mode_leaves_text_free_until_a_section_opens(compiler, tokenizer) -> None:
    state = compiler.start(auto(("search", SEARCH, True)))
    for token in tokenizer.encode("Let me look that up. <|tool_call_begin|> is just text here"):
        assert state.allowed() is None
        state.advance(token)
    state.advance(tokenizer.special_id(tok.SECTION_BEGIN))
    mask = state.allowed()
    assert mask is not None and mask.nonzero().flatten().tolist() == [
        tokenizer.special_id(tok.CALL_BEGIN)
    ]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), single=st.booleans())
def test_auto_mode_calls_name_declared_tools_and_strict_arguments_follow_the_schema(
    compiler, tokenizer, seed, single
) -> None:
    spec = auto(("get_weather", WEATHER, True), ("note", None, False), single_call=single)
    prefix = (*tokenizer.encode("Checking."), tokenizer.special_id(tok.SECTION_BEGIN))
    ids = random_walk(compiler, tokenizer, spec, seed, prefix)
    assert ids[-1] == tokenizer.special_id(tok.IM_END)
    pieces = decode_pieces(tokenizer, ids, markers_for(False))
    parsed = parse_output(pieces, declared={"get_weather", "note"})
    assert parsed.content == "Checking." and parsed.tool_calls
    assert len(parsed.tool_calls) == 1 or not single
    for call in parsed.tool_calls:
        if call.name == "get_weather":
            jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_a_non_strict_tool_s_arguments_are_any_json_object(compiler, tokenizer) -> None:
    spec = auto(("note", SEARCH, False), ("search", SEARCH, True))
    head = [tokenizer.special_id(n) for n in (tok.SECTION_BEGIN, tok.CALL_BEGIN)]

    def spells(name: str, arguments: str) -> bool:
        state = compiler.start(spec)
        ids = [*head, *tokenizer.encode(f"functions.{name}:7"), tokenizer.special_id(tok.ARG_BEGIN)]
        ids += tokenizer.encode(arguments) + [tokenizer.special_id(tok.CALL_END)]
        for token in ids:
            if not state.accepts(token):
                return False
            state.advance(token)
        return True

    assert spells("note", '{"anything": [1, 2]}')  # its schema is not enforced
    assert not spells("search", '{"anything": [1, 2]}')  # strict: query is required
    assert spells("search", '{"query": "x"}')
    assert not spells("note", "not JSON")


def test_undeclared_names_cannot_be_called(compiler, tokenizer) -> None:
    def spells(head: str) -> bool:
        state = compiler.start(auto(("search", SEARCH, True), single_call=True))
        opening = [tokenizer.special_id(n) for n in (tok.SECTION_BEGIN, tok.CALL_BEGIN)]
        for token in [*opening, *tokenizer.encode(head), tokenizer.special_id(tok.ARG_BEGIN)]:
            if not state.accepts(token):
                return False
            state.advance(token)
        return True

    assert spells("functions.search:0") and spells("functions.search:12")
    assert not spells("functions.delete_all:0") and not spells("search:0")


ANSWER = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"}},
        "score": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["title", "tags"],
}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32))
def test_an_answer_schema_yields_a_valid_json_answer(compiler, tokenizer, seed) -> None:
    spec = ConstraintSpec(answer_schema=json.dumps(ANSWER))
    ids = random_walk(compiler, tokenizer, spec, seed)
    assert ids[-1] == tokenizer.special_id(tok.IM_END)
    jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), ANSWER)


def test_json_object_answers_are_objects(compiler, tokenizer) -> None:
    spec = ConstraintSpec(answer_schema='{"type": "object"}')
    for seed in range(5):
        ids = random_walk(compiler, tokenizer, spec, seed)
        assert isinstance(json.loads(tokenizer.decode(ids[:-1])), dict)


def test_an_answer_after_think_leaves_the_reasoning_free(compiler, tokenizer) -> None:
    spec = ConstraintSpec(answer_schema=json.dumps(ANSWER), answer_after_think=True)
    reasoning = [tokenizer.special_id(tok.THINK_BEGIN), *tokenizer.encode("hmm, plain words")]
    prefix = (*reasoning, tokenizer.special_id(tok.THINK_END))
    ids = random_walk(compiler, tokenizer, spec, 3, prefix)
    answer = tokenizer.decode(ids[len(prefix) : -1])
    jsonschema.validate(json.loads(answer), ANSWER)


def test_an_answer_with_auto_tools_may_call_instead(compiler, tokenizer) -> None:
    spec = auto(("search", SEARCH, True), answer_schema=json.dumps(ANSWER))
    state = compiler.start(spec)
    first = state.allowed()
    assert first is not None
    assert first[tokenizer.special_id(tok.SECTION_BEGIN)] and first[tokenizer.encode("{")[0]]
    assert not first[tokenizer.encode("Sure")[0]]


def test_banned_ids_hold_while_a_grammar_waits_and_runs(compiler, tokenizer) -> None:
    think = (tokenizer.special_id(tok.THINK_BEGIN),)
    spec = auto(("search", SEARCH, True), banned_ids=think)
    state = compiler.start(spec)
    assert not state.accepts(think[0])
    state.advance(tokenizer.special_id(tok.SECTION_BEGIN))
    mask = state.allowed()
    assert mask is not None and not mask[think[0]]


def test_named_tool_is_the_only_one_called(compiler, tokenizer) -> None:
    spec = forced(("search", SEARCH))
    for seed in range(5):
        pieces = decode_pieces(
            tokenizer, random_walk(compiler, tokenizer, spec, seed), markers_for(False)
        )
        [call] = parse_output(pieces, declared={"search"}).tool_calls
        assert call.name == "search" and isinstance(json.loads(call.arguments)["query"], str)


def test_masks_allow_only_ids_the_matcher_accepts(compiler, tokenizer) -> None:
    """Every id the engine's mask allows is one a copy of the matcher accepts on its own (the
    mask may be narrower: where the grammar spells a fixed text, only its canonical tokens)."""
    state = compiler.start(forced(("get_weather", WEATHER)))
    rng = random.Random(7)
    for _ in range(8):
        mask = state.allowed()
        assert mask is not None
        matcher = state._matcher
        assert matcher is not None
        one_by_one = {
            t for t in range(MODEL_VOCAB) if matcher.deep_copy().try_consume_tokens([t]) == 1
        }
        allowed = set(mask.nonzero().flatten().tolist())
        assert allowed and allowed <= one_by_one
        state.advance(rng.choice(sorted(allowed)))


def test_bitmask_unpacking_reads_bit_b_of_word_w_as_id_32w_plus_b() -> None:
    words = torch.tensor([0b101, -(2**31), 1], dtype=torch.int32)
    assert unpack_bitmask(words, 70).nonzero().flatten().tolist() == [0, 2, 63, 64]
    assert unpack_bitmask(words, 64).numel() == 64


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


def accepts_arguments(compiler, tokenizer, schema: dict, arguments: str) -> bool:
    """Whether a forced call of a tool with `schema` can spell `arguments` token by token."""
    state = compiler.start(forced(("t", schema)))
    head = [tokenizer.special_id(tok.SECTION_BEGIN), tokenizer.special_id(tok.CALL_BEGIN)]
    head += tokenizer.encode("functions.t:0") + [tokenizer.special_id(tok.ARG_BEGIN)]
    for token in head + tokenizer.encode(arguments) + [tokenizer.special_id(tok.CALL_END)]:
        if not state.accepts(token):
            return False
        state.advance(token)
    return True


def test_strings_are_not_capped_and_schemas_are_honoured_in_full(compiler, tokenizer) -> None:
    text = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    long = "a file path /srv/data/" + "x" * 178  # 200 characters
    assert accepts_arguments(compiler, tokenizer, text, json.dumps({"q": long}))
    # json.dumps's layout only: no run of whitespace can eat the budget
    assert not accepts_arguments(compiler, tokenizer, text, '{"q":     "x"}')
    assert not accepts_arguments(compiler, tokenizer, text, '\n{"q": "x"}')
    referenced = {
        "type": "object",
        "$defs": {"id": {"type": "string", "pattern": "^[a-z]{2}-[0-9]+$"}},
        "properties": {"a": {"$ref": "#/$defs/id"}, "n": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    assert accepts_arguments(compiler, tokenizer, referenced, '{"a": "ab-12", "n": 1234567890}')
    assert not accepts_arguments(compiler, tokenizer, referenced, '{"a": "AB-12"}')  # pattern
    assert not accepts_arguments(compiler, tokenizer, referenced, '{"a": "ab-1", "z": 1}')
    assert not accepts_arguments(compiler, tokenizer, referenced, '{"n": 1}')  # required
    # an object that does not say additionalProperties takes only its declared properties
    assert not accepts_arguments(compiler, tokenizer, text, '{"q": "x", "extra": 1}')
    open_ = {**text, "additionalProperties": True}
    assert accepts_arguments(compiler, tokenizer, open_, '{"q": "x", "extra": 1}')
    # closing walks subschemas only: a property named "properties" and a const value are data
    data = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"k": {"type": "integer"}}},
            "mode": {"const": {"properties": 1}},
        },
        "required": ["properties", "mode"],
    }
    call = '{"properties": {"k": 1}, "mode": {"properties": 1}}'
    assert accepts_arguments(compiler, tokenizer, data, call)
    assert not accepts_arguments(compiler, tokenizer, data, '{"properties": {"k": 1, "j": 2}, ')


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"type": "widget"}}},
        {"type": "object", "properties": {"x": {"type": 7}}},
        {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}},
    ],
)
def test_schemas_the_engine_cannot_compile_are_refused(schema: dict) -> None:
    with pytest.raises(GrammarError):
        check(ConstraintSpec(tools=(ToolSchema("t", json.dumps(schema)),)))


def test_spec_checks() -> None:
    with pytest.raises(ValueError, match="exclusive"):
        ConstraintSpec(tools=(ToolSchema("f"),), answer_schema="{}")
    with pytest.raises(ValueError, match="need tools"):
        ConstraintSpec(single_call=True)
    with pytest.raises(ValueError, match="needs an answer schema"):
        ConstraintSpec(answer_after_think=True)
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
