"""Write the embedded checkpoint: a tiny K2-architecture model in K2's own block-fp8 format.

Every structural feature of K2 is present (dense first layer, MoE with shared expert and selection
bias, MLA with q/kv low-rank paths, YaRN with beta 1/1, fp8 weights with 128x128 block scales,
untied lm_head) at sizes a laptop CPU serves instantly. The weights are random but deterministic:
`python scripts/make_embedded_checkpoint.py` reproduces k2model/embedded/ byte for byte.
The tokenizer files beside it come from scripts/train_tokenizer.py (vocab 3840 + 256 specials).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from k2model.checkpoint.fp8 import is_quantized_weight_name, quantize_block_fp8
from k2model.checkpoint.quantize import QUANTIZATION_CONFIG
from k2model.checkpoint.random_init import random_weights, tiny_config
from k2model.checkpoint.shards import write_sharded

EMBEDDED = Path(__file__).resolve().parents[1] / "k2model" / "embedded"
N_BASE = 3840  # base BPE ranks of the embedded tokenizer; specials follow at N_BASE + k as in K2

CONFIG = tiny_config(
    vocab_size=N_BASE + 256,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=8192,
    bos_token_id=N_BASE,  # [BOS]
    eos_token_id=N_BASE + 1,  # [EOS]
    quantization_config=QUANTIZATION_CONFIG,
)
SEED = 20250711


def build() -> dict:
    tensors = {}
    for name, t in random_weights(CONFIG, seed=SEED).items():
        if is_quantized_weight_name(name):
            w, scale = quantize_block_fp8(t)
            tensors[name], tensors[name + "_scale_inv"] = w, scale
        else:
            tensors[name] = t
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=EMBEDDED)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    write_sharded(out, build(), max_shard_bytes=2**30, metadata={"format": "pt"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
