"""A model output as the parsers read it: ordinary text and markers, told apart by token id.

K2's tool-call markers and <think> / </think> are control tokens of the vocabulary. The model
writes a marker as that one id; the same characters spelled with ordinary tokens (a model
explaining `<|tool_call_end|>` inside JSON arguments, or "use the <think> tag") are text. So the
parsers (tool_parser.py, stream_parser.py) never search text for markers: they take `Piece`s,
where a `Marker` stands for one control id and a `str` is decoded ordinary text.

A name that is no token of the vocabulary (K2-Instruct has no <think>; nobody has the singular
section markers the model sometimes writes as text, docs/text.md, tool calls) can only ever be text.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

from k2model.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class Marker:
    """One control token of the output's structure, by name."""

    name: str


Piece = str | Marker


def marker_ids(tokenizer: Tokenizer, names: Collection[str]) -> dict[int, str]:
    """id -> name for each of `names` that is a token of this vocabulary."""
    out: dict[int, str] = {}
    for name in names:
        try:
            out[tokenizer.special_id(name)] = name
        except ValueError:
            continue  # not a token here: always text
    return out


class PieceDecoder:
    """Ids in, pieces out, incrementally: complete UTF-8 text between markers (an incomplete
    character before a marker decodes as U+FFFD, as the one-shot decode of the same ids does).
    Other control ids are dropped when `skip_special_tokens`, else decoded as their names."""

    def __init__(
        self, tokenizer: Tokenizer, markers: dict[int, str], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer, self._markers, self._skip = tokenizer, markers, skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> list[Piece]:
        out: list[Piece] = []
        run: list[int] = []
        for token_id in ids:
            name = self._markers.get(token_id)
            if name is None:
                if not (self._skip and self._tokenizer.is_special(token_id)):
                    run.append(token_id)
                continue
            _add(out, self._text(run, final=True))
            run = []
            out.append(Marker(name))
        _add(out, self._text(run, final=False))
        return out

    def flush(self) -> list[Piece]:
        return [text] if (text := self._utf8.decode(b"", final=True)) else []

    def _text(self, ids: list[int], final: bool) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes(ids) if ids else b"", final=final)


def decode_pieces(
    tokenizer: Tokenizer, ids: Sequence[int], markers: Collection[str]
) -> list[Piece]:
    """The one-shot twin of PieceDecoder (skip_special_tokens): a whole output's pieces."""
    table = marker_ids(tokenizer, markers)
    out: list[Piece] = []
    run: list[int] = []
    for token_id in [*ids, None]:
        if token_id is not None and token_id not in table:
            if not tokenizer.is_special(token_id):
                run.append(token_id)
            continue
        _add(out, tokenizer.decode_bytes(run).decode("utf-8", errors="replace"))
        run = []
        if token_id is not None:
            out.append(Marker(table[token_id]))
    return out


def split_markers(text: str, markers: Collection[str]) -> list[Piece]:
    """Pieces of a text in which every spelled marker name stands for its control id: how a
    test or a constraint writes an output by hand. Never for decoded model text."""
    if not markers:
        return [text] if text else []
    pattern = re.compile("(" + "|".join(re.escape(m) for m in sorted(markers)) + ")")
    names = frozenset(markers)
    return [Marker(p) if p in names else p for p in pattern.split(text) if p]


def as_text_unless(names: Collection[str], pieces: Iterable[Piece]) -> Iterator[Piece]:
    """Markers a parser does not read (say <think> with reasoning off) as their text, which is
    what a skip-special decode of the same ids shows."""
    for piece in pieces:
        yield piece.name if isinstance(piece, Marker) and piece.name not in names else piece


def merge(pieces: Iterable[Piece]) -> list[Piece]:
    """The same pieces with adjacent text joined."""
    out: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, Marker):
            out.append(piece)
        else:
            _add(out, piece)
    return out


def text_of(pieces: Iterable[Piece]) -> str:
    """The decode with markers spelled out (what skip-special decode of the same ids gives)."""
    return "".join(p.name if isinstance(p, Marker) else p for p in pieces)


def _add(out: list[Piece], text: str) -> None:
    if not text:
        return
    if out and isinstance(out[-1], str):
        out[-1] += text
    else:
        out.append(text)
