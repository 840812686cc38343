"""IncrementalDetokenizer on the embedded tokenizer: deltas concatenate to the one-shot decode,
multi-byte characters split across tokens are never emitted broken, work is per new id."""

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from k2model.text.detokenizer import IncrementalDetokenizer
from k2model.text.tokenizer import TiktokenTokenizer, Tokenizer

EMBEDDED = Path(__file__).resolve().parents[2] / "k2model" / "embedded"
TOKENIZER = Tokenizer.from_dir(EMBEDDED)

ids_strategy = st.lists(st.integers(0, TOKENIZER.vocab_size - 1), max_size=60)
text_strategy = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)


def _batches(ids: list[int], cuts: list[int]) -> list[list[int]]:
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in itertools.pairwise(points)]


def _stream(ids: list[int], cuts: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(TOKENIZER, skip_special_tokens=skip)
    return [detok.push(batch) for batch in _batches(ids, cuts)] + [detok.flush()]


@settings(max_examples=400, deadline=None)
@given(ids=ids_strategy, cuts=st.lists(st.integers(0, 100)), skip=st.booleans())
def test_deltas_concatenate_to_full_decode(ids: list[int], cuts: list[int], skip: bool) -> None:
    full = TOKENIZER.decode(ids, skip_special_tokens=skip)
    deltas = _stream(ids, cuts, skip)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=300, deadline=None)
@given(text=text_strategy, cuts=st.lists(st.integers(0, 200)))
@example(text="😀🇯🇵中文 é\u0301", cuts=list(range(40)))
def test_encoded_text_streams_back_without_broken_chars(text: str, cuts: list[int]) -> None:
    deltas = _stream(TOKENIZER.encode(text), cuts, skip=False)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_partial_character_is_held_until_complete() -> None:
    ids = TOKENIZER.encode("😀")
    assert len(ids) > 1, "the emoji must span several byte-level tokens for this test"
    detok = IncrementalDetokenizer(TOKENIZER)
    assert [detok.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detok.flush() == ""


def test_truncated_character_becomes_replacement_at_flush() -> None:
    lead = TOKENIZER.encode("😀")[0]
    detok = IncrementalDetokenizer(TOKENIZER)
    assert detok.push(TOKENIZER.encode("ok") + [lead]) == "ok"
    assert detok.flush() == "\ufffd"
    assert TOKENIZER.decode(TOKENIZER.encode("ok") + [lead]) == "ok\ufffd"


def test_skip_special_drops_control_names_but_keeps_tool_markers() -> None:
    sid = TOKENIZER.special_id
    ids = [sid("<|im_middle|>"), *TOKENIZER.encode("hi"), sid("<|tool_call_begin|>"), sid("[EOS]")]
    detok = IncrementalDetokenizer(TOKENIZER, skip_special_tokens=True)
    assert [detok.push([i]) for i in ids] == ["", "hi", "<|tool_call_begin|>", ""]


def test_out_of_range_id_is_rejected() -> None:
    with pytest.raises(ValueError, match=f"token id {TOKENIZER.vocab_size} "):
        IncrementalDetokenizer(TOKENIZER).push([TOKENIZER.vocab_size])


class _CountingTokenizer(TiktokenTokenizer):
    """Records how many ids each decode_bytes call is asked for."""

    def __init__(self, inner: Tokenizer):
        self.__dict__.update(inner.__dict__)
        self.calls: list[int] = []

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self.calls.append(len(ids))
        return super().decode_bytes(ids)


def test_each_id_is_decoded_once() -> None:
    """O(1) amortised work per token: a push never re-decodes earlier ids."""
    counting = _CountingTokenizer(TOKENIZER)
    ids = TOKENIZER.encode("streaming 中文 text with emoji 😀 " * 20)
    detok = IncrementalDetokenizer(counting)
    for i in ids:
        detok.push([i])
    assert counting.calls == [1] * len(ids)
