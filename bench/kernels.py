"""The Triton kernels at Kimi K2's real shapes against torch and the measured roofline (GPU).

    python3 bench/kernels.py [--out bench/results/kernels.json] [--smoke]

1. Ceilings, measured here: HBM bandwidth (a 4 GiB device copy, bytes read + written) and the
   bf16 matmul rate (8192^3, random data); the fp8 peak is taken as twice the bf16 rate.
2. Block-fp8 GEMM (act_quant + fp8_gemm) at K2 projections, decode (M = batch) and prefill
   (M = 4096) rows, against the bf16 matmul and torch._scaled_mm. Target: prefill GEMMs at
   >= 60% of twice the bf16 matmul's FLOP/s at the same shape.
3. MLA decode attention, 64 heads, 512 + 64 latent, batch 64 x 4096 context on a shuffled paged
   cache, against the model's torch path (gather + bmm) and SDPA on pre-gathered K/V.
   Target: >= 80% of the measured HBM bandwidth.
4. Routed experts at decode (64 tokens, top-8 of 384, 7168 x 2048), fp8 and bf16: align +
   grouped GEMMs against a torch per-expert loop; bytes = the experts actually touched.
5. One K2 MoE decoder layer with random fp8 weights at full size (384 experts) running one decode
   step (batch 1 and 64, 4096 context), eager and CUDA-graph replay, beside the step's roofline.

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed before each run).
`--smoke` runs every section at tiny shapes (on CPU with TRITON_INTERPRET=1) to check the script.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from bench.common import format_table, write_json  # noqa: E402
from k2model.batch import SeqSlice, build_batch  # noqa: E402
from k2model.checkpoint.fp8 import dequantize_block_fp8  # noqa: E402
from k2model.config import K2Config  # noqa: E402
from k2model.kernels.act_quant import act_quant  # noqa: E402
from k2model.kernels.dispatch import ExpertWeights  # noqa: E402
from k2model.kernels.fp8_gemm import fp8_gemm  # noqa: E402
from k2model.kernels.fused_moe import fused_moe  # noqa: E402
from k2model.kernels.mla_decode import mla_decode  # noqa: E402
from k2model.kernels.moe_align import moe_align  # noqa: E402
from k2model.kv_cache import PagedKVCache  # noqa: E402
from k2model.model import DecoderLayer  # noqa: E402
from k2model.rope import RotaryTable  # noqa: E402
from k2model.runtime import Runtime  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BF16 = torch.bfloat16 if DEV.type == "cuda" else torch.float16  # the interpreter lacks bf16 dots
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Shapes:
    hidden: int = 7168
    heads: int = 64
    r: int = 512
    d_pe: int = 64
    inter: int = 2048
    experts: int = 384
    top_k: int = 8
    q_lora: int = 1536
    dense_inter: int = 18432
    batch: int = 64
    ctx: int = 4096
    prefill: int = 4096
    page: int = 64
    square: int = 8192


SMOKE = Shapes(256, 4, 64, 16, 128, 8, 2, 128, 256, 4, 96, 64, 16, 256)
ROWS: list[dict] = []


def timed(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn."""
    if DEV.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def tried(fn: Callable[[], object]) -> float:
    """timed(fn), or inf when this tile configuration does not fit the device."""
    try:
        return timed(fn)
    except Exception as e:  # e.g. triton's OutOfResources for too much shared memory
        print(f"  config failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
        return float("inf")


def record(section: str, case: str, impl: str, ms: float, nbytes: float, flops: float,
           floor_ms: float, note: str = "") -> None:  # fmt: skip
    ROWS.append({
        "section": section, "case": case, "impl": impl, "ms": ms,
        "GB/s": nbytes / ms / 1e6 if nbytes else 0.0, "TFLOP/s": flops / ms / 1e9,
        "roofline %": 100 * floor_ms / ms, "note": note,
    })  # fmt: skip


def rand_fp8(n: int, k: int, experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fp8 weight [(E,) n, k] with block scales sized so that w * s has std 1/sqrt(k)."""
    lead = () if experts is None else (experts,)
    w = torch.empty(*lead, n, k, dtype=FP8, device=DEV)
    for chunk in w.view(-1, n, k).split(8):  # bounded bf16 temporaries
        chunk.copy_(torch.randn(chunk.shape, device=DEV, dtype=torch.bfloat16).to(FP8))
    s = (0.5 + torch.rand(*lead, -(-n // 128), -(-k // 128), device=DEV)) / math.sqrt(k)
    return w, s


def ceilings(sh: Shapes) -> tuple[float, float]:
    """(HBM GB/s, bf16 matmul TFLOP/s) measured on this device."""
    return _copy_bandwidth(2**30 if DEV.type == "cuda" else 2**20), _matmul_rate(sh.square)


def _copy_bandwidth(numel: int) -> float:
    a = torch.randn(numel, device=DEV)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a))
    record("ceiling", f"copy {numel * 4 / 2**30:.2f} GiB", "torch copy_", ms, 8 * numel, 0, 0)
    return 8 * numel / ms / 1e6


def _matmul_rate(n: int) -> float:
    x, y = (torch.randn(n, n, device=DEV, dtype=BF16) for _ in range(2))
    ms = timed(lambda: x @ y)
    record("ceiling", f"matmul {n}^3", "torch bf16", ms, 0, 2 * n**3, 0)
    return 2 * n**3 / ms / 1e9


def scaled_mm_fn(xq, xs, wq, ws, reference: torch.Tensor) -> tuple[Callable[[], object], str]:
    """torch._scaled_mm with K2's block scales when this torch/GPU has them, else row-wise."""
    try:

        def blockwise():  # fmt: skip
            return torch._scaled_mm(xq, wq.t(), scale_a=xs.t().contiguous().t(), scale_b=ws.t(),
                                    out_dtype=torch.bfloat16)  # fmt: skip

        err = (blockwise().float() - reference).norm() / reference.norm()
        if err < 2e-2:
            return blockwise, "block-wise scales"
    except (RuntimeError, TypeError):
        pass
    ones_a = torch.ones(xq.shape[0], 1, device=DEV)
    ones_b = torch.ones(1, wq.shape[0], device=DEV)
    return (lambda: torch._scaled_mm(xq, wq.t(), scale_a=ones_a, scale_b=ones_b,
                                     out_dtype=torch.bfloat16)), "row-wise scales (no block-wise)"  # fmt: skip


FP8_CONFIGS = {  # swept beside the default; the default is the first run's best (H100)
    "decode": [
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 8},
        {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4},
    ],
    "prefill": [
        {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 256, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 256, "num_warps": 4, "num_stages": 4},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
    ],
}


def bench_fp8_gemm(sh: Shapes, bw: float, bf16_peak: float) -> None:
    shapes = {"o_proj": (sh.hidden, sh.heads * 128), "q_b_proj": (sh.heads * 192, sh.q_lora),
              "expert gate|up": (sh.inter, sh.hidden), "expert down": (sh.hidden, sh.inter),
              "dense gate+up": (2 * sh.dense_inter, sh.hidden)}  # fmt: skip
    for m in (sh.batch, sh.prefill):
        sweep = FP8_CONFIGS["prefill" if m == sh.prefill else "decode"]
        configs = [None] + (sweep if DEV.type == "cuda" else [])
        for name, (n, k) in shapes.items():
            _gemm_case(f"{name} M={m} N={n} K={k}", m, n, k, configs, bw, bf16_peak)


def _gemm_case(case: str, m: int, n: int, k: int, configs: list, bw: float, peak: float) -> None:
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    wq, ws = rand_fp8(n, k)
    xq, xs = act_quant(x)
    nbytes = m * k + n * k + 2 * m * n + 4 * (xs.numel() + ws.numel())
    flops = 2 * m * n * k
    fp8_floor = max(nbytes / bw / 1e6, flops / (2 * peak) / 1e9)
    times = [(tried(lambda c=c: fp8_gemm(xq, xs, wq, ws, BF16, c)), str(c or "default"))
             for c in configs]  # fmt: skip

    best_ms, best_cfg = min(times)
    record("fp8 gemm", case, "triton fp8_gemm", best_ms, nbytes, flops, fp8_floor, best_cfg)
    ms = timed(lambda: act_quant(x))
    record("fp8 gemm", case, "triton act_quant", ms, 3 * m * k, 0, 3 * m * k / bw / 1e6)
    w16 = dequantize_block_fp8(wq, ws, BF16)
    ms16 = timed(lambda: x @ w16.T)
    b16 = 2 * (m * k + n * k + m * n)
    floor16 = max(b16 / bw / 1e6, flops / peak / 1e9)
    record("fp8 gemm", case, "torch bf16 matmul", ms16, b16, flops, floor16,
           f"triton fp8 at {100 * ms16 / 2 / best_ms:.0f}% of 2x this (target 60%)")  # fmt: skip
    if DEV.type == "cuda":
        fn, how = scaled_mm_fn(xq, xs, wq, ws, fp8_gemm(xq, xs, wq, ws, torch.float32))
        record("fp8 gemm", case, "torch._scaled_mm", timed(fn), nbytes, flops, fp8_floor, how)


def paged_cache(batch: int, ctx: int, dim: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [batch * ctx, dim] latent cache and each sequence's slots through shuffled pages."""
    pages = batch * ctx // page
    kv = torch.randn(pages * page, dim, device=DEV, dtype=BF16)
    table = torch.randperm(pages, device=DEV).view(batch, ctx // page)
    pos = torch.arange(ctx, device=DEV)
    return kv, table[:, pos // page] * page + pos % page


MLA_CONFIGS = [  # (block_h, block_n, num_warps, num_stages, splits; None = default)
    (64, 64, 8, 2, None), (64, 32, 8, 4, None), (64, 64, 16, 2, None), (64, 64, 8, 2, 8),
    (64, 64, 8, 2, 3), (64, 16, 8, 4, None), (64, 64, 4, 2, None), (64, 64, 8, 3, None),
]  # fmt: skip


def bench_mla(sh: Shapes, bw: float, bf16_peak: float) -> None:
    for batch, ctx in ((sh.batch, sh.ctx), (4, 8 * sh.ctx)):
        _mla_case(sh, batch, ctx, bw, bf16_peak)


def _mla_case(sh: Shapes, batch: int, ctx: int, bw: float, peak: float) -> None:
    dim = sh.r + sh.d_pe
    kv, slots = paged_cache(batch, ctx, dim, sh.page)
    q = torch.randn(batch, sh.heads, dim, device=DEV, dtype=BF16)
    lens = torch.full((batch,), ctx, device=DEV)
    case = f"B={batch} L={ctx} H={sh.heads}"
    nbytes = 2 * batch * ctx * dim + 8 * batch * ctx + 2 * batch * sh.heads * (dim + sh.r)
    flops = 2 * batch * sh.heads * ctx * (dim + sh.r)
    floor = max(nbytes / bw / 1e6, flops / peak / 1e9)
    results = []
    for c in MLA_CONFIGS if DEV.type == "cuda" else MLA_CONFIGS[:1]:
        ms = tried(lambda c=c: mla_decode(q, kv, slots, lens, 0.1, sh.r, c[4], *c[:4]))
        results.append(
            (
                ms,
                "block_h={} block_n={} warps={} stages={} splits={}".format(*c[:4], c[4] or "auto"),
            )
        )
    for ms, note in sorted(results)[:3]:
        record("mla decode", case, "triton mla_decode", ms, nbytes, flops, floor, note)

    def torch_path() -> torch.Tensor:  # the model's absorbed path: gather, bmm, softmax, bmm
        ctx_rows = kv[slots]  # [B, L, dim]
        scores = torch.bmm(q, ctx_rows.transpose(1, 2)).float() * 0.1
        return torch.bmm(scores.softmax(-1).to(BF16), ctx_rows[..., : sh.r])

    record("mla decode", case, "torch gather+bmm", timed(torch_path), nbytes, flops, floor)
    # SDPA with the heads as the query rows of one shared K/V head (the same attention), on K/V
    # gathered outside the timing.
    k_all = kv[slots][:, None]  # [B, 1, L, dim]
    v_all = k_all[..., : sh.r].contiguous()
    try:
        ms = timed(lambda: F.scaled_dot_product_attention(q[:, None], k_all, v_all, scale=0.1))
        record("mla decode", case, "torch SDPA (K/V pre-gathered)", ms, nbytes, flops, floor)
    except RuntimeError as e:
        record("mla decode", case, "torch SDPA", float("nan"), 0, 0, 0, str(e)[:60])


def stacked_experts(sh: Shapes, fp8: bool) -> ExpertWeights:
    e, i, d = sh.experts, sh.inter, sh.hidden
    if fp8:
        (g, gs), (u, us), (dn, ds) = rand_fp8(i, d, e), rand_fp8(i, d, e), rand_fp8(d, i, e)
        return ExpertWeights(g, u, dn, gs, us, ds)
    gate_up = torch.randn(e, 2 * i, d, device=DEV, dtype=BF16) / math.sqrt(d)
    down = torch.randn(e, d, i, device=DEV, dtype=BF16) / math.sqrt(i)
    return ExpertWeights(gate_up[:, :i], gate_up[:, i:], down)


def torch_experts(x, ids, weights, w: ExpertWeights) -> torch.Tensor:
    """The model's CPU path: sort by expert, one (dequantise and) matmul pair per active expert."""
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    xs = x[order // ids.shape[1]]
    out = torch.empty_like(xs)
    active, counts = flat[order].unique_consecutive(return_counts=True)
    start = 0
    for e, n in zip(active.tolist(), counts.tolist(), strict=True):
        mats = [m[e] if s is None else dequantize_block_fp8(m[e], s[e], x.dtype)
                for m, s in ((w.gate, w.gate_scale), (w.up, w.up_scale), (w.down, w.down_scale))]  # fmt: skip
        rows = xs[start : start + n]
        out[start : start + n] = (F.silu(rows @ mats[0].T) * (rows @ mats[1].T)) @ mats[2].T
        start += n
    out = out * weights.flatten()[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, order // ids.shape[1], out)


def bench_moe(sh: Shapes, bw: float) -> None:
    t, k = sh.batch, sh.top_k
    x = torch.randn(t, sh.hidden, device=DEV, dtype=BF16)
    ids = torch.rand(t, sh.experts, device=DEV).topk(k, dim=-1).indices
    weights = torch.rand(t, k, device=DEV)
    for fp8 in (True, False):
        _moe_case(sh, x, ids, weights, fp8, bw)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
    ms = timed(lambda: moe_align(ids, sh.experts, 16))
    record("moe", f"align T={t} top-{k} of {sh.experts}", "triton moe_align", ms, 0, 0, 0)


def _moe_case(sh: Shapes, x, ids, weights, fp8: bool, bw: float) -> None:
    w = stacked_experts(sh, fp8)
    touched = ids.unique().numel()
    nbytes = touched * 3 * sh.inter * sh.hidden * (1 if fp8 else 2)
    flops = 6 * ids.numel() * sh.inter * sh.hidden
    case = f"T={x.shape[0]} top-{ids.shape[1]} of {sh.experts}, {'fp8' if fp8 else 'bf16'}, {touched} experts touched"
    floor = nbytes / bw / 1e6
    ms = timed(lambda: fused_moe(x, ids, weights, w))
    record("moe", case, "triton align+grouped", ms, nbytes, flops, floor)
    ms = timed(lambda: torch_experts(x, ids, weights, w))
    record("moe", case, "torch per-expert loop", ms, nbytes, flops, floor)


def k2_config(sh: Shapes) -> K2Config:
    return K2Config.from_dict({
        "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": sh.hidden,
        "intermediate_size": sh.dense_inter, "moe_intermediate_size": sh.inter,
        "num_hidden_layers": 61, "first_k_dense_replace": 1, "n_routed_experts": sh.experts,
        "n_shared_experts": 1, "num_experts_per_tok": sh.top_k, "routed_scaling_factor": 2.827,
        "num_attention_heads": sh.heads, "q_lora_rank": sh.q_lora, "kv_lora_rank": sh.r,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": sh.d_pe, "v_head_dim": 128,
        "rope_theta": 50000.0, "max_position_embeddings": 131072,
    })  # fmt: skip


def k2_layer(cfg: K2Config) -> DecoderLayer:
    """Layer 1 (the first MoE layer) with random fp8 weights at full size, on the device."""
    with torch.device(DEV):
        layer = DecoderLayer(cfg, 1, Runtime.resolve(BF16))
    experts = layer.ffn.experts
    experts.set_fp8([])  # drop the dense buffers before the fp8 ones are made
    attn, shared = layer.attn, layer.ffn.shared
    attn.qkv_a.set_fp8(
        [rand_fp8(cfg.q_lora_rank, cfg.hidden_size), rand_fp8(cfg.kv_cache_dim, cfg.hidden_size)]
    )
    for lin in (attn.q_b, attn.kv_b, attn.o, shared.down):
        lin.set_fp8([rand_fp8(lin.out_features, lin.in_features)])
    shared.gate_up.set_fp8([rand_fp8(cfg.moe_intermediate_size, cfg.hidden_size) for _ in "gu"])
    layer.ffn.router.weight.normal_(0, 0.02)
    w = stacked_experts(Shapes(hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size,
                               experts=cfg.n_routed_experts), fp8=True)  # fmt: skip
    experts.fp8 = [((w.gate[e], w.gate_scale[e]), (w.up[e], w.up_scale[e]), (w.down[e], w.down_scale[e]))
                   for e in range(cfg.n_routed_experts)]  # fmt: skip
    return layer


def step_cost(layer: DecoderLayer, batch: int, ctx: int, touched: int) -> tuple[float, float]:
    """(fewest bytes, FLOPs) of a decode step: the fp8 weights it uses with their scales, the
    fp32 router and the latent KV read once; 2 FLOPs per weight per token (each token uses its
    top-k experts) plus the attention's."""
    lins = [m for m in layer.modules() if getattr(m, "fp8_parts", None)]
    dense = sum(w.numel() + 4 * s.numel() for m in lins for w, s in m.fp8_parts)
    expert = sum(w.numel() + 4 * s.numel() for w, s in layer.ffn.experts.fp8[0])
    router = layer.ffn.router.weight.numel() * 4
    a = layer.attn
    kv_bytes = 2 * batch * ctx * (a.r + a.d_r)
    nbytes = dense + touched * expert + router + kv_bytes
    top_k = layer.ffn.router.top_k
    flops = 2 * batch * (dense + top_k * expert + router / 4)
    return nbytes, flops + 2 * batch * a.h * ctx * (2 * a.r + a.d_r)


def bench_layer(sh: Shapes, bw: float, bf16_peak: float) -> None:
    cfg = k2_config(sh)
    layer = k2_layer(cfg)
    rope = RotaryTable(cfg, DEV)
    for batch in (1, sh.batch):
        _layer_case(sh, layer, rope, batch, bw, bf16_peak)


def _layer_case(sh: Shapes, layer: DecoderLayer, rope: RotaryTable, batch: int, bw: float,
                peak: float) -> None:  # fmt: skip
    pages = sh.ctx // sh.page
    cache = PagedKVCache(2, batch * pages, sh.page, layer.attn.r + layer.attn.d_r, BF16, DEV)
    cache.data[1].normal_()
    perm = torch.randperm(batch * pages).view(batch, pages).tolist()
    meta = build_batch([SeqSlice(sh.ctx - 1, 1, perm[b]) for b in range(batch)], sh.page, DEV)
    rot = rope.lookup(meta.positions)
    h = torch.randn(batch, layer.attn.o.out_features, device=DEV, dtype=BF16)

    def step() -> torch.Tensor:
        return layer(h, rot, meta, cache, "absorbed")

    seen: list[torch.Tensor] = []
    hook = layer.ffn.router.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    step()
    hook.remove()
    touched = seen[0].unique().numel()
    nbytes, flops = step_cost(layer, batch, sh.ctx, touched)
    floor = max(nbytes / bw / 1e6, flops / (2 * peak) / 1e9)
    case = f"K2 MoE layer decode B={batch} L={sh.ctx}, {touched} experts touched"
    record("layer", case, "eager", timed(step), nbytes, flops, floor)
    if DEV.type == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph):
                step()
            record("layer", case, "CUDA graph replay", timed(graph.replay), nbytes, flops, floor)
        except RuntimeError as e:
            record("layer", case, "CUDA graph", float("nan"), 0, 0, 0, str(e)[:60])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernels.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpreter)")
    parser.add_argument("--only", default="ceiling,gemm,mla,moe,layer")
    args = parser.parse_args()
    if DEV.type != "cuda" and not args.smoke:
        sys.exit("bench/kernels.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    sh = SMOKE if args.smoke else Shapes()
    torch.manual_seed(0)
    bw, peak = ceilings(sh)
    print(f"device {torch.cuda.get_device_name() if DEV.type == 'cuda' else 'cpu'}: "
          f"HBM copy {bw:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s", flush=True)  # fmt: skip
    sections = {"gemm": lambda: bench_fp8_gemm(sh, bw, peak), "mla": lambda: bench_mla(sh, bw, peak),
                "moe": lambda: bench_moe(sh, bw), "layer": lambda: bench_layer(sh, bw, peak)}  # fmt: skip
    for name in args.only.split(","):
        if name in sections:
            t0 = time.perf_counter()
            try:
                sections[name]()
            except Exception as e:  # one failing section must not lose the others' numbers
                record(name, "FAILED", type(e).__name__, float("nan"), 0, 0, 0, str(e)[:200])
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
            print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
    headers = list(ROWS[0])
    print(format_table(headers, [[r[h] for h in headers] for r in ROWS]))
    write_json(args.out, {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu",
                          "hbm_GBps": bw, "bf16_TFLOPs": peak, "rows": ROWS})  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
