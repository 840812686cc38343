"""Prefill and decode throughput of k2model against transformers' DeepseekV3ForCausalLM, on CPU.

    python3 bench/model.py [--quick] [--dtype float32|bfloat16] [--prompt-len N] [--new-tokens N]
                           [--out bench/results/model.json] [--hf-attn eager|sdpa]
    python3 bench/model.py --format int4 [--quick]   (bf16 vs fp8 vs INT4 resident: model_formats.py)

Both engines load the same random bf16 checkpoint, computing in --dtype (default float32,
k2model's CPU default; k2model holds the bf16 matrices as bf16 and decodes through its C++ CPU
extension where that is built, which the report says): K2's real MLA latent width (kv_lora_rank 512, rope 64, nope 128, v 128)
with everything else shrunk so it runs on two CPU cores. Each batch of random prompts is
prefilled once, then decoded greedily with no stop token.

- prefill tok/s = prompt tokens / time to process the whole batch of prompts once
  (ours: the first step of `generate`, which also samples the first token; transformers: one
  forward pass into a fresh DynamicCache keeping only the last logits, as its `generate` does).
- decode tok/s = tokens generated after the first / time spent generating them
  (ours: every step of `generate` after the first; transformers: `generate` time minus the
  prefill time).

Each engine is warmed up once; the reported numbers are medians over the repeats (3; 1 with
--quick, which also decodes 8 tokens instead of 16). transformers runs with eager attention and
its default experts kernel: eager decoded faster than sdpa at batch 16 on two cores.

The batch-1 greedy tokens of both engines are compared with each other and with transformers in
fp32: in bf16, rounding legitimately makes an engine diverge after a few tokens, so a divergence
is reported, not fatal; the fp32 column says which engine moved.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DeepseekV3ForCausalLM, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as `python3 bench/model.py`

from bench.common import format_table, median, timed, write_json
from k2model.checkpoint.loader import load_model
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.generation import GenerationRequest, TokenEvent, generate
from k2model.kernels import cpu_ext
from k2model.model import K2Model

# K2's attention widths; hidden size, depth, experts and vocabulary scaled down for two cores.
BENCH_CONFIG: dict[str, int] = {
    "hidden_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 256,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "moe_intermediate_size": 256,
    "intermediate_size": 1024,
    "vocab_size": 4096,
}
BATCHES = (1, 16, 64)
DEFAULT_OUT = Path("bench/results/model.json")
FORMATS_OUT = Path("bench/results/model_formats.json")
SEED = 0
DECODE_TARGETS = {1: 2.5, 16: 3.5}  # ours / transformers decode tok/s, by batch
SCALING_TARGET = 10.0  # our decode tok/s at the largest batch / at batch 1


@dataclass(frozen=True)
class Settings:
    prompt_len: int
    new_tokens: int
    repeats: int


# Sized for a 2-core AVX2 host without native bf16 matmuls, where transformers' decode at batch
# 64 (it re-expands the whole latent cache every step) dominates the run time.
FULL = Settings(prompt_len=32, new_tokens=16, repeats=3)
QUICK = Settings(prompt_len=32, new_tokens=8, repeats=1)


@dataclass(frozen=True)
class Run:
    """One prefill + decode of a batch; tokens[i] are prompt i's new token ids."""

    prefill_s: float
    decode_s: float
    tokens: list[list[int]]


Engine = Callable[[list[list[int]], int], Run]  # (prompts, new tokens) -> Run


@dataclass(frozen=True)
class Row:
    engine: str
    batch: int
    prefill_tok_s: float
    decode_tok_s: float


def build_checkpoint(root: Path) -> Path:
    # model_type deepseek_v3 so transformers fuses the per-expert tensors on load.
    cfg = tiny_config(model_type="deepseek_v3", **BENCH_CONFIG)
    return write_checkpoint(root / "ckpt", cfg, random_weights(cfg, seed=SEED))


def random_prompts(batch: int, length: int) -> list[list[int]]:
    """Fixed-seed ids avoiding 0 and 1 (bos/eos); batch 1's prompt is every batch's first."""
    rng = random.Random(SEED)
    return [
        [rng.randrange(2, BENCH_CONFIG["vocab_size"]) for _ in range(length)] for _ in range(batch)
    ]


def k2model_engine(model: K2Model) -> Engine:
    """Times the first step of `generate` (prefill + first token) apart from the rest."""

    def run(prompts: list[list[int]], new_tokens: int) -> Run:
        tokens: list[list[int]] = [[] for _ in prompts]

        def collect(steps: Iterable[list[TokenEvent]]) -> None:
            for events in steps:
                for e in events:
                    tokens[e.request].append(e.token_id)

        steps = generate(model, [GenerationRequest(p, new_tokens) for p in prompts])
        prefill_s, _ = timed(lambda: collect([next(steps)]))
        decode_s, _ = timed(lambda: collect(steps))
        return Run(prefill_s, decode_s, tokens)

    return run


def transformers_engine(model: torch.nn.Module) -> Engine:
    """Prefill is one cached forward pass; decode is the rest of a full `generate` call."""

    @torch.inference_mode()
    def run(prompts: list[list[int]], new_tokens: int) -> Run:
        ids = torch.tensor(prompts)
        mask = torch.ones_like(ids)

        def prefill() -> None:
            cache = DynamicCache(config=model.config)
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)

        def full() -> torch.Tensor:
            return model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # no early stop on the tiny config's eos id
                do_sample=False,
                past_key_values=DynamicCache(config=model.config),
                pad_token_id=0,
            )

        prefill_s, _ = timed(prefill)
        total_s, out = timed(full)
        return Run(prefill_s, total_s - prefill_s, out[:, ids.shape[1] :].tolist())

    return run


def measure(
    engines: dict[str, Engine], prompts: list[list[int]], s: Settings
) -> tuple[list[Row], dict[str, Run]]:
    """Median throughputs per engine, and each engine's first run (for its tokens).

    Repeats interleave the engines, so load from other processes that comes and goes during the
    run slows both alike instead of one engine's whole series.
    """
    runs: dict[str, list[Run]] = {name: [] for name in engines}
    for _ in range(s.repeats):
        for name, engine in engines.items():
            runs[name].append(engine(prompts, s.new_tokens))
    b = len(prompts)
    rows = [
        Row(
            name,
            b,
            median([b * s.prompt_len / r.prefill_s for r in series]),
            median([b * (s.new_tokens - 1) / r.decode_s for r in series]),
        )
        for name, series in runs.items()
    ]
    return rows, {name: series[0] for name, series in runs.items()}


def leading_matches(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def load_transformers(path: Path, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


def greedy_agreement(path: Path, tokens: dict[str, list[int]], prompt: list[int]) -> dict[str, int]:
    """Leading greedy tokens shared by the two engines, and by each with an fp32 reference
    (transformers in fp32), which tells which engine's rounding moved first."""
    reference = transformers_engine(load_transformers(path, torch.float32, "sdpa"))
    ref = reference([prompt], len(tokens["k2model"])).tokens[0]
    return {
        "k2model vs transformers": leading_matches(tokens["k2model"], tokens["transformers"]),
        "k2model vs fp32 reference": leading_matches(tokens["k2model"], ref),
        "transformers vs fp32 reference": leading_matches(tokens["transformers"], ref),
        "of": len(ref),
    }


def run_all(path: Path, s: Settings, hf_attn: str, dtype: torch.dtype) -> dict[str, Any]:
    hf = load_transformers(path, dtype, hf_attn)
    engines = {
        "k2model": k2model_engine(load_model(path, dtype=dtype)),
        "transformers": transformers_engine(hf),
    }
    for engine in engines.values():
        engine(random_prompts(1, s.prompt_len), 2)  # warm-up
    rows: list[Row] = []
    tokens: dict[str, list[int]] = {}  # batch 1's greedy tokens per engine
    for batch in BATCHES:
        batch_rows, first = measure(engines, random_prompts(batch, s.prompt_len), s)
        rows += batch_rows
        if batch == 1:
            tokens = {name: run.tokens[0] for name, run in first.items()}
        print(f"  measured batch {batch}", flush=True)
    return {
        "rows": rows,
        "greedy_batch1": greedy_agreement(path, tokens, random_prompts(1, s.prompt_len)[0]),
        "hf_attn_implementation": hf.config._attn_implementation,
        "hf_experts_implementation": hf.config._experts_implementation,
    }


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    decode = {(r.engine, r.batch): r.decode_tok_s for r in rows}
    out = [
        {
            "ratio": f"decode k2model / transformers, batch {b}",
            "value": decode["k2model", b] / decode["transformers", b],
            "target": DECODE_TARGETS.get(b),
        }
        for b in BATCHES
    ]
    top = BATCHES[-1]
    out.append(
        {
            "ratio": f"decode k2model batch {top} / k2model batch 1",
            "value": decode["k2model", top] / decode["k2model", 1],
            "target": SCALING_TARGET,
        }
    )
    return out


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(
        f"\ntorch threads {report['torch_threads']}, CPU capability {report['cpu_capability']}, "
        f"k2model CPU extension {'on' if report['k2model_cpu_extension'] else 'OFF'}, "
        f"load average {report['load_before']:.1f} before / {report['load_after']:.1f} after"
    )
    print(
        f"transformers: attention {report['hf_attn_implementation']}, "
        f"experts {report['hf_experts_implementation']}"
    )
    print(
        f"prompt {s['prompt_len']} tokens, {s['new_tokens']} new tokens (greedy), "
        f"median of {s['repeats']}\n"
    )
    table = [
        (r["engine"], r["batch"], r["prefill_tok_s"], r["decode_tok_s"]) for r in report["rows"]
    ]
    print(format_table(["engine", "batch", "prefill tok/s", "decode tok/s"], table))
    print()
    print(
        format_table(
            ["ratio", "measured", "target", "met"], [_ratio_row(r) for r in report["ratios"]]
        )
    )
    g = dict(report["greedy_batch1"])
    n = g.pop("of")
    print(f"\nbatch-1 greedy tokens, leading matches of {n}:")
    for pair, matches in g.items():
        print(f"  {pair}: {matches}" + ("" if matches == n else "  (WARNING: diverged)"))
    if report["load_after"] > report["torch_threads"] + 1:  # this run itself adds ~threads
        print("WARNING: the machine was busy with other work; timings are pessimistic and noisy")


def _ratio_row(r: dict[str, Any]) -> tuple[str, float, str, str]:
    if r["target"] is None:
        return r["ratio"], r["value"], "-", "-"
    return r["ratio"], r["value"], f">= {r['target']}", "yes" if r["value"] >= r["target"] else "NO"


def machine() -> dict[str, Any]:
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "k2model_cpu_extension": cpu_ext.available(),
        "torch_version": torch.__version__,
    }


def formats_main(s: Settings, out: Path) -> None:
    from bench import model_formats

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = model_formats.run_formats(Path(tmp), s)
    report = {
        **machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "config": model_formats.FORMATS_CONFIG,
        "settings": asdict(s),
        **result,
        "rows": [asdict(r) for r in result["rows"]],
        "ratios": model_formats.format_ratios(result["rows"], result["bytes"]),
    }
    print(f"\nops {report['ops']}, CPU capability {report['cpu_capability']}, compute float32")
    print(f"prompt {s.prompt_len} tokens, {s.new_tokens} new tokens, median of {s.repeats}\n")
    table = [(r.engine, r.batch, r.prefill_tok_s, r.decode_tok_s) for r in result["rows"]]
    print(format_table(["resident", "batch", "prefill tok/s", "decode tok/s"], table))
    print()
    rows = model_formats.byte_rows(result["bytes"])
    print(format_table(["resident", "MiB", "routed experts MiB"], rows))
    print()
    print(format_table(["ratio", "measured", "target", "met"], map(_ratio_row, report["ratios"])))
    write_json(out, report)
    print(f"\nwrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 new tokens, one timed repeat")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--hf-attn", choices=["eager", "sdpa"], default="eager")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype of both engines (float32 is k2model's CPU default: bf16 matmuls are "
        "~7x slower than fp32 on CPUs without AVX-512 bf16)",
    )
    p.add_argument(
        "--format",
        choices=["bf16", "int4"],
        default="bf16",
        help="bf16: k2model against transformers (the default); int4: k2model alone, "
        "bf16-resident vs fp8-resident vs INT4-resident (bench/model_formats.py)",
    )
    p.add_argument("--prompt-len", type=int, help="override the prompt length")
    p.add_argument("--new-tokens", type=int, help="override the number of new tokens")
    args = p.parse_args()
    s = QUICK if args.quick else FULL
    s = replace(
        s,
        prompt_len=args.prompt_len or s.prompt_len,
        new_tokens=args.new_tokens or s.new_tokens,
    )
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(SEED)
    if args.format == "int4":
        formats_main(s, args.out if args.out != DEFAULT_OUT else FORMATS_OUT)
        return
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = run_all(build_checkpoint(Path(tmp)), s, args.hf_attn, dtype)
    report = {
        **machine(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "transformers_version": transformers.__version__,
        "dtype": args.dtype,
        "config": BENCH_CONFIG,
        "settings": asdict(s),
        **result,
        "rows": [asdict(r) for r in result["rows"]],
        "ratios": ratios(result["rows"]),
    }
    print_report(report)
    write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
