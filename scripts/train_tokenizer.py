"""Trains the embedded toy model's byte-level BPE and writes k2model/embedded/{tiktoken.model,
tokenizer_config.json}, in the same formats as a real Kimi K2 checkpoint.

    python3 scripts/train_tokenizer.py [--corpus DIR] [--out DIR] [--n-base 3840]

Pre-tokenization is K2's own pat_str, so the trained merges never cross a boundary tiktoken
would split at. Ranks 0..255 are the single bytes in byte order; rank 256 + k is merge k.
Each merge takes the adjacent pair with the highest corpus count (pairs counted once per
adjacent position, weighted by pre-token frequency); ties go to the pair whose (left bytes,
right bytes) sorts first. A pair whose concatenation already has a rank is skipped, since
tiktoken ranks byte strings, not merges. The heap order is total (count, then bytes), so the
result never depends on dict or set iteration order: the output is byte-identical run to run.
"""

import argparse
import base64
import heapq
import json
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path

import regex

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from k2model.text.specials import (  # noqa: E402
    BOS,
    EOS,
    K2_SPECIAL_TOKENS,
    PAD,
    UNK,
)
from k2model.text.tokenizer import CONFIG_FILE, PAT_STR, RANKS_FILE  # noqa: E402

N_BASE = 3840  # + 256 model special ids = a 4096-row embedding
CORPUS_DIR = ROOT / "scripts" / "tokenizer_corpus"
OUT_DIR = ROOT / "k2model" / "embedded"


def pretokenizer() -> regex.Pattern[str]:
    """PAT_STR for Python's `regex`: its default (V0) syntax has no class intersection, so
    `[CLASS&&[^\\p{Han}]]` becomes `(?:(?!\\p{Han})[CLASS])`, as tiktoken_ex does for PCRE."""
    translated = re.sub(
        r"\[([^\[\]]*)&&\[\^\\p\{Han\}\]\]",
        lambda m: r"(?:(?!\p{Han})[" + m.group(1) + "])",
        PAT_STR,
    )
    return regex.compile(translated)


def count_pretokens(texts: Iterable[str]) -> Counter[bytes]:
    pattern = pretokenizer()
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(piece.encode("utf-8") for piece in pattern.findall(text))
    return counts


def _merge(word: tuple[int, ...], a: int, b: int, new_id: int) -> tuple[int, ...]:
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train(word_counts: Mapping[bytes, int], n_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE up to n_ranks ranks; keeps pair counts incrementally, so each merge
    touches only the pre-tokens that contain its pair."""
    vocab = [bytes([i]) for i in range(256)]
    ranks = {token: i for i, token in enumerate(vocab)}
    items = sorted(word_counts.items())
    words = [tuple(word) for word, _ in items]
    freqs = [count for _, count in items]
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, word in enumerate(words):
        for pair in pairwise(word):
            pair_counts[pair] += freqs[wi]
            where[pair].add(wi)
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < n_ranks:
        if not heap:
            raise ValueError(f"corpus too small: only {len(vocab)} of {n_ranks} ranks learned")
        neg, left, right, a, b = heapq.heappop(heap)
        if -neg != pair_counts.get((a, b)) or left + right in ranks:
            continue  # stale heap entry, or a byte string that already has a rank
        new_id = len(vocab)
        vocab.append(left + right)
        ranks[left + right] = new_id
        changed: set[tuple[int, int]] = set()
        for wi in where.pop((a, b)):
            old = words[wi]
            new = _merge(old, a, b, new_id)
            if len(new) == len(old):
                continue
            for pair in pairwise(old):
                pair_counts[pair] -= freqs[wi]
                changed.add(pair)
            for pair in pairwise(new):
                pair_counts[pair] += freqs[wi]
                where[pair].add(wi)
                changed.add(pair)
            words[wi] = new
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], vocab[pair[0]], vocab[pair[1]], *pair))
    return ranks


def ranks_text(ranks: Mapping[bytes, int]) -> str:
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ordered)


def config_text(n_base: int) -> str:
    """K2's tokenizer_config.json layout (K2-Thinking's named ids), without the chat template."""
    added = {
        str(n_base + t.offset): {
            "content": t.name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.special,
        }
        for t in K2_SPECIAL_TOKENS
    }
    role_names = {BOS, EOS, UNK, PAD}
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [
            t.name for t in K2_SPECIAL_TOKENS if t.special and t.name not in role_names
        ],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": PAD,
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": UNK,
    }
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"


def read_corpus(corpus_dir: Path) -> list[str]:
    files = sorted(corpus_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no *.txt corpus files in {corpus_dir}")
    return [f.read_text(encoding="utf-8") for f in files]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS_DIR)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--n-base", type=int, default=N_BASE)
    args = parser.parse_args(argv)
    ranks = train(count_pretokens(read_corpus(args.corpus)), args.n_base)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RANKS_FILE).write_text(ranks_text(ranks), encoding="ascii")
    (args.out / CONFIG_FILE).write_text(config_text(args.n_base), encoding="utf-8")
    print(f"wrote {len(ranks)} ranks + {CONFIG_FILE} to {args.out}")


if __name__ == "__main__":
    main()
