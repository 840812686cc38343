"""Kimi K2's special-token layout as data, and its resolution against a checkpoint's file.

K2 numbers its control tokens after the base (BPE) vocabulary of N ranks: id = N + offset.
For K2, N = 163584, so [BOS] = 163584, <|im_end|> = 163586, [PAD] = 163839. The embedded model
uses the same offsets with N = 3840.

The tokenizer holds N + 258 ids, like the original `tokenization_kimi.py`, which builds
`range(N, N + 256 + 2)`. The model's embedding has only N + 256 rows, so the last two ids
(N + 256, N + 257) exist in the tokenizer alone and a model never produces them.

K2_SPECIAL_TOKENS below is K2-Thinking's layout; it names the ids of a config that has no
added_tokens_decoder and of the embedded model's config. A checkpoint's added_tokens_decoder
replaces it, as in the original. An id without a name is called `<|reserved_token_{absolute id}|>`. "Special" decides what
`decode(skip_special_tokens=True)` strips: named control tokens flagged special in K2's
tokenizer_config.json, plus every reserved id (they carry no text and are never meant to be
produced; the original leaves their placeholder names in the output, we drop them). The
tool-call markers and <think> / </think> are NOT special: text-level tool and reasoning parsers
must still see them after a skip-special decode.
"""

from collections.abc import Mapping
from dataclasses import dataclass

N_SPECIAL_IDS = 258  # ids N .. N+257 in the tokenizer
N_MODEL_SPECIAL_IDS = 256  # ids N .. N+255 in the model's embedding / lm_head

BOS, EOS, IM_END, UNK, PAD = "[BOS]", "[EOS]", "<|im_end|>", "[UNK]", "[PAD]"


@dataclass(frozen=True)
class SpecialToken:
    offset: int  # id - N
    name: str
    special: bool  # stripped by decode(skip_special_tokens=True)


# docs/text.md, special tokens, K2-Thinking's names (K2-Instruct's file lacks the media tokens and <think>s).
K2_SPECIAL_TOKENS: tuple[SpecialToken, ...] = (
    SpecialToken(0, BOS, True),
    SpecialToken(1, EOS, True),
    SpecialToken(2, IM_END, True),
    SpecialToken(3, "<|im_user|>", True),
    SpecialToken(4, "<|im_assistant|>", True),
    SpecialToken(6, "<|start_header_id|>", True),
    SpecialToken(7, "<|end_header_id|>", True),
    SpecialToken(9, "[EOT]", True),
    SpecialToken(10, "<|im_system|>", True),
    SpecialToken(11, "<|tool_calls_section_begin|>", False),
    SpecialToken(12, "<|tool_calls_section_end|>", False),
    SpecialToken(13, "<|tool_call_begin|>", False),
    SpecialToken(14, "<|tool_call_argument_begin|>", False),
    SpecialToken(15, "<|tool_call_end|>", False),
    SpecialToken(17, "<|im_middle|>", True),
    SpecialToken(18, "<|media_begin|>", True),
    SpecialToken(19, "<|media_content|>", True),
    SpecialToken(20, "<|media_end|>", True),
    SpecialToken(21, "<|media_pad|>", True),
    SpecialToken(22, "<think>", False),
    SpecialToken(23, "</think>", False),
    SpecialToken(254, UNK, True),
    SpecialToken(255, PAD, True),
)


def reserved_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


@dataclass(frozen=True)
class SpecialTable:
    """The resolved control ids of one tokenizer: N_SPECIAL_IDS unique names, ids N .. N+257."""

    n_base: int
    name_to_id: Mapping[str, int]
    special_ids: frozenset[int]  # the ids stripped by a skip-special decode


def k2_named(n_base: int) -> dict[int, tuple[str, bool]]:
    """K2's table as id -> (name, special), the shape of a tokenizer_config's added_tokens_decoder."""
    return {n_base + t.offset: (t.name, t.special) for t in K2_SPECIAL_TOKENS}


def build_special_table(
    n_base: int, named: Mapping[int, tuple[str, bool]] | None = None
) -> SpecialTable:
    """Resolves ids N .. N+257 from `named` (a checkpoint's added_tokens_decoder; None means K2's
    table). As in tokenization_kimi.py, the file is authoritative: an id it does not name is
    reserved, so a K2-Instruct checkpoint has no <think> even though K2-Thinking's table does.
    Raises ValueError for a named id outside the range or a name used twice."""
    named = k2_named(n_base) if named is None else named
    for token_id in named:
        if not n_base <= token_id < n_base + N_SPECIAL_IDS:
            raise ValueError(
                f"special token id {token_id} is outside the special range "
                f"{n_base}..{n_base + N_SPECIAL_IDS - 1}"
            )
    name_to_id: dict[str, int] = {}
    special_ids: set[int] = set()
    for token_id in range(n_base, n_base + N_SPECIAL_IDS):
        name, special = named.get(token_id, (reserved_name(token_id), True))
        if name in name_to_id:
            raise ValueError(
                f"special token name {name!r} is used by ids {name_to_id[name]} and {token_id}"
            )
        name_to_id[name] = token_id
        if special:
            special_ids.add(token_id)
    return SpecialTable(n_base, name_to_id, frozenset(special_ids))
