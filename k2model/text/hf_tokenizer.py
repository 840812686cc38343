"""An HF `tokenizer.json` tokenizer (DeepSeek-V3 and checkpoints written by transformers), read
with the `tokenizers` library behind the `Tokenizer` interface.

Served: byte-level BPE (the `ByteLevel` decoder of GPT-2, Llama 3, DeepSeek-V3, Qwen), where
every token is a string of GPT-2's byte-to-unicode alphabet, so each id has exact bytes and a
stream decodes id by id. The added tokens are the control tokens (named, matched whole); those
flagged `special` are what a skip-special decode strips. `tokenizer_config.json` names the
bos / eos / pad tokens (bos and pad default to eos).

`tokenizers` matches added tokens inside any text it encodes (its `encode_special_tokens` switch
covers only the special ones), so user text is encoded by a second instance built from the same
file with no added tokens: its pre-tokenizer and merges alone, which never form a control id.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from k2model.text.tokenizer import CONFIG_FILE, HF_FILE, Tokenizer, _token_name, require_files


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the other 68
    are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, shift = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def _byte_level_bytes(token: str, where: str) -> bytes:
    table = _unicode_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError as e:
        raise ValueError(f"{where}: token {token!r} is not byte-level ({e.args[0]!r})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


class HFTokenizer(Tokenizer):
    def __init__(self, spec: dict[str, Any], config: dict[str, Any], where: str) -> None:
        decoder = spec.get("decoder") or {}
        if decoder.get("type") != "ByteLevel":
            raise ValueError(
                f"{where}: only byte-level BPE tokenizers are served (decoder type "
                f"{decoder.get('type')!r}, expected 'ByteLevel')"
            )
        self._json = json.dumps(spec)
        self._full = tokenizers.Tokenizer.from_str(self._json)
        self._plain = tokenizers.Tokenizer.from_str(json.dumps({**spec, "added_tokens": []}))
        self._plain.no_padding()
        self._plain.no_truncation()
        added = spec.get("added_tokens") or []
        controls = {t["content"]: t["id"] for t in added}
        special = frozenset(t["id"] for t in added if t.get("special"))
        vocab = self._full.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        self._pieces: list[bytes | None] = [None] * size
        for token, i in vocab.items():
            is_control = controls.get(token) == i
            self._pieces[i] = token.encode() if is_control else _byte_level_bytes(token, where)
        eos = _token_name(config, "eos_token", "")
        roles = {
            "bos": _token_name(config, "bos_token", eos),
            "eos": eos,
            "pad": _token_name(config, "pad_token", eos),
        }
        for role in ("eos", "bos", "pad"):  # bos and pad default to eos: name it first
            if (name := roles[role]) not in controls:
                raise ValueError(f"{where}: {role}_token {name!r} is not an added token")
        super().__init__(controls, special, size, **roles)

    @staticmethod
    def from_dir(path: str | Path) -> HFTokenizer:
        directory = Path(path)
        require_files(directory, HF_FILE, CONFIG_FILE)
        spec = _read_json(directory / HF_FILE)
        return HFTokenizer(spec, _read_json(directory / CONFIG_FILE), str(directory / HF_FILE))

    @property
    def json(self) -> str:
        """The tokenizer.json text, for engines that read it (llguidance)."""
        return self._json

    def encode(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._piece(i) for i in ids)

    def _piece(self, token_id: int) -> bytes:
        piece = self._pieces[token_id]
        if piece is None:
            raise ValueError(f"token id {token_id} has no token in this vocabulary")
        return piece
