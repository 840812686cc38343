"""Checkpoint -> K2Model: the one place that knows Hugging Face tensor names (docs/checkpoint.md, tensor names).

Checks the whole name set first (missing, unexpected, mis-shaped, fp8 without scales) and raises a
single CheckpointError naming every problem, then fills the model tensor by tensor from memory-mapped
shards. Block-fp8 weights are dequantised by multiplication, or kept resident as fp8 and dequantised
per layer on the fly (`fp8_resident=True`, about half the memory).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from k2model.checkpoint import int4 as int4_format
from k2model.checkpoint.fp8 import BLOCK, dequantize_block_fp8
from k2model.checkpoint.shards import CheckpointError, ShardedCheckpoint
from k2model.config import K2Config
from k2model.linear import Linear
from k2model.model import K2Model
from k2model.moe import LocalExperts, MoE
from k2model.runtime import Runtime

log = logging.getLogger(__name__)
SCALE_SUFFIX = "_scale_inv"
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def expected_shapes(cfg: K2Config) -> dict[str, tuple[int, ...]]:
    """Every weight a checkpoint of this config must hold, in HF naming, with its shape."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    qk = cfg.num_attention_heads * cfg.qk_head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        a = p + "self_attn."
        if cfg.q_lora_rank:
            out[a + "q_a_proj.weight"] = (cfg.q_lora_rank, d)
            out[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            out[a + "q_b_proj.weight"] = (qk, cfg.q_lora_rank)
        else:
            out[a + "q_proj.weight"] = (qk, d)
        out[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_cache_dim, d)
        out[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        heads_kv = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        out[a + "kv_b_proj.weight"] = (heads_kv, cfg.kv_lora_rank)
        out[a + "o_proj.weight"] = (d, cfg.num_attention_heads * cfg.v_head_dim)
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            out[m + "gate.weight"] = (cfg.n_routed_experts, d)
            out[m + "gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
            experts = [f"experts.{e}." for e in range(cfg.n_routed_experts)]
            if cfg.n_shared_experts:
                experts.append("shared_experts.")
            for e in experts:
                inter = cfg.moe_intermediate_size * (cfg.n_shared_experts if e[0] == "s" else 1)
                out.update(_mlp_shapes(m + e, d, inter))
        else:
            out.update(_mlp_shapes(m, d, cfg.intermediate_size))
    return out


def _mlp_shapes(prefix: str, d: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {
        prefix + "gate_proj.weight": (inter, d),
        prefix + "up_proj.weight": (inter, d),
        prefix + "down_proj.weight": (d, inter),
    }


def _ignored(name: str, cfg: K2Config) -> bool:
    """Stale rotary buffers and layers past num_hidden_layers (DeepSeek-V3's MTP layer)."""
    layer = _LAYER.match(name)
    return bool(_IGNORED.search(name)) or (
        layer is not None and int(layer[1]) >= cfg.num_hidden_layers
    )


def validate(ckpt: ShardedCheckpoint, cfg: K2Config) -> dict[str, tuple[int, ...]]:
    """One CheckpointError listing every missing, unexpected, mis-shaped or mis-typed tensor."""
    want = expected_shapes(cfg)
    names = {n for n in ckpt.names() if not _ignored(n, cfg)}
    scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
    # INT4 weight X.weight is stored as X.weight_packed, X.weight_scale, X.weight_shape
    int4 = {n.removesuffix("_packed") for n in names if n.endswith("." + int4_format.PACKED)}
    triples = {f"{b}_{part}" for b in int4 for part in ("packed", "scale", "shape")}
    problems = [f"missing tensor {n}" for n in sorted(want.keys() - names - int4)]
    problems += [f"unexpected tensor {n}" for n in sorted(names - want.keys() - scales - triples)]
    problems += _int4_problems(ckpt, cfg, want, int4, names)
    for name in sorted(want.keys() & names):
        shape, dtype = tuple(ckpt.shape(name)), ckpt.dtype(name)
        if shape != want[name]:
            problems.append(f"{name} has shape {list(shape)}, expected {list(want[name])}")
        scale = name + SCALE_SUFFIX
        if dtype == torch.float8_e4m3fn:
            if scale not in scales:
                problems.append(f"{name} is fp8 but has no {scale}")
            else:
                block = cfg.fp8_block_size or (BLOCK, BLOCK)
                blocks = tuple(-(-n // b) for n, b in zip(want[name], block, strict=True))
                if tuple(ckpt.shape(scale)) != blocks:
                    problems.append(
                        f"{scale} has shape {list(ckpt.shape(scale))}, expected {list(blocks)}"
                    )
        elif dtype not in _FLOAT_DTYPES:
            problems.append(f"{name} has unsupported dtype {dtype}")
    for scale in sorted(scales):
        base = scale[: -len(SCALE_SUFFIX)]
        if base not in names or ckpt.dtype(base) != torch.float8_e4m3fn:
            problems.append(f"unexpected tensor {scale} (no fp8 weight {base})")
    if problems:
        raise CheckpointError(_summarise(ckpt, problems))
    return want


def _int4_problems(
    ckpt: ShardedCheckpoint,
    cfg: K2Config,
    want: dict[str, tuple[int, ...]],
    bases: set[str],
    names: set[str],
) -> list[str]:
    """Each INT4 weight (`<name>_packed`, `_scale`, `_shape`: checkpoint/int4.py) is a routed
    expert's, announced by the config, with the shapes its [out, in] implies."""
    if bases and cfg.int4 is None:
        return [f"{min(bases)}_packed is INT4 but config.json has no compressed-tensors scheme"]
    problems = [
        f"{n} is not INT4, though this checkpoint's other routed experts are"
        for n in sorted(names & want.keys())
        if bases and int4_format.is_int4_weight_name(n)
    ]
    for base in sorted(bases):
        if base not in want or not int4_format.is_int4_weight_name(base):
            problems.append(f"{base}_packed: INT4 is served for routed experts only")
            continue
        out, cols = want[base]
        if cols % int4_format.GROUP:
            problems.append(
                f"{base}_packed: {cols} input columns are not whole groups of {int4_format.GROUP}"
            )
            continue
        for part, shape, dtypes in (
            ("packed", (out, cols // 8), (torch.int32,)),
            ("scale", (out, cols // int4_format.GROUP), _FLOAT_DTYPES),
            ("shape", (2,), (torch.int32, torch.int64)),
        ):
            name = f"{base}_{part}"
            if name not in names:
                problems.append(f"missing tensor {name}")
            elif tuple(ckpt.shape(name)) != shape or ckpt.dtype(name) not in dtypes:
                got = f"{list(ckpt.shape(name))} {ckpt.dtype(name)}"
                problems.append(f"{name} is {got}, expected {list(shape)} {dtypes[0]}")
        if f"{base}_shape" in names and ckpt.get(f"{base}_shape").tolist() != [out, cols]:
            problems.append(
                f"{base}_shape says {ckpt.get(f'{base}_shape').tolist()}, expected {[out, cols]}"
            )
    return problems


@contextlib.contextmanager
def _open_text_model(path: Path) -> Iterator[ShardedCheckpoint]:
    """The checkpoint's language model; a multimodal one's vision tensors are skipped, said
    once (K2 serves text: a request with image parts is refused)."""
    with ShardedCheckpoint.open(path) as whole:
        ckpt, skipped = whole.text_model()
        if skipped:
            log.info(
                "%s: multimodal checkpoint, %d non-text tensors skipped (text only)",
                path,
                len(skipped),
            )
        yield ckpt


def _summarise(ckpt: ShardedCheckpoint, problems: list[str], limit: int = 20) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"checkpoint {ckpt.path} does not match its config ({len(problems)} problems):\n  {shown}{more}"


class _Filler:
    """Reads tensors by HF name onto the runtime's device: dense (in the compute dtype, or held as
    bf16 where the ops backend computes with it) or as (fp8, scale) parts."""

    def __init__(
        self,
        ckpt: ShardedCheckpoint,
        rt: Runtime,
        fp8_resident: bool,
        bar: tqdm,
        bf16_resident: bool = True,
    ):
        self.ckpt, self.rt, self.fp8_resident, self.bar = ckpt, rt, fp8_resident, bar
        self.dtype = rt.dtype
        self.bf16_resident = bf16_resident

    def is_fp8(self, name: str) -> bool:
        return self.ckpt.dtype(name) == torch.float8_e4m3fn

    def held_dtype(self, name: str, compute: torch.dtype | None = None) -> torch.dtype:
        """The dtype `dense(name, compute)` returns."""
        compute = compute or self.dtype
        stored = self.ckpt.dtype(name)
        return self.rt.ops.held_dtype(stored, compute) if self.bf16_resident else compute

    def dense(self, name: str, compute: torch.dtype | None = None) -> torch.Tensor:
        """`name` for a layer computing in `compute` (default: the model's dtype)."""
        t = self.ckpt.get(name)
        self.bar.update(1)
        if t.dtype == torch.float8_e4m3fn:
            scale = self.ckpt.get(name + SCALE_SUFFIX)
            return dequantize_block_fp8(t, scale, compute or self.dtype).to(self.rt.device)
        return t.to(self.rt.device, self.held_dtype(name, compute))

    def part(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        self.bar.update(1)
        weight = self.ckpt.get(name).to(self.rt.device)
        return weight, self.ckpt.get(name + SCALE_SUFFIX).to(self.rt.device, torch.float32)

    def int4_part(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed int32, bf16 scale) of an INT4 weight, on the device as stored."""
        self.bar.update(1)
        packed = self.ckpt.get(name + "_packed").to(self.rt.device)
        return packed, self.ckpt.get(name + "_scale").to(self.rt.device, torch.bfloat16)

    def linear(self, layer: Linear, names: list[str]) -> None:
        if self.fp8_resident and all(self.is_fp8(n) for n in names):
            layer.set_fp8([self.part(n) for n in names])
        else:
            layer.set_dense(torch.cat([self.dense(n) for n in names]))


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    fp8_resident: bool = False,
    progress: bool | None = None,
    routed_experts: bool = True,
    bf16_resident: bool = True,
    device: str | torch.device = "cpu",
    ops: str = "auto",
) -> K2Model:
    """Load a K2 / DeepSeek-V3 checkpoint directory (config.json + safetensors shards).

    `device` and `ops` (k2model/runtime.py, kernels/ops.py) fix where the model computes and with
    which kernels; every tensor is placed there as it is read. `dtype` is the compute dtype
    (default: fp32 on CPU, bf16 on GPU); checkpoint tensors are converted to it, except that with
    `bf16_resident` bf16 matrices stay bf16 under an fp32 compute where the ops backend computes
    with them (the same products, half the bytes). `routed_experts=False` reads everything but
    the routed experts, for prefill and decode instances whose experts live on the expert service.
    DeviceUnavailable / OpsUnavailable before anything is read when the device or a named backend
    is not here.
    """
    rt = Runtime.resolve(dtype, device, ops)
    cfg = K2Config.from_dir(path)
    with _open_text_model(Path(path)) as ckpt:
        want = validate(ckpt, cfg)
        model = K2Model(cfg, rt, routed_experts)
        show = progress if progress is not None else ckpt.total_bytes() > 2**30
        with tqdm(total=len(want), desc="loading", unit="tensor", disable=not show) as bar:
            _fill(model, _Filler(ckpt, rt, fp8_resident, bar, bf16_resident))
    return model.eval()


def _fill(model: K2Model, f: _Filler) -> None:
    cfg = model.cfg
    model.embed = f.dense("model.embed_tokens.weight")
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    model.lm_head = model.embed if cfg.tie_word_embeddings else f.dense(head)
    model.norm.weight.copy_(f.dense("model.norm.weight"))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attn_norm.weight.copy_(f.dense(p + "input_layernorm.weight"))
        layer.ffn_norm.weight.copy_(f.dense(p + "post_attention_layernorm.weight"))
        a, attn = p + "self_attn.", layer.attn
        if cfg.q_lora_rank:
            f.linear(attn.qkv_a, [a + "q_a_proj.weight", a + "kv_a_proj_with_mqa.weight"])
            attn.q_norm.weight.copy_(f.dense(a + "q_a_layernorm.weight"))
            f.linear(attn.q_b, [a + "q_b_proj.weight"])
        else:
            f.linear(attn.qkv_a, [a + "q_proj.weight", a + "kv_a_proj_with_mqa.weight"])
        attn.kv_norm.weight.copy_(f.dense(a + "kv_a_layernorm.weight"))
        f.linear(attn.kv_b, [a + "kv_b_proj.weight"])
        f.linear(attn.o, [a + "o_proj.weight"])
        m = p + "mlp."
        if isinstance(layer.ffn, MoE):
            _fill_moe(layer.ffn, m, f)
        else:
            f.linear(layer.ffn.gate_up, [m + "gate_proj.weight", m + "up_proj.weight"])
            f.linear(layer.ffn.down, [m + "down_proj.weight"])


def _fill_moe(moe: MoE, m: str, f: _Filler) -> None:
    moe.router.weight = f.dense(m + "gate.weight", torch.float32)  # the router runs in fp32
    moe.router.bias.copy_(f.ckpt.get(m + "gate.e_score_correction_bias"))
    f.bar.update(1)
    if moe.experts.gate_up.shape[0]:
        _fill_experts(moe.experts, m, f, first=0)
    else:
        f.bar.update(3 * moe.experts.n_experts)
    if moe.shared is not None:
        s = m + "shared_experts."
        f.linear(moe.shared.gate_up, [s + "gate_proj.weight", s + "up_proj.weight"])
        f.linear(moe.shared.down, [s + "down_proj.weight"])


def _fill_experts(ex: LocalExperts, m: str, f: _Filler, first: int) -> None:
    """Checkpoint experts first .. first + ex.n_experts - 1 of one layer into ex (local index 0..)."""
    names = [
        [f"{m}experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down")]
        for e in range(first, first + ex.n_experts)
    ]
    if names[0][0] + "_packed" in f.ckpt:  # INT4: resident packed, never widened
        ex.set_int4([tuple(f.int4_part(n) for n in trio) for trio in names])
    elif f.fp8_resident and all(f.is_fp8(n) for n in names[0]):
        ex.set_fp8([tuple(f.part(n) for n in trio) for trio in names])
    else:
        ex.hold(f.held_dtype(names[0][0]))
        for e, (gate, up, down) in enumerate(names):
            ex.gate_up[e, : ex.inter] = f.dense(gate)
            ex.gate_up[e, ex.inter :] = f.dense(up)
            ex.down[e] = f.dense(down)


def load_expert_slice(
    path: str | Path,
    first: int,
    count: int,
    dtype: torch.dtype | None = None,
    fp8_resident: bool = False,
    bf16_resident: bool = True,
    device: str | torch.device = "cpu",
    ops: str = "auto",
) -> tuple[K2Config, dict[int, LocalExperts]]:
    """Routed experts first .. first + count - 1 of every MoE layer, and nothing else.

    What one rank of an expert-parallel pool holds: {layer: LocalExperts(count)}, expert e of the
    checkpoint at local index e - first. The whole name set is still validated (headers only), but
    only this slice's tensors are read. `dtype`, `bf16_resident`, `device` and `ops` as for
    `load_model`.
    """
    rt = Runtime.resolve(dtype, device, ops)
    cfg = K2Config.from_dir(path)
    if count < 1 or first < 0 or first + count > cfg.n_routed_experts:
        raise ValueError(
            f"expert slice [{first}, {first + count}) is outside [0, {cfg.n_routed_experts})"
        )
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    out: dict[int, LocalExperts] = {}
    with _open_text_model(Path(path)) as ckpt:
        validate(ckpt, cfg)
        show = ckpt.total_bytes() > 2**30
        total = 3 * count * len(layers)
        with tqdm(total=total, desc="loading experts", unit="tensor", disable=not show) as bar:
            f = _Filler(ckpt, rt, fp8_resident, bar, bf16_resident)
            for i in layers:
                ex = LocalExperts(count, cfg.hidden_size, cfg.moe_intermediate_size, rt)
                _fill_experts(ex, f"model.layers.{i}.mlp.", f, first)
                out[i] = ex.eval()
    return cfg, out
