"""Constrained decoding's cost per token on a K2-sized vocabulary (k2model/constraints.py).

    python3 bench/constraints.py [--steps 300] [--out bench/results/constraints.json]

The vocabulary: 163,840 ids like K2's (163,584 byte-level pieces: the 256 single bytes and
random 2-10 byte pieces of ASCII and UTF-8 text, then K2's control tokens), as a tiktoken
encoding, so llguidance sees K2's size. One forced tool call with a many-typed JSON Schema
(strings without bounds, enums, integers, numbers, arrays, an anyOf, a $ref) is walked for
`--steps` tokens (choices drawn from the mask, preferring closers so strings end). Per step:
the time to compute the mask (`ConstraintState.allowed`, llguidance's bitmask unpacked to a
bool [163,840]) and to consume the token; the reference, in the same run, is the sampler's own
masked greedy pick over 163,840 logits (`masked_fill` + `argmax`), the work a mask must be
cheap beside. Prints p50 / p99 of each and their ratio to the reference; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import tiktoken
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, write_json  # noqa: E402
from k2model.constraint_spec import ConstraintSpec, ToolSchema  # noqa: E402
from k2model.constraints import ConstraintCompiler, Vocabulary  # noqa: E402
from k2model.text import chat_tokens as tok  # noqa: E402
from k2model.text.tokenizer import PAT_STR  # noqa: E402

VOCAB = 163_840
BASE = 163_584
CONTROLS = (
    tok.IM_END,
    tok.SECTION_BEGIN,
    tok.SECTION_END,
    tok.CALL_BEGIN,
    tok.ARG_BEGIN,
    tok.CALL_END,
)
SCHEMA = {
    "type": "object",
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}}}},
    "properties": {
        "query": {"type": "string"},
        "path": {"type": "string", "pattern": "^/[a-z/]+$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1},
        "temp": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "kind": {"anyOf": [{"const": "a"}, {"type": "integer"}]},
        "where": {"$ref": "#/$defs/place"},
    },
    "required": ["query", "unit", "days"],
}
ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;{}[]\"'-_/\\日本語ñé"


def k2_sized_encoding(seed: int = 0) -> tuple[tiktoken.Encoding, dict[str, int]]:
    rng = random.Random(seed)
    pieces = [bytes([b]) for b in range(256)]
    seen = set(pieces)
    while len(pieces) < BASE:
        piece = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 10))).encode()
        if piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    specials = {name: BASE + k for k, name in enumerate(CONTROLS)}
    encoding = tiktoken.Encoding(
        "k2_sized",
        pat_str=PAT_STR,
        mergeable_ranks={p: i for i, p in enumerate(pieces)},
        special_tokens=specials,
    )
    return encoding, specials


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/constraints.json")
    args = ap.parse_args()
    started = time.perf_counter()
    encoding, specials = k2_sized_encoding()
    vocab = Vocabulary(encoding, specials, specials[tok.IM_END], VOCAB)
    built = time.perf_counter() - started
    spec = ConstraintSpec(tools=(ToolSchema("search", json.dumps(SCHEMA)),))
    compile_start = time.perf_counter()
    state = ConstraintCompiler(vocab).start(spec)
    compiled = time.perf_counter() - compile_start
    closers = {encoding.encode_single_token(c) for c in '"}],0123456789'} | set(specials.values())
    rng, logits = random.Random(1), torch.randn(1, VOCAB)
    mask_ms, consume_ms, sample_ms, steps = [], [], [], 0
    while steps < args.steps:
        t0 = time.perf_counter()
        mask = state.allowed()
        t1 = time.perf_counter()
        if mask is None:  # the call is finished: walk another
            state = ConstraintCompiler(vocab).start(spec)
            continue
        pick = int(logits.masked_fill(~mask, float("-inf")).argmax())
        t2 = time.perf_counter()
        allowed = mask.nonzero().flatten().tolist()
        closing = [t for t in allowed if t in closers]
        token = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        assert mask[pick]
        t3 = time.perf_counter()
        state.advance(token)
        t4 = time.perf_counter()
        mask_ms.append(1e3 * (t1 - t0))
        sample_ms.append(1e3 * (t2 - t1))
        consume_ms.append(1e3 * (t4 - t3))
        steps += 1
    ref = statistics.median(sample_ms)
    rows = [
        [name, percentile(v, 50), percentile(v, 99), percentile(v, 50) / ref]
        for name, v in (("mask", mask_ms), ("consume", consume_ms), ("masked argmax", sample_ms))
    ]
    print(
        f"vocabulary {VOCAB:,} ids (built in {built:.1f} s), grammar compiled in {1e3 * compiled:.1f} ms"
    )
    print(format_table(["per token", "p50 ms", "p99 ms", "p50 / masked argmax"], rows))
    write_json(
        args.out,
        {
            "vocab": VOCAB,
            "steps": steps,
            "compile_ms": 1e3 * compiled,
            "rows": [
                dict(zip(["what", "p50_ms", "p99_ms", "ratio"], r, strict=True)) for r in rows
            ],
        },
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
