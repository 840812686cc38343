"""The tokenizer of a checkpoint directory, behind one interface (`Tokenizer`).

Kimi K2 ships a tiktoken tokenizer: `tiktoken.model` (one `<base64 token bytes> <rank>` per line,
ranks 0..N-1) and `tokenizer_config.json` (HF format: `added_tokens_decoder`, `bos_token`,
`eos_token`, `pad_token`), read by `TiktokenTokenizer`; the same loader reads a real K2 checkpoint
and the embedded toy model. A checkpoint with an HF `tokenizer.json` instead (DeepSeek-V3, and
most checkpoints written by transformers) is read by `hf_tokenizer.HFTokenizer`, through the
`tokenizers` library. `Tokenizer.from_dir` picks by the files present.

Prompt-injection contract, for both: `encode` never recognises control-token names, so a user
typing "<|im_end|>" gets ordinary text tokens. Control tokens enter a prompt only through
`encode_segments` with is_control=True, which the chat renderer emits for its own markup.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from k2model.text.specials import BOS, EOS, IM_END, PAD, SpecialTable, build_special_table

# docs/text.md, tokenizer, copied from tokenization_kimi.py. tiktoken's fancy-regex understands `&&`.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

RANKS_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"

# As tokenization_kimi.py: tiktoken is fed at most 400,000 chars at a time, and no piece holds a
# run of more than 25,000 whitespace or non-whitespace chars (see tiktoken issue #195 on huge
# runs). Cuts land at the same places as the original's,
# so long inputs tokenize identically to it.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def load_ranks(path: Path) -> dict[bytes, int]:
    """Reads and validates a tiktoken.model file; errors name the file and line."""
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            token, rank = _parse_rank_line(line, f"{path}:{lineno}")
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} appears twice")
            if rank in seen_ranks:
                raise ValueError(f"{path}:{lineno}: rank {rank} appears twice")
            ranks[token] = rank
            seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{path}: no ranks")
    if max(seen_ranks) != len(ranks) - 1:
        missing = min(set(range(len(ranks))) - seen_ranks)
        raise ValueError(f"{path}: ranks are not contiguous from 0 (rank {missing} is missing)")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ValueError(f"{path}: single byte {missing_bytes[0]:#04x} has no rank")
    return ranks


def _parse_rank_line(line: str, where: str) -> tuple[bytes, int]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{where}: expected '<base64 token> <rank>', got {line[:80]!r}")
    try:
        token = base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: non-ASCII text
        raise ValueError(f"{where}: bad base64 token {parts[0][:80]!r}: {e}") from None
    if not (parts[1].isascii() and parts[1].isdigit()):
        raise ValueError(f"{where}: rank {parts[1][:80]!r} is not a non-negative integer")
    if not token:
        raise ValueError(f"{where}: empty token")
    return token, int(parts[1])


def require_files(directory: Path, *names: str) -> None:
    for name in names:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {directory / name}")


def _token_name(config: dict[str, Any], key: str, default: str) -> str:
    # HF writes these either as a plain string or as an AddedToken dict.
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _parse_added_tokens(path: Path, decoder: Any) -> dict[int, tuple[str, bool]]:
    if not isinstance(decoder, dict):
        raise ValueError(f"{path}: added_tokens_decoder is not an object")
    named: dict[int, tuple[str, bool]] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (key.isascii() and key.isdigit()) or not isinstance(content, str):
            raise ValueError(f"{path}: bad added_tokens_decoder entry {key!r}: {entry!r}")
        named[int(key)] = (content, bool(entry.get("special", True)))
    return named


def _load_config(path: Path, n_base: int) -> tuple[SpecialTable, dict[str, str]]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    decoder = config.get("added_tokens_decoder")
    named = None if decoder is None else _parse_added_tokens(path, decoder)
    try:
        table = build_special_table(n_base, named)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    roles = {
        "bos": _token_name(config, "bos_token", BOS),
        "eos": _token_name(config, "eos_token", EOS),
        "pad": _token_name(config, "pad_token", PAD),
    }
    for role, name in roles.items():
        if name not in table.name_to_id:
            raise ValueError(f"{path}: {role}_token {name!r} is not a special token")
    for name in (IM_END, EOS):  # the stop tokens
        if name not in table.name_to_id:
            raise ValueError(f"{path}: no special token {name!r}")
    return table, roles


def long_text_pieces(
    text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS
) -> Iterator[str]:
    """Cuts text like tokenization_kimi.py: max_chars chunks, then a cut every max_run chars
    inside any longer whitespace / non-whitespace run (the run count restarts per chunk)."""
    for start in range(0, len(text), max_chars):
        chunk = text[start : start + max_chars]
        piece_start = 0
        for run in _long_runs(chunk, max_run):
            for cut in range(run.start() + max_run, run.end(), max_run):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


def _long_runs(chunk: str, max_run: int) -> Iterator[re.Match[str]]:
    r"""Maximal whitespace / non-whitespace runs longer than max_run (Python's \s is
    str.isspace(), what the original tests). Shorter runs need no cut, so they are never matched
    and the scan stays inside the regex engine."""
    return re.finditer(rf"\s{{{max_run + 1},}}|\S{{{max_run + 1},}}", chunk)


class Tokenizer(ABC):
    """Text <-> ids over a vocabulary whose control tokens have names: the contract every
    tokenizer of a checkpoint keeps (the chat renderer, detokenizer and grammar engine use only
    this)."""

    def __init__(
        self,
        name_to_id: Mapping[str, int],
        special_ids: frozenset[int],
        vocab_size: int,
        *,
        bos: str,
        eos: str,
        pad: str,
    ) -> None:
        """name_to_id: every control token; special_ids: those a skip-special decode strips."""
        self._name_to_id = dict(name_to_id)
        self._special_ids = special_ids
        self._vocab_size = vocab_size
        self._roles = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
        self._bos_id = name_to_id[bos]
        self._eos_id = name_to_id[eos]
        self._pad_id = name_to_id[pad]
        # The stop set holds both of K2's turn enders where the vocabulary has them, and eos.
        ends = (name_to_id[n] for n in (IM_END, EOS) if n in name_to_id)
        self._stop_ids = frozenset({*ends, self._eos_id})

    @staticmethod
    def from_dir(path: str | Path) -> Tokenizer:
        """tiktoken.model (K2) or tokenizer.json (HF), beside tokenizer_config.json."""
        directory = Path(path)
        if (directory / RANKS_FILE).is_file():
            return TiktokenTokenizer.from_dir(directory)
        if (directory / HF_FILE).is_file():
            from k2model.text.hf_tokenizer import HFTokenizer

            return HFTokenizer.from_dir(directory)
        raise FileNotFoundError(
            f"tokenizer file not found: {directory} has neither {RANKS_FILE} nor {HF_FILE}"
        )

    @property
    def vocab_size(self) -> int:
        """Tokenizer ids (K2: N + 258; the model's embedding has N + 256 rows)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """bos_token / eos_token / pad_token -> names, as HF hands them to chat templates."""
        return dict(self._roles)

    @property
    def control_names(self) -> frozenset[str]:
        return frozenset(self._name_to_id)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def has_special(self, name: str) -> bool:
        return name in self._name_to_id

    def special_id(self, name: str) -> int:
        token_id = self._name_to_id.get(name)
        if token_id is None:
            raise ValueError(f"unknown special token {name!r}")
        return token_id

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """User text -> ids, with no control-token recognition."""

    @abstractmethod
    def _decode_bytes(self, ids: Sequence[int]) -> bytes: ...

    @abstractmethod
    def _piece(self, token_id: int) -> bytes: ...

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """(text, is_control) pairs -> ids; a control segment is exactly one special-token name."""
        ids: list[int] = []
        for text, is_control in segments:
            if is_control:
                ids.append(self.special_id(text))
            else:
                ids.extend(self.encode(text))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        return self._decode_bytes(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_piece(self, token_id: int) -> bytes:
        """The raw bytes of one id; a control id gives its name's UTF-8."""
        self._check_ids((token_id,))
        return self._piece(token_id)

    def _check_ids(self, ids: Sequence[int]) -> None:
        limit = self.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= limit):
            bad = next(i for i in ids if not 0 <= i < limit)
            raise ValueError(f"token id {bad} is out of range [0, {limit})")


class TiktokenTokenizer(Tokenizer):
    """K2's: byte-level BPE over N base ranks plus 258 control ids N..N+257 (see specials.py)."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        table: SpecialTable,
        *,
        bos: str = BOS,
        eos: str = EOS,
        pad: str = PAD,
    ):
        n_special = len(table.name_to_id)
        super().__init__(
            table.name_to_id, table.special_ids, len(ranks) + n_special, bos=bos, eos=eos, pad=pad
        )
        self._n_base = len(ranks)
        self._encoding = tiktoken.Encoding(
            "kimi_k2", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=dict(table.name_to_id)
        )

    @staticmethod
    def from_dir(path: str | Path) -> TiktokenTokenizer:
        directory = Path(path)
        require_files(directory, RANKS_FILE, CONFIG_FILE)
        ranks = load_ranks(directory / RANKS_FILE)
        table, roles = _load_config(directory / CONFIG_FILE, len(ranks))
        return TiktokenTokenizer(ranks, table, **roles)

    @property
    def n_base(self) -> int:
        return self._n_base

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding (ranks, pattern, special tokens) for engines that read it."""
        return self._encoding

    def encode(self, text: str) -> list[int]:
        if len(text) <= MAX_RUN_CHARS:
            return self._encoding.encode_ordinary(text)
        ids: list[int] = []
        for piece in long_text_pieces(text):
            ids.extend(self._encoding.encode_ordinary(piece))
        return ids

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self._encoding.decode_bytes(ids)

    def _piece(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)
