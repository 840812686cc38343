"""Property test of constrained decoding over random JSON Schemas: strings of unbounded length,
patterns, `$ref`, `anyOf`, enums and nested arrays and objects.

For every schema, both ways round:
- sound: a random walk through the grammar (a forced call's arguments, and a json_schema
  answer) always ends in JSON that validates against the schema (jsonschema);
- complete: any instance hypothesis-jsonschema draws from the schema, written in the grammar's
  layout with its keys in the schema's declared order (the engine emits properties in that
  order, as OpenAI's structured outputs do), can be spelled token by token (nothing valid is cut
  off: no length caps).
"""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from k2model.constraint_spec import ConstraintSpec, ToolSchema
from k2model.constraints import ConstraintCompiler
from k2model.text import chat_tokens as tok
from k2model.text.tokenizer import Tokenizer

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

leaves = st.one_of(
    st.just({"type": "string"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 12)),
    st.just({"type": "string", "pattern": "^[a-z]{1,3}-[0-9]+$"}),
    st.just({"type": "integer"}),
    st.builds(
        lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 50}, st.integers(-9, 9)
    ),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"enum": ["red", "green", 3]}),
    st.just({"$ref": "#/$defs/tag"}),
)


def _object(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    # closed, as the grammar closes every object that declares properties (constraint_grammar.py)
    return {
        "type": "object",
        "properties": props,
        "required": sorted(set(required) & set(props)),
        "additionalProperties": False,
    }


schemas = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda s: {"type": "array", "items": s, "maxItems": 3}, inner),
        st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
        st.builds(
            _object,
            st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), inner, min_size=1, max_size=3),
            st.lists(st.sampled_from(["a", "b", "c", "d"])),
        ),
    ),
    max_leaves=6,
)
DEFS = {"tag": {"type": "string", "minLength": 1, "maxLength": 4}}
roots = st.builds(
    lambda props, req: {**_object(props, req), "$defs": DEFS},
    st.dictionaries(st.sampled_from(["x", "y", "z"]), schemas, min_size=1, max_size=3),
    st.lists(st.sampled_from(["x", "y", "z"])),
)


def walk(compiler: ConstraintCompiler, tokenizer: Tokenizer, spec: ConstraintSpec, seed: int):
    """Random allowed tokens until the grammar is finished, preferring one-byte pieces that end
    strings, numbers and containers half the time (so unbounded strings end)."""
    rng = random.Random(seed)
    state = compiler.start(spec)
    out: list[int] = []
    while (mask := state.allowed()) is not None:
        allowed = mask.nonzero().flatten().tolist()
        assert allowed, "dead end"
        closing = [
            t for t in allowed if t >= tokenizer.n_base or tokenizer.id_to_piece(t) in CLOSERS
        ]
        token = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        state.advance(token)
        out.append(token)
        assert len(out) < 6000
    return out


CLOSERS = {bytes([c]) for c in b'"}],0123456789'}


def between(tokenizer: Tokenizer, ids: list[int], begin: str, end: str) -> str:
    start = ids.index(tokenizer.special_id(begin)) + 1
    return tokenizer.decode(ids[start : ids.index(tokenizer.special_id(end))])


@SETTINGS
@given(schema=roots, seed=st.integers(0, 2**32))
def test_walks_always_validate(compiler, tokenizer, schema, seed) -> None:
    forced = ConstraintSpec(tools=(ToolSchema("t", json.dumps(schema)),))
    ids = walk(compiler, tokenizer, forced, seed)
    jsonschema.validate(json.loads(between(tokenizer, ids, tok.ARG_BEGIN, tok.CALL_END)), schema)
    answer = walk(compiler, tokenizer, ConstraintSpec(answer_schema=json.dumps(schema)), seed)
    jsonschema.validate(json.loads(tokenizer.decode(answer[:-1])), schema)


def spells(compiler, tokenizer, schema: dict, text: str) -> bool:
    state = compiler.start(ConstraintSpec(answer_schema=json.dumps(schema)))
    for token in [*tokenizer.encode(text), tokenizer.special_id(tok.IM_END)]:
        if not state.accepts(token):
            return False
        state.advance(token)
    return state.allowed() is None


def declared_order(instance: Any, schema: dict, root: dict) -> Any:
    """`instance` with every object's keys in its schema's `properties` order."""
    if "$ref" in schema:
        return declared_order(instance, root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root)
    if "anyOf" in schema:
        match = next(s for s in schema["anyOf"] if _valid(instance, s, root))
        return declared_order(instance, match, root)
    if isinstance(instance, list) and "items" in schema:
        return [declared_order(v, schema["items"], root) for v in instance]
    if isinstance(instance, dict) and "properties" in schema:
        props = schema["properties"]
        return {k: declared_order(instance[k], props[k], root) for k in props if k in instance}
    return instance


def _valid(instance: Any, schema: dict, root: dict) -> bool:
    return jsonschema.Draft202012Validator({**schema, "$defs": root["$defs"]}).is_valid(instance)


@SETTINGS
@given(data=st.data(), schema=roots)
def test_every_valid_instance_can_be_spelled(compiler, tokenizer, data, schema) -> None:
    instance = declared_order(data.draw(from_schema(schema)), schema, schema)
    # the engine's spelling: non-ASCII raw, DEL escaped (both valid JSON for the same value)
    text = json.dumps(instance, ensure_ascii=False).replace("\x7f", "\\u007f")
    assert spells(compiler, tokenizer, schema, text), (text, json.dumps(schema))


def test_a_200_character_string_is_reachable(compiler, tokenizer) -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    assert spells(compiler, tokenizer, schema, json.dumps({"q": "/srv/" + "k2" * 98}))
