"""The model configuration, read once from a checkpoint's config.json and then frozen.

Accepts `model_type` "kimi_k2" or "deepseek_v3" and both ways Hugging Face writes rotary settings:
`rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (transformers 5). Every
derived value (softmax scale, layer kinds) is computed here, before freezing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2model.quant_config import Int4Scheme, QuantConfigError, parse_compressed_tensors

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


class ConfigError(ValueError):
    """A config.json that is missing fields or describes an inconsistent model."""


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rotary scaling; K2 uses beta_fast = beta_slow = 1 (not the paper's 32/1)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    # The cos/sin multiplier: the config's attention_factor, else (as transformers infers it)
    # mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are given and non-zero,
    # else mscale(factor, 1).
    attention_factor: float
    mscale_all_dim: float  # also scales the softmax (by its mscale squared) when non-zero
    truncate: bool = True  # round the correction range outward to whole dimensions


@dataclass(frozen=True)
class K2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    moe_layer_freq: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: YarnScaling | None
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    tie_word_embeddings: bool
    fp8_block_size: tuple[int, int] | None
    model_type: str = "kimi_k2"
    int4: Int4Scheme | None = None  # compressed-tensors INT4 routed experts (K2-Thinking, K2.5)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the normalised latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> K2Config:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: not found")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON ({e})") from e
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> K2Config:
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        text = raw.get("text_config")
        if isinstance(text, dict):  # K2.5 / K2.6: the language model of a multimodal config
            quant = text.get("quantization_config", raw.get("quantization_config"))
            return _parse({**text, "quantization_config": quant} if quant else text)
        return _parse(raw)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


def _parse(raw: dict[str, Any]) -> K2Config:
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise ConfigError(f"config.json is missing required fields: {', '.join(missing)}")
    if raw.get("n_routed_experts"):
        moe_missing = [
            k
            for k in ("moe_intermediate_size", "num_experts_per_tok", "routed_scaling_factor")
            if raw.get(k) is None
        ]
        if moe_missing:
            raise ConfigError(f"MoE config is missing fields: {', '.join(moe_missing)}")
    theta, scaling = _parse_rope(raw)
    quant = raw.get("quantization_config")
    cfg = K2Config(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        first_k_dense_replace=int(raw.get("first_k_dense_replace", 0)),
        moe_layer_freq=int(raw.get("moe_layer_freq", 1)),
        n_routed_experts=int(raw.get("n_routed_experts") or 0),
        n_shared_experts=int(raw.get("n_shared_experts") or 0),
        num_experts_per_tok=int(raw.get("num_experts_per_tok") or 0),
        n_group=int(raw.get("n_group") or 1),
        topk_group=int(raw.get("topk_group") or 1),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
        num_attention_heads=int(raw["num_attention_heads"]),
        q_lora_rank=None if raw.get("q_lora_rank") is None else int(raw["q_lora_rank"]),
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
        qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
        v_head_dim=int(raw["v_head_dim"]),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        bos_token_id=_opt_int(raw.get("bos_token_id")),
        eos_token_id=_opt_int(raw.get("eos_token_id")),
        pad_token_id=_opt_int(raw.get("pad_token_id")),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        fp8_block_size=_parse_quant(quant),
        int4=_parse_int4(quant),
        model_type=model_type,
    )
    _check(cfg, raw)
    return cfg


def _opt_int(v: Any) -> int | None:
    if isinstance(v, list):  # some configs list several eos ids; the first is the primary one
        v = v[0] if v else None
    return None if v is None else int(v)


def _parse_rope(raw: dict[str, Any]) -> tuple[float, YarnScaling | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "default" not in params and "rope_theta" in params:
        rope = params
        theta = rope.get("rope_theta")
    else:
        rope = raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", 10000.0)
    if theta is None:
        raise ConfigError("rope_theta is missing")
    kind = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if kind in ("default", None):
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(f"rope type {kind!r} is not supported (only yarn or default)")
    missing = [k for k in ("factor", "original_max_position_embeddings") if rope.get(k) is None]
    if missing:
        raise ConfigError(f"yarn rope scaling is missing: {', '.join(missing)}")
    factor = float(rope["factor"])
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention = rope.get("attention_factor")
    if attention is None:
        if mscale and mscale_all_dim:
            attention = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention = yarn_mscale(factor, 1.0)
    return float(theta), YarnScaling(
        factor=factor,
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        # As transformers reads them: a missing or zero beta is the paper's default.
        beta_fast=float(rope.get("beta_fast") or 32.0),
        beta_slow=float(rope.get("beta_slow") or 1.0),
        attention_factor=float(attention),
        mscale_all_dim=float(mscale_all_dim or 0.0),
        truncate=bool(rope.get("truncate", True)),
    )


def _parse_quant(quant: Any) -> tuple[int, int] | None:
    if quant is None:
        return None
    if not isinstance(quant, dict):
        raise ConfigError("quantization_config must be an object")
    method = quant.get("quant_method")
    if method == "compressed-tensors":
        return None  # INT4 experts: _parse_int4
    if method != "fp8":
        raise ConfigError(
            f"quantization_config.quant_method {method!r} is not supported "
            "(block fp8, or compressed-tensors INT4)"
        )
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise ConfigError(f"fp8 weight_block_size must be two integers, got {block!r}")
    if block != [128, 128]:  # K2's and DeepSeek-V3's; the dequantisation and kernels assume it
        raise ConfigError(f"fp8 weight_block_size {block} is not supported (only [128, 128])")
    return (block[0], block[1])


def _parse_int4(quant: Any) -> Int4Scheme | None:
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return None
    try:
        return parse_compressed_tensors(quant)
    except QuantConfigError as e:
        raise ConfigError(str(e)) from None


def _check(cfg: K2Config, raw: dict[str, Any]) -> None:
    errors = []
    positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    errors += [f"{k} must be positive" for k in positive if getattr(cfg, k) <= 0]
    if cfg.qk_rope_head_dim % 2:
        errors.append("qk_rope_head_dim must be even (rotary pairs)")
    if cfg.n_routed_experts:
        if not 0 < cfg.num_experts_per_tok <= cfg.n_routed_experts:
            errors.append("num_experts_per_tok must be in 1..n_routed_experts")
        if cfg.n_routed_experts % cfg.n_group:
            errors.append("n_routed_experts must be divisible by n_group")
        if not 0 < cfg.topk_group <= cfg.n_group:
            errors.append("topk_group must be in 1..n_group")
        elif cfg.n_group > 1 and cfg.topk_group * cfg.n_routed_experts // cfg.n_group < (
            cfg.num_experts_per_tok
        ):
            errors.append("topk_group groups hold fewer experts than num_experts_per_tok")
        if cfg.moe_layer_freq < 1:
            errors.append("moe_layer_freq must be >= 1")
    if cfg.first_k_dense_replace > cfg.num_hidden_layers:
        errors.append("first_k_dense_replace exceeds num_hidden_layers")
    method = raw.get("topk_method", "noaux_tc")
    if cfg.n_routed_experts and method != "noaux_tc":
        errors.append(f"topk_method {method!r} is not supported (only noaux_tc)")
    scoring = raw.get("scoring_func", "sigmoid")
    if cfg.n_routed_experts and scoring != "sigmoid":
        errors.append(f"scoring_func {scoring!r} is not supported (only sigmoid)")
    if raw.get("hidden_act", "silu") != "silu":
        errors.append(f"hidden_act {raw.get('hidden_act')!r} is not supported (only silu)")
    if errors:
        raise ConfigError("inconsistent config.json: " + "; ".join(errors))
