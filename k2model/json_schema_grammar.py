"""A JSON schema as a bounded byte-level NFA: the grammar of a forced tool call's arguments.

The language is finite on purpose. With a random or weak model sampling inside it, every path
must end: strings have a maximum length (the schema's maxLength, else DEFAULT_STRING_CHARS),
integers a range (the schema's bounds, else DEFAULT_INT_DIGITS digits), arrays a maximum item
count, and unknown parts fall back to generic JSON of bounded depth. Whitespace: none, except one
optional space after ':' and ','. Output is compact JSON that `json.loads` accepts.

Supported (honoured) keywords: type (also lists), properties (emitted in schema order; required
ones always, optional ones maybe), required, enum, const, anyOf/oneOf (as alternatives; oneOf's
exclusivity is not enforced), allOf with one member, nullable, minLength/maxLength (code points;
an escape counts as one), minimum/maximum/exclusiveMinimum/exclusiveMaximum (integers exactly;
numbers via their integer part, fractions only where they cannot leave the range), items (a
schema or a tuple list), minItems/maxItems. Not honoured: pattern, format, multipleOf,
uniqueItems, $ref, not, if/then/else, patternProperties, additionalProperties schemas beside
listed properties: such a value may not validate.

Thompson construction: every state built lies on a path from its fragment's start to its end, and
no edge has an empty label set, so every state the matcher can reach can still finish (the
"no dead end" invariant constraints.py relies on). Symbols: bytes are 0..255; callers may add
larger ints for control tokens.
"""

from __future__ import annotations

import json
import math
from typing import Any

from k2model.byte_nfa import Frag, GrammarError, Nfa

DEFAULT_STRING_CHARS = 24
GENERIC_STRING_CHARS = 12
MAX_STRING_CHARS = 64  # a larger maxLength is cut to this (or to minLength when that is larger)
MAX_MIN_LENGTH = 256
DEFAULT_INT_DIGITS = 6
MAX_INT_DIGITS = 18
FRACTION_DIGITS = 3
EXTRA_ITEMS = 3  # an array without maxItems holds at most minItems + this
MAX_MIN_ITEMS = 16
MAX_SCHEMA_DEPTH = 8
GENERIC_DEPTH = 2  # nesting of generic JSON values (objects / arrays) where no schema says more

_ASCII_TEXT = frozenset(b for b in range(0x20, 0x7F) if b not in b'"\\')
_ESCAPES = frozenset(b'"\\/bfnrt')
_CONT = frozenset(range(0x80, 0xC0))
_DIGITS = frozenset(b"0123456789")


def json_text(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


class SchemaGrammar:
    """Builds fragments for schema values into one Nfa."""

    def __init__(self, nfa: Nfa) -> None:
        self.nfa = nfa

    def arguments(self, schema: dict[str, Any] | None) -> Frag:
        """A tool's arguments: always a JSON object (the tool-call parser accepts only those)."""
        if isinstance(schema, dict) and _types(schema) == ["object"] and "anyOf" not in schema:
            return self.value(schema, 0)
        return self._generic_object(GENERIC_DEPTH)

    def value(self, schema: Any, depth: int) -> Frag:
        if schema is True or schema == {} or depth > MAX_SCHEMA_DEPTH:
            return self._generic(GENERIC_DEPTH if depth <= MAX_SCHEMA_DEPTH else 0)
        if not isinstance(schema, dict):
            raise GrammarError(f"a schema must be an object or true, got {schema!r:.60}")
        if "const" in schema:
            return self.nfa.literal(json_text(schema["const"]))
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise GrammarError("enum must be a non-empty list")
            return self.nfa.alt([self.nfa.literal(json_text(v)) for v in values])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise GrammarError(f"{key} must be a non-empty list")
                return self.nfa.alt([self.value(s, depth + 1) for s in subs])
        all_of = schema.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1:
            return self.value(all_of[0], depth + 1)
        types = _types(schema)
        if not types:
            return self._generic(GENERIC_DEPTH)
        return self.nfa.alt([self._typed(t, schema, depth) for t in types])

    def _typed(self, kind: str, schema: dict[str, Any], depth: int) -> Frag:
        if kind == "object":
            return self._object(schema, depth)
        if kind == "array":
            return self._array(schema, depth)
        if kind == "string":
            return self._string(schema)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.nfa.alt([self.nfa.literal(b"true"), self.nfa.literal(b"false")])
        if kind == "null":
            return self.nfa.literal(b"null")
        raise GrammarError(f"unknown type {kind!r}")

    def _sep(self, char: bytes) -> Frag:
        return self.nfa.seq([self.nfa.literal(char), self.nfa.optional(self.nfa.literal(b" "))])

    def _object(self, schema: dict[str, Any], depth: int) -> Frag:
        props = schema.get("properties")
        if not isinstance(props, dict):
            props = {}
        required = schema.get("required")
        required = set(required) if isinstance(required, list) else set()
        fields = [(k, v, k in required) for k, v in props.items()]
        fields += [(k, True, True) for k in sorted(required - set(props)) if isinstance(k, str)]
        if not fields:
            return self._generic_object(GENERIC_DEPTH if depth <= 1 else 1)
        return self._fields(fields, depth)

    def _fields(self, fields: list[tuple[str, Any, bool]], depth: int) -> Frag:
        """'{' fields in order '}'. Two tracks: `empty` (nothing written yet: no comma due) and
        `some`; both enter one copy of each value, which leads on to `some`. A required field
        ends the `empty` track (None): past it, something has always been written."""
        nfa = self.nfa
        opening = nfa.literal(b"{")
        empty: int | None = opening[1]
        some: int | None = None
        for name, sub, is_required in fields:
            value = self.value(sub, depth + 1)
            after = nfa.state()
            nfa.eps[value[1]].append(after)
            for track, lead in ((empty, False), (some, True)):
                if track is not None:
                    comma = [self._sep(b",")] if lead else []
                    key = nfa.seq([*comma, nfa.literal(json_text(name)), self._sep(b":")])
                    nfa.eps[track].append(key[0])
                    nfa.eps[key[1]].append(value[0])
            skipped: int | None = None
            if not is_required:
                if some is not None:
                    nfa.eps[some].append(after)
                if empty is not None:
                    skipped = nfa.state()
                    nfa.eps[empty].append(skipped)
            empty, some = skipped, after
        closing = nfa.literal(b"}")
        for track in (empty, some):
            if track is not None:
                nfa.eps[track].append(closing[0])
        return opening[0], closing[1]

    def _array(self, schema: dict[str, Any], depth: int) -> Frag:
        items = schema.get("items", True)
        nfa = self.nfa
        if isinstance(items, list):  # draft-4 tuple: exactly these, in order
            inner = [self.value(s, depth + 1) for s in items]
            parts = [nfa.literal(b"[")]
            for i, frag in enumerate(inner):
                parts += [self._sep(b","), frag] if i else [frag]
            return nfa.seq([*parts, nfa.literal(b"]")])
        lo = _int(schema.get("minItems"), 0)
        if lo > MAX_MIN_ITEMS:
            raise GrammarError(f"minItems {lo} is more than {MAX_MIN_ITEMS}")
        hi = _int(schema.get("maxItems"), lo + EXTRA_ITEMS)
        hi = max(lo, min(hi, lo + EXTRA_ITEMS))
        body = nfa.repeat(lambda: self.value(items, depth + 1), lo, hi, lambda: self._sep(b","))
        return nfa.seq([nfa.literal(b"["), body, nfa.literal(b"]")])

    def _string(self, schema: dict[str, Any]) -> Frag:
        lo = _int(schema.get("minLength"), 0)
        if lo > MAX_MIN_LENGTH:
            raise GrammarError(f"minLength {lo} is more than {MAX_MIN_LENGTH}")
        hi = _int(schema.get("maxLength"), lo + DEFAULT_STRING_CHARS)
        return self.string(lo, max(lo, min(hi, MAX_STRING_CHARS)))

    def string(self, lo: int, hi: int) -> Frag:
        """'"' + lo..hi characters (UTF-8 or a simple escape) + '"'."""
        nfa = self.nfa
        start, end = nfa.state(), nfa.state()
        quote = frozenset(b'"')
        pos = nfa.state()
        nfa.edge(start, quote, pos)
        for i in range(hi + 1):
            if i >= lo:
                nfa.edge(pos, quote, end)
            if i < hi:
                nxt = nfa.state()
                self._char(pos, nxt)
                pos = nxt
        return start, end

    def _char(self, a: int, b: int) -> None:
        """One JSON string character from a to b: printable ASCII, an escape, or a well-formed
        UTF-8 sequence (no overlongs, no surrogates)."""
        nfa = self.nfa
        nfa.edge(a, _ASCII_TEXT, b)
        esc = nfa.state()
        nfa.edge(a, frozenset(b"\\"), esc)
        nfa.edge(esc, _ESCAPES, b)
        c1, c2, c3 = nfa.state(), nfa.state(), nfa.state()  # continuation bytes still due
        nfa.edge(c1, _CONT, b)
        nfa.edge(c2, _CONT, c1)
        nfa.edge(c3, _CONT, c2)
        nfa.edge(a, frozenset(range(0xC2, 0xE0)), c1)
        nfa.edge(a, frozenset([*range(0xE1, 0xED), 0xEE, 0xEF]), c2)
        nfa.edge(a, frozenset(range(0xF1, 0xF4)), c3)
        for lead, second, then in (
            (0xE0, range(0xA0, 0xC0), c1),
            (0xED, range(0x80, 0xA0), c1),
            (0xF0, range(0x90, 0xC0), c2),
            (0xF4, range(0x80, 0x90), c2),
        ):
            mid = nfa.state()
            nfa.edge(a, frozenset((lead,)), mid)
            nfa.edge(mid, frozenset(second), then)

    def _integer(self, schema: dict[str, Any]) -> Frag:
        lo, hi = _int_bounds(schema)
        if lo > hi:
            raise GrammarError("no integer lies within the schema's bounds")
        return self.int_range(lo, hi)

    def _number(self, schema: dict[str, Any]) -> Frag:
        lo, hi = _int_bounds(schema)
        if lo > hi:  # no integer inside, e.g. [0.1, 0.9]: one value from the range
            low = _float(schema, "minimum", "exclusiveMinimum")
            high = _float(schema, "maximum", "exclusiveMaximum")
            return self.nfa.literal(json_text((low + high) / 2))
        alternatives = [self.int_range(lo, hi)]
        # k.ddd lies in [k, k + 1): inside the range for 0 <= k <= hi - 1.
        if max(lo, 0) <= hi - 1:
            digits = self.nfa.repeat(
                lambda: self.nfa.symbols(_DIGITS), 1, FRACTION_DIGITS, lambda: self.nfa.seq([])
            )
            fraction = [self.int_range(max(lo, 0), hi - 1), self.nfa.literal(b"."), digits]
            alternatives.append(self.nfa.seq(fraction))
        return self.nfa.alt(alternatives)

    def int_range(self, lo: int, hi: int) -> Frag:
        """Every integer in [lo, hi] in canonical decimal (no leading zeros, no '-0')."""
        assert lo <= hi
        parts = []
        if lo < 0:
            magnitudes = _digit_ranges(max(1, -min(hi, -1)), -lo)
            parts.append(self.nfa.seq([self.nfa.literal(b"-"), self._ranges(magnitudes)]))
        if hi >= 0:
            parts.append(self._ranges(_digit_ranges(max(lo, 0), hi)))
        return self.nfa.alt(parts)

    def _ranges(self, ranges: list[tuple[str, str]]) -> Frag:
        return self.nfa.alt([self._same_length(a, b) for a, b in ranges])

    def _same_length(self, a: str, b: str) -> Frag:
        """Decimal strings of len(a) == len(b) digits between a and b (inclusive)."""
        nfa = self.nfa
        if len(a) == 1:
            return nfa.symbols(frozenset(range(ord(a), ord(b) + 1)))
        if a[0] == b[0]:
            return nfa.seq([nfa.literal(a[0].encode()), self._same_length(a[1:], b[1:])])
        rest = len(a) - 1
        parts = [
            nfa.seq([nfa.literal(a[0].encode()), self._same_length(a[1:], "9" * rest)]),
            nfa.seq([nfa.literal(b[0].encode()), self._same_length("0" * rest, b[1:])]),
        ]
        if ord(b[0]) - ord(a[0]) > 1:
            middle = frozenset(range(ord(a[0]) + 1, ord(b[0])))
            parts.append(
                nfa.seq([nfa.symbols(middle), *(nfa.symbols(_DIGITS) for _ in range(rest))])
            )
        return nfa.alt(parts)

    def _generic(self, depth: int) -> Frag:
        nfa = self.nfa
        parts = [
            self.string(0, GENERIC_STRING_CHARS),
            self.int_range(-(10**DEFAULT_INT_DIGITS - 1), 10**DEFAULT_INT_DIGITS - 1),
            nfa.literal(b"true"),
            nfa.literal(b"false"),
            nfa.literal(b"null"),
        ]
        if depth > 0:
            parts.append(self._generic_object(depth))
            items = nfa.repeat(
                lambda: self._generic(depth - 1), 0, EXTRA_ITEMS, lambda: self._sep(b",")
            )
            parts.append(nfa.seq([nfa.literal(b"["), items, nfa.literal(b"]")]))
        return nfa.alt(parts)

    def _generic_object(self, depth: int) -> Frag:
        nfa = self.nfa

        def entry() -> Frag:
            key = self.string(1, GENERIC_STRING_CHARS)
            return nfa.seq([key, self._sep(b":"), self._generic(depth - 1)])

        body = nfa.repeat(entry, 0, EXTRA_ITEMS, lambda: self._sep(b","))
        return nfa.seq([nfa.literal(b"{"), body, nfa.literal(b"}")])


def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    if kind is None:
        types = ["object"] if "properties" in schema else []
    elif isinstance(kind, str):
        types = [kind]
    elif isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        types = list(dict.fromkeys(kind))
    else:
        raise GrammarError(f"type must be a string or a non-empty list, got {kind!r:.60}")
    if schema.get("nullable") is True and types and "null" not in types:
        types.append("null")
    return types


def _int(value: Any, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise GrammarError(f"expected a non-negative integer, got {value!r:.60}")
    return value


def _float(schema: dict[str, Any], inclusive: str, exclusive: str) -> float:
    value = schema.get(inclusive, schema.get(exclusive))
    return float(value)


def _int_bounds(schema: dict[str, Any]) -> tuple[int, int]:
    """The integers the schema's bounds allow, clipped to MAX_INT_DIGITS digits; a missing side
    is DEFAULT_INT_DIGITS digits away from the other (or from 0)."""
    lo = hi = None
    for key, exclusive in (("minimum", False), ("exclusiveMinimum", True)):
        value = schema.get(key)
        if _is_number(value):
            bound = math.floor(value) + 1 if exclusive else math.ceil(value)
            lo = bound if lo is None else max(lo, bound)
    for key, exclusive in (("maximum", False), ("exclusiveMaximum", True)):
        value = schema.get(key)
        if _is_number(value):
            bound = math.ceil(value) - 1 if exclusive else math.floor(value)
            hi = bound if hi is None else min(hi, bound)
    span = 10**DEFAULT_INT_DIGITS - 1
    limit = 10**MAX_INT_DIGITS - 1
    if lo is None:
        lo = min(hi, 0) - span if hi is not None else -span
    if hi is None:
        hi = max(lo, 0) + span
    return max(lo, -limit), min(hi, limit)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _digit_ranges(lo: int, hi: int) -> list[tuple[str, str]]:
    """[lo, hi] (0 <= lo <= hi) split into sub-ranges whose ends have equal digit counts."""
    out = []
    while lo <= hi:
        top = 10 ** len(str(lo)) - 1
        out.append((str(lo), str(min(hi, top))))
        lo = top + 1
    return out
