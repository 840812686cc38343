"""Decode throughput and resident bytes of one model held three ways: bf16-resident, fp8-resident
(K2-Instruct's block-fp8) and INT4-resident (K2-Thinking's packed routed experts), in one run.

    python3 bench/model.py --format int4 [--quick] [--out bench/results/model_formats.json]

One random bf16 checkpoint at K2's MLA latent width (bench/model.py's config) with a routed-expert
share of the weights closer to K2's (64 experts of width 512: 89% of the bf16 bytes; K2's are ~97%),
converted by `python -m k2model.checkpoint.quantize` into the block-fp8 and the `--int4` formats.
Each is loaded with the default ops backend (the C++ extension where it is built) computing in
fp32, and generates greedily at batch 1/16/64 as bench/model.py times it; ratios are against
bf16-resident in the same run. The three hold different weights (each format rounds its own way),
so their tokens are not compared here: tests/model/test_int4_model.py holds INT4 to its
dequantised twin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.model import BATCHES, BENCH_CONFIG, SEED, Row, Settings, k2model_engine, measure
from bench.model import random_prompts as prompts_for
from k2model.checkpoint.loader import load_model
from k2model.checkpoint.quantize import quantize_checkpoint
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.model import K2Model

FORMATS_CONFIG = {**BENCH_CONFIG, "n_routed_experts": 64, "moe_intermediate_size": 512}


def build_checkpoints(root: Path) -> dict[str, Path]:
    cfg = tiny_config(**FORMATS_CONFIG)
    bf16 = write_checkpoint(root / "bf16", cfg, random_weights(cfg, seed=SEED))
    quantize_checkpoint(bf16, root / "fp8", fmt="fp8")
    quantize_checkpoint(bf16, root / "int4", fmt="int4")
    return {"bf16": bf16, "fp8": root / "fp8", "int4": root / "int4"}


def load(fmt: str, path: Path) -> K2Model:
    return load_model(path, dtype=torch.float32, fp8_resident=fmt == "fp8", progress=False)


def resident_bytes(model: K2Model) -> dict[str, int]:
    """Every parameter and buffer, and the routed experts' share."""
    total = experts = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        n = t.numel() * t.element_size()
        total += n
        experts += n if ".experts." in f".{name}" else 0
    return {"total": total, "routed_experts": experts}


def run_formats(root: Path, s: Settings) -> dict[str, Any]:
    paths = build_checkpoints(root)
    models = {fmt: load(fmt, path) for fmt, path in paths.items()}
    engines = {fmt: k2model_engine(m) for fmt, m in models.items()}
    for engine in engines.values():
        engine(prompts_for(1, s.prompt_len), 2)  # warm-up
    rows: list[Row] = []
    for batch in BATCHES:
        rows += measure(engines, prompts_for(batch, s.prompt_len), s)[0]
        print(f"  measured batch {batch}", flush=True)
    return {
        "rows": rows,
        "bytes": {fmt: resident_bytes(m) for fmt, m in models.items()},
        "ops": {fmt: m.ops.name for fmt, m in models.items()},
    }


def format_ratios(rows: list[Row], nbytes: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    decode = {(r.engine, r.batch): r.decode_tok_s for r in rows}
    out = [
        {
            "ratio": f"decode {fmt} / bf16, batch {b}",
            "value": decode[fmt, b] / decode["bf16", b],
            "target": 1.0 if fmt == "int4" and b == 1 else None,
        }
        for fmt in ("int4", "fp8")
        for b in BATCHES
    ]
    out += [
        {
            "ratio": f"resident bytes {fmt} / bf16",
            "value": nbytes[fmt]["total"] / nbytes["bf16"]["total"],
            "target": None,
        }
        for fmt in ("int4", "fp8")
    ]
    return out


def byte_rows(nbytes: dict[str, dict[str, int]]) -> list[tuple[str, float, float]]:
    return [(fmt, b["total"] / 2**20, b["routed_experts"] / 2**20) for fmt, b in nbytes.items()]
