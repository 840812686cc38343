"""Prefill attention: the fused form (MLA._naive, scaled_dot_product_attention) against its
written-out twin (MLA.naive_reference: scores, masked softmax, values), on this machine's CPU.

    python3 bench/prefill_attention.py [--batch 4] [--prompt-len 512] [--heads 8]
                                       [--out bench/results/prefill_attention.json]

One MLA layer at K2's latent width (kv_lora_rank 512 + rope 64, nope 64, v 64 as in
bench/serving.py's checkpoint), `--batch` prompts of `--prompt-len` tokens each (ragged: the
last one is half as long), in fp32 and bf16. Per case: the median of 5 runs of each form, their
ratio and the largest difference between the two outputs (relative to the largest value).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, median_ms, write_json  # noqa: E402
from k2model.batch import SeqSlice, build_batch  # noqa: E402
from k2model.config import K2Config  # noqa: E402
from k2model.mla import MLA  # noqa: E402
from k2model.runtime import Runtime  # noqa: E402


def layer(heads: int, dtype: torch.dtype) -> MLA:
    from k2model.checkpoint.random_init import tiny_config

    cfg = K2Config.from_dict(
        tiny_config(
            hidden_size=512,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            q_lora_rank=256,
            kv_lora_rank=512,
            qk_nope_head_dim=64,
            qk_rope_head_dim=64,
            v_head_dim=64,
        )
    )
    attn = MLA(cfg, 0, Runtime.resolve(dtype))
    torch.nn.init.normal_(attn.kv_b.weight, std=0.05)
    return attn


def case(batch: int, length: int, heads: int, dtype: torch.dtype) -> dict[str, object]:
    attn = layer(heads, dtype)
    lengths = [length] * (batch - 1) + [max(1, length // 2)]
    blocks, slices = 16, []
    for n in lengths:
        first = sum(len(s.block_table) for s in slices)
        slices.append(SeqSlice(0, n, list(range(first, first + -(-n // blocks)))))
    meta = build_batch(slices, blocks)
    g = torch.Generator().manual_seed(0)
    b, q_len, n_ctx = *meta.q_valid.shape, meta.ctx_slots.shape[1]
    q_nope = torch.randn(b, q_len, heads, attn.d_n, generator=g).to(dtype)
    q_pe = torch.randn(b, q_len, heads, attn.d_r, generator=g).to(dtype)
    ctx = torch.randn(b, n_ctx, attn.r + attn.d_r, generator=g).to(dtype)
    with torch.inference_mode():
        fused = attn._naive(q_nope, q_pe, ctx, meta.mask)[meta.q_valid].float()
        written = attn.naive_reference(q_nope, q_pe, ctx, meta.mask)[meta.q_valid].float()
        fused_ms = median_ms(lambda: attn._naive(q_nope, q_pe, ctx, meta.mask))
        written_ms = median_ms(lambda: attn.naive_reference(q_nope, q_pe, ctx, meta.mask))
    diff = float((fused - written).abs().max() / written.abs().max())
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "prompt_len": length,
        "heads": heads,
        "fused_ms": fused_ms,
        "written_out_ms": written_ms,
        "speedup": written_ms / fused_ms,
        "max_rel_diff": diff,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/prefill_attention.json")
    args = ap.parse_args()
    rows = [
        case(args.batch, args.prompt_len, args.heads, dtype)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    keys = list(rows[0])
    print(format_table(keys, [[r[k] for k in keys] for r in rows]))
    write_json(args.out, {"threads": torch.get_num_threads(), "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
