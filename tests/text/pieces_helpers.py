"""Model outputs written by hand for the parser tests: every spelled marker name stands for its
control id (pieces.split_markers), as the model's own marker tokens would decode."""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import Any

from k2model.text.pieces import Marker, Piece, merge, split_markers
from k2model.text.reasoning import THINK_MARKERS
from k2model.text.tool_parser import TOOL_MARKERS, ParsedOutput, parse_output

ALL_MARKERS = TOOL_MARKERS | THINK_MARKERS


def P(text: str) -> list[Piece]:
    return split_markers(text, ALL_MARKERS)


def parse(text: str, **kw: Any) -> ParsedOutput:
    return parse_output(P(text), **kw)


def cut(text: str, points: Collection[int]) -> list[list[Piece]]:
    """The output's pieces cut into chunks at the given unit positions (a unit: one character
    of text, or one marker)."""
    units: list[Piece] = [u for p in P(text) for u in ([p] if isinstance(p, Marker) else list(p))]
    bounds = [0, *sorted({p % (len(units) + 1) for p in points}), len(units)]
    return [merge(units[a:b]) for a, b in itertools.pairwise(bounds)]


def units_of(text: str) -> list[list[Piece]]:
    """One chunk per unit (character or marker): the finest split."""
    return cut(text, range(len(text) + 1))
