"""Request text carried through a chat template as opaque placeholders.

A checkpoint's Jinja template writes control tokens as text (`<|im_end|>`), so its output cannot
tell the template's markup from a user who typed the same characters. Before rendering, every
string the request supplied (content, names, reasoning, tool-call ids and arguments, tool
results, tool names, descriptions and schemas) is swapped for a placeholder; after rendering,
only the template's own text is cut at control names, and each placeholder is replaced by its
original as ordinary text. Adjacent ordinary text is merged, so BPE sees the same runs as on
the plain rendering (HF tokenizes everything between two control tokens as one piece).

A placeholder is `<lead>\\ue000<nonce><index>"\\ue001<trail>`: the original's leading and
trailing white space stay outside it (a template's `trim` acts on them exactly as on the
original), the nonce is fresh per render (request text cannot forge one), and the `"` shows
how many times the template JSON-encoded it (`tojson` turns it into `\\"`, twice into `\\\\\\"`),
so the original is substituted encoded the same number of times. A template that transforms
request text in any other way (upper-casing, slicing, HTML escaping) leaves a broken
placeholder behind, which is an error, never a guess.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Collection
from typing import Any

from jinja2 import TemplateError

Segment = tuple[str, bool]
_OPEN, _CLOSE = "\ue000", "\ue001"
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.$-]*")


class OpaqueText:
    """The placeholders of one render."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(8)
        self.originals: list[str] = []

    def wrap(self, text: str) -> str:
        core = text.strip()
        if not core:
            return text  # white space alone cannot spell a control name
        lead = text[: len(text) - len(text.lstrip())]
        trail = text[len(text.rstrip()) :]
        self.originals.append(core)
        return f'{lead}{_OPEN}{self.nonce}{len(self.originals) - 1}"{_CLOSE}{trail}'

    def wrap_tree(self, value: Any) -> Any:
        """A JSON value with every string wrapped; keys too, unless plain identifiers (schema
        keywords and property names stay readable, and keep their sort order)."""
        if isinstance(value, str):
            return self.wrap(value)
        if isinstance(value, list):
            return [self.wrap_tree(v) for v in value]
        if isinstance(value, dict):
            return {
                (k if _IDENTIFIER.fullmatch(k) else self.wrap(k)): self.wrap_tree(v)
                for k, v in value.items()
            }
        return value

    def segments(self, rendered: str, control_names: Collection[str]) -> list[Segment]:
        """(text, is_control) segments of a render made with wrapped strings: control names are
        cut out of the template's text only; originals come back as ordinary text."""
        marker = re.compile(re.escape(_OPEN + self.nonce) + r'(\d+)(\\*)"' + _CLOSE)
        pieces: list[tuple[str, bool]] = []  # (text, from the template)
        pos = 0
        for m in marker.finditer(rendered):
            pieces.append((rendered[pos : m.start()], True))
            index, escapes = int(m.group(1)), len(m.group(2))
            if index >= len(self.originals) or (escapes + 1) & escapes:
                raise TemplateError("chat template altered a request string's placeholder")
            text = self.originals[index]
            for _ in range((escapes + 1).bit_length() - 1):  # 2**k - 1 backslashes: k encodings
                text = json.dumps(text, ensure_ascii=False)[1:-1]
            pieces.append((text, False))
            pos = m.end()
        pieces.append((rendered[pos:], True))
        out: list[Segment] = []
        for text, from_template in pieces:
            if from_template and self.nonce in text:
                raise TemplateError(
                    "chat template transforms request text in a way that cannot be kept apart "
                    "from its markup (only verbatim output and tojson are supported)"
                )
            parts = split_control(text, control_names) if from_template else [(text, False)]
            for piece, is_control in parts:
                if not piece:
                    continue
                if not is_control and out and not out[-1][1]:
                    out[-1] = (out[-1][0] + piece, False)
                else:
                    out.append((piece, is_control))
        return out


def split_control(text: str, control_names: Collection[str]) -> list[Segment]:
    """Cuts text at every occurrence of a control name (longest name first at a position), the
    way HF's added-token trie does; the text between is merged plain text. Only for text that
    holds no request strings (a template's own output, or a reference rendering in tests)."""
    if not control_names:
        return [(text, False)] if text else []
    controls = frozenset(control_names)
    return [(piece, piece in controls) for piece in _pattern(controls).split(text) if piece]


@functools.cache
def _pattern(controls: frozenset[str]) -> re.Pattern[str]:
    names = sorted(controls, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
