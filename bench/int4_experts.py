"""One MoE layer's routed experts on this machine's CPU, by how the weights are held: INT4
packed (the C++ op widening each weight row in registers), bf16-resident (the C++ op), and the
INT4 torch twin (each active expert dequantised, then matmuls), same weights, same routing.

    python3 bench/int4_experts.py [--dim 2048] [--inter 768] [--experts 64] [--top-k 8]
                                  [--out bench/results/int4_experts.json]

Decode on a CPU is bound by the bytes of weights each step reads; INT4 reads a quarter of
bf16's (plus a bf16 scale per 32 weights). Per batch size (tokens per step): the median of 15
calls of each, ratios against bf16-resident, and the largest difference between INT4 and its
twin (relative to the largest value).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, median_ms, write_json  # noqa: E402
from k2model.checkpoint.int4 import dequantize_int4, quantize_int4  # noqa: E402
from k2model.moe import LocalExperts  # noqa: E402
from k2model.runtime import Runtime  # noqa: E402

RUNS = 15


def layers(experts: int, dim: int, inter: int) -> tuple[LocalExperts, LocalExperts]:
    """(INT4, bf16-resident) holding the same weights (the bf16 ones dequantised from INT4)."""
    rt = Runtime.resolve(torch.float32, "cpu", "cpu")
    int4, bf16 = LocalExperts(experts, dim, inter, rt), LocalExperts(experts, dim, inter, rt)
    trios = [
        tuple(
            quantize_int4(torch.randn(s) * 0.05) for s in ((inter, dim), (inter, dim), (dim, inter))
        )
        for _ in range(experts)
    ]
    int4.set_int4(trios)
    bf16.hold(torch.bfloat16)
    for e, (g, u, d) in enumerate(trios):
        bf16.gate_up[e, :inter] = dequantize_int4(*g, torch.bfloat16)
        bf16.gate_up[e, inter:] = dequantize_int4(*u, torch.bfloat16)
        bf16.down[e] = dequantize_int4(*d, torch.bfloat16)
    return int4, bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 4, 16], help="tokens per call (batch sizes)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/int4_experts.json")
    args = ap.parse_args()
    int4, bf16 = layers(args.experts, args.dim, args.inter)
    rows, results = [], []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.dim)
        ids = torch.stack([torch.randperm(args.experts)[: args.top_k] for _ in range(tokens)])
        w = torch.rand(tokens, args.top_k)
        got, twin = int4(x, ids, w), int4.grouped(x, ids, w)
        err = float((got - twin).abs().max() / twin.abs().max())
        batch = (x, ids, w)
        ms = {
            "int4": median_ms(lambda b=batch: int4(*b), RUNS),
            "bf16": median_ms(lambda b=batch: bf16(*b), RUNS),
            "int4_twin": median_ms(lambda b=batch: int4.grouped(*b), RUNS),
        }
        rows.append([tokens, ms["int4"], ms["bf16"], ms["int4_twin"], ms["bf16"] / ms["int4"], err])
        results.append({"tokens": tokens, "ms": ms, "int4_vs_twin_max_rel": err})
    headers = ["tokens", "int4 ms", "bf16 ms", "int4 twin ms", "bf16 / int4", "int4 vs twin"]
    print(format_table(headers, rows))
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
