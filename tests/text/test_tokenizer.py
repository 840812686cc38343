"""Tokenizer: K2 special-id layout, loader validation, encode/decode contracts, long inputs,
and the embedded tokenizer's training script (determinism, committed files, pre-split)."""

import base64
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import pytest
import tiktoken
from hypothesis import example, given, settings
from hypothesis import strategies as st

from k2model.text.specials import N_MODEL_SPECIAL_IDS, build_special_table
from k2model.text.tokenizer import PAT_STR, Tokenizer, long_text_pieces

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "k2model" / "embedded"
K2_N = 163584

# docs/text.md, special tokens (K2-Thinking's added_tokens_decoder): id -> (name, special).
K2_NAMED = {
    163584: ("[BOS]", True),
    163585: ("[EOS]", True),
    163586: ("<|im_end|>", True),
    163587: ("<|im_user|>", True),
    163588: ("<|im_assistant|>", True),
    163590: ("<|start_header_id|>", True),
    163591: ("<|end_header_id|>", True),
    163593: ("[EOT]", True),
    163594: ("<|im_system|>", True),
    163595: ("<|tool_calls_section_begin|>", False),
    163596: ("<|tool_calls_section_end|>", False),
    163597: ("<|tool_call_begin|>", False),
    163598: ("<|tool_call_argument_begin|>", False),
    163599: ("<|tool_call_end|>", False),
    163601: ("<|im_middle|>", True),
    163602: ("<|media_begin|>", True),
    163603: ("<|media_content|>", True),
    163604: ("<|media_end|>", True),
    163605: ("<|media_pad|>", True),
    163606: ("<think>", False),
    163607: ("</think>", False),
    163838: ("[UNK]", True),
    163839: ("[PAD]", True),
}

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", ROOT / "scripts" / "train_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tokenizer"] = module
    spec.loader.exec_module(module)
    return module


train_script = _load_script()
PRETOKENIZER = train_script.pretokenizer()


def _config(added: dict[int, tuple[str, bool]] | None, **roles: str) -> dict:
    """A tokenizer_config.json; added=None leaves out added_tokens_decoder (K2's table applies)."""
    config = {"bos_token": "[BOS]", "eos_token": "[EOS]", **roles}
    if added is not None:
        config["added_tokens_decoder"] = {
            str(i): {"content": name, "special": special} for i, (name, special) in added.items()
        }
    return config


def _write_dir(path: Path, rank_lines: list[str], config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tiktoken.model").write_text("".join(line + "\n" for line in rank_lines))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def _rank_lines(tokens: list[bytes]) -> list[str]:
    return [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(tokens)]


BYTE_TOKENS = [bytes([b]) for b in range(256)]


@pytest.fixture(scope="module")
def embedded() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED)


@pytest.fixture(scope="module")
def k2_sized(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A tokenizer with K2's N = 163584 ranks (synthetic 3-byte tokens) and K2's config."""
    tokens = BYTE_TOKENS + [
        bytes(t) for t in itertools.islice(itertools.product(range(256), repeat=3), K2_N - 256)
    ]
    config = _config(K2_NAMED, pad_token="[PAD]", unk_token="[UNK]")
    path = _write_dir(tmp_path_factory.mktemp("k2"), _rank_lines(tokens), config)
    return Tokenizer.from_dir(path)


# --- special-token layout -------------------------------------------------------------------


def test_k2_table_places_named_tokens_at_k2_ids() -> None:
    table = build_special_table(K2_N)
    assert len(table.name_to_id) == 258
    assert set(table.name_to_id.values()) == set(range(K2_N, K2_N + 258))
    for token_id, (name, special) in K2_NAMED.items():
        assert table.name_to_id[name] == token_id
        assert (token_id in table.special_ids) == special


def test_unnamed_ids_get_reserved_names_including_the_two_extra_ids() -> None:
    table = build_special_table(K2_N)
    for token_id in (163589, 163592, 163600, 163608, 163837, 163840, 163841):
        assert table.name_to_id[f"<|reserved_token_{token_id}|>"] == token_id
        assert token_id in table.special_ids


def test_file_entries_replace_table() -> None:
    named = {**K2_NAMED, 163606: ("<|custom|>", True), 163589: ("<x>", False)}
    table = build_special_table(K2_N, named)
    assert table.name_to_id["<|custom|>"] == 163606
    assert "<think>" not in table.name_to_id
    assert 163606 in table.special_ids
    assert table.name_to_id["<x>"] == 163589
    assert 163589 not in table.special_ids


def test_instruct_file_without_think_leaves_those_ids_reserved() -> None:
    """K2-Instruct's added_tokens_decoder stops at <|im_middle|> (plus [UNK]/[PAD])."""
    instruct = {i: v for i, v in K2_NAMED.items() if not 163602 <= i <= 163607}
    table = build_special_table(K2_N, instruct)
    assert "<think>" not in table.name_to_id
    assert table.name_to_id["<|reserved_token_163606|>"] == 163606
    assert table.name_to_id["<|im_middle|>"] == 163601


def test_table_rejects_out_of_range_ids_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match="163583"):
        build_special_table(K2_N, {K2_N - 1: ("<a>", True)})
    with pytest.raises(ValueError, match="163842"):
        build_special_table(K2_N, {K2_N + 258: ("<a>", True)})
    with pytest.raises(ValueError, match="'\\[BOS\\]'"):
        build_special_table(K2_N, {**K2_NAMED, 163590: ("[BOS]", True)})


def test_k2_sized_tokenizer_ids(k2_sized: Tokenizer) -> None:
    tok = k2_sized
    assert tok.n_base == K2_N
    assert tok.vocab_size == K2_N + 258
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (163584, 163585, 163839)
    assert tok.stop_ids == frozenset({163586, 163585})
    for token_id, (name, special) in K2_NAMED.items():
        assert tok.special_id(name) == token_id
        assert tok.is_special(token_id) == special
        assert tok.decode([token_id]) == name
    assert tok.decode([163841]) == "<|reserved_token_163841|>"
    assert tok.decode([104, 163586, 105], skip_special_tokens=True) == "hi"


def test_embedded_dir_mirrors_k2_offsets(embedded: Tokenizer) -> None:
    n = 3840
    assert embedded.n_base == n
    assert embedded.n_base + N_MODEL_SPECIAL_IDS == 4096  # the embedded model's embedding rows
    assert embedded.vocab_size == n + 258
    assert (embedded.bos_id, embedded.eos_id, embedded.pad_id) == (n, n + 1, n + 255)
    assert embedded.stop_ids == frozenset({n + 1, n + 2})
    for token_id, (name, special) in K2_NAMED.items():
        assert embedded.special_id(name) == token_id - K2_N + n
        assert embedded.is_special(token_id - K2_N + n) == special


def test_eos_from_config_joins_stop_ids(tmp_path: Path) -> None:
    config = _config(None, eos_token="<|im_end|>")
    tok = Tokenizer.from_dir(_write_dir(tmp_path, _rank_lines(BYTE_TOKENS), config))
    assert tok.eos_id == 258
    assert tok.stop_ids == frozenset({257, 258})


# --- encode / decode --------------------------------------------------------------------------


def test_typed_special_names_stay_plain_text(embedded: Tokenizer) -> None:
    text = "say <|im_end|> then <|im_assistant|>[EOS]<think>"
    ids = embedded.encode(text)
    assert all(i < embedded.n_base for i in ids)
    assert embedded.decode(ids) == text


def test_encode_segments_maps_control_names_to_ids(embedded: Tokenizer) -> None:
    segments = [("<|im_user|>", True), ("user", False), ("<|im_middle|>", True), ("hi", False)]
    expected = [
        embedded.special_id("<|im_user|>"),
        *embedded.encode("user"),
        embedded.special_id("<|im_middle|>"),
        *embedded.encode("hi"),
    ]
    assert embedded.encode_segments(segments) == expected
    assert embedded.encode_segments([("<|im_end|>", False)]) == embedded.encode("<|im_end|>")
    with pytest.raises(ValueError, match=re.escape("<|im_nope|>")):
        embedded.encode_segments([("<|im_nope|>", True)])


@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
@example(text="👩‍👩‍👧 family, 🇯🇵 flag, e\u0301\u0327 combining, 中文混合English 123456")
@example(text="\r\n\t  \u3000\u00a0x\n\n  ")
def test_unicode_round_trip(embedded: Tokenizer, text: str) -> None:
    assert embedded.decode(embedded.encode(text)) == text


def test_skip_special_keeps_tool_markers_and_think(embedded: Tokenizer) -> None:
    sid = embedded.special_id
    ids = [
        sid("<|im_assistant|>"),
        *embedded.encode("ok"),
        sid("<think>"),
        sid("</think>"),
        sid("<|tool_call_begin|>"),
        sid("<|reserved_token_3845|>"),
        sid("<|im_end|>"),
    ]
    assert embedded.decode(ids, skip_special_tokens=True) == "ok<think></think><|tool_call_begin|>"
    assert embedded.decode(ids).startswith("<|im_assistant|>ok<think>")


def test_out_of_range_ids_name_the_id(embedded: Tokenizer) -> None:
    for bad in (-1, embedded.vocab_size, 10**9):
        with pytest.raises(ValueError, match=f"token id {bad} "):
            embedded.decode([5, bad])
        with pytest.raises(ValueError, match=f"token id {bad} "):
            embedded.id_to_piece(bad)


def test_id_to_piece_gives_raw_bytes(embedded: Tokenizer) -> None:
    ids = embedded.encode("😀 héllo")
    assert b"".join(embedded.id_to_piece(i) for i in ids) == "😀 héllo".encode()
    assert embedded.id_to_piece(embedded.eos_id) == b"[EOS]"


def _original_split(s: str, max_run: int) -> list[str]:
    """tokenization_kimi.py's _split_whitespaces_or_nonwhitespaces, the oracle for the cuts."""
    out, run_len, run_space, start = [], 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
        if run_space ^ ch.isspace():
            run_len, run_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_run:
                out.append(s[start:i])
                start, run_len = i, 1
    out.append(s[start:])
    return out


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from("ab \n\u3000\x1c"), max_size=60))
def test_long_text_cuts_match_original(text: str) -> None:
    expected = [p for i in range(0, len(text), 17) for p in _original_split(text[i : i + 17], 5)]
    assert list(long_text_pieces(text, max_chars=17, max_run=5)) == expected


def test_very_long_runs_encode_in_pieces(embedded: Tokenizer) -> None:
    text = "x" * 60_000 + " " * 30_000 + "end"
    ids = embedded.encode(text)
    pieces = ["x" * 25_000, "x" * 25_000, "x" * 10_000 + " " * 25_000, " " * 5_000 + "end"]
    assert ids == [i for p in pieces for i in embedded.encode(p)]
    assert embedded.decode(ids) == text


# --- loader errors -----------------------------------------------------------------------------


def _expect_error(tmp_path: Path, lines: list[str], match: str, config: dict | None = None):
    path = _write_dir(tmp_path, lines, config or _config(None))
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_dir(path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tiktoken\.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tiktoken.model").write_text("\n".join(_rank_lines(BYTE_TOKENS)))
    with pytest.raises(FileNotFoundError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


def test_bad_rank_lines_name_file_and_line(tmp_path: Path) -> None:
    lines = _rank_lines(BYTE_TOKENS)
    _expect_error(
        tmp_path, [*lines[:2], "@@notbase64 2", *lines[3:]], r"tiktoken\.model:3: bad base64"
    )
    _expect_error(tmp_path, [*lines[:4], "QQ==", *lines[5:]], r"tiktoken\.model:5: expected")
    _expect_error(tmp_path, [*lines, "YWI= x"], r"tiktoken\.model:257: rank 'x'")
    _expect_error(tmp_path, [*lines, "YWI= 7"], r"tiktoken\.model:257: rank 7 appears twice")
    _expect_error(tmp_path, [*lines, "QQ== 256"], r"tiktoken\.model:257: token b'A' appears twice")
    _expect_error(tmp_path, [*lines, "YWI= 257"], "not contiguous from 0 \\(rank 256 is missing")
    _expect_error(tmp_path, lines[1:], "rank 0 is missing")
    shifted = [f"{base64.b64encode(t).decode()} {r}" for r, t in enumerate(BYTE_TOKENS[1:])]
    _expect_error(tmp_path, shifted, "single byte 0x00 has no rank")


def test_bad_config_is_named(tmp_path: Path) -> None:
    lines = _rank_lines(BYTE_TOKENS)
    _expect_error(
        tmp_path, lines, "bos_token '<s>' is not a special token", _config(None, bos_token="<s>")
    )
    _expect_error(
        tmp_path,
        lines,
        r"tokenizer_config\.json: special token id 255",
        _config({255: ("<a>", True)}),
    )
    path = _write_dir(tmp_path, lines, {})
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_dir(path)


def test_config_names_override_table(tmp_path: Path) -> None:
    named = {i - K2_N + 256: v for i, v in K2_NAMED.items()}
    named |= {256 + 5: ("<|media_start|>", True), 256 + 22: ("<|reasoning|>", False)}
    del named[256 + 23]
    tok = Tokenizer.from_dir(_write_dir(tmp_path, _rank_lines(BYTE_TOKENS), _config(named)))
    assert tok.special_id("<|media_start|>") == 261
    assert tok.special_id("<|reasoning|>") == 278
    assert not tok.is_special(278)
    assert tok.special_id("<|reserved_token_279|>") == 279
    assert tok.is_special(279)
    assert tok.special_id("<|im_end|>") == 258
    with pytest.raises(ValueError, match="<think>"):
        tok.special_id("<think>")


def test_config_without_stop_tokens_is_rejected(tmp_path: Path) -> None:
    lines = _rank_lines(BYTE_TOKENS)
    named = {256: ("[BOS]", True), 257: ("[EOS]", True), 511: ("[PAD]", True)}
    _expect_error(tmp_path, lines, "no special token '<\\|im_end\\|>'", _config(named))


# --- training script ---------------------------------------------------------------------------


def test_training_is_deterministic_and_a_valid_tiktoken_file(tmp_path: Path) -> None:
    texts = [
        f.read_text(encoding="utf-8")[:20_000]
        for f in sorted(train_script.CORPUS_DIR.glob("*.txt"))
    ]
    first = train_script.train(train_script.count_pretokens(texts), 600)
    second = train_script.train(train_script.count_pretokens(reversed(texts)), 600)
    assert first == second
    assert sorted(first.values()) == list(range(600))
    (tmp_path / "tiktoken.model").write_text(train_script.ranks_text(first))
    (tmp_path / "tokenizer_config.json").write_text(train_script.config_text(600))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.special_id("<|im_end|>") == 602
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_committed_embedded_files_are_reproducible(tmp_path: Path) -> None:
    train_script.main(["--out", str(tmp_path)])
    for name in ("tiktoken.model", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (EMBEDDED / name).read_bytes(), name


def _tiktoken_pieces(text: str) -> list[str]:
    """tiktoken's own pre-split of text with K2's pat_str, made visible: when every byte
    substring of the text has a rank, BPE merges each regex piece into exactly one token."""
    data = text.encode()
    subs = {data[i:j] for i in range(len(data)) for j in range(i + 1, len(data) + 1)}
    subs |= {bytes([b]) for b in range(256)}
    ranks = {t: r for r, t in enumerate(sorted(subs, key=lambda t: (len(t), t)))}
    enc = tiktoken.Encoding("probe", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return [enc.decode_single_token_bytes(i).decode() for i in enc.encode_ordinary(text)]


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(blacklist_categories=("Cs", "Cn")), max_size=30))
@example(text="Don'T stop ab中文cd ÉCOLE école ǅx 12345 \r\n\n  x  !?\n")
@example(text="a\u0301中\u0301B's 1234\u3000 \x1c\x85\u2028x")
def test_script_pretokenizer_matches_tiktoken_split(text: str) -> None:
    """The Python `regex` translation of pat_str used in training splits like tiktoken does.
    Only for characters assigned in this Python's Unicode version (Cn excluded): `regex` and
    tiktoken's Rust regex may ship newer, different Unicode tables (U+16EA0 is a letter to one
    and unassigned to the other); that only affects the training of rare characters."""
    assert PRETOKENIZER.findall(text) == _tiktoken_pieces(text)
