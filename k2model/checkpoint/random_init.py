"""Deterministic random K2-architecture checkpoints in the real HF naming, for tests and benches.

`tiny_config` gives a small config with every structural feature of K2 (dense first layer, MoE with
shared expert, MLA with q/kv low-rank paths, YaRN with K2's betas); any field can be overridden.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from k2model.checkpoint import int4
from k2model.checkpoint.loader import expected_shapes
from k2model.checkpoint.shards import write_sharded
from k2model.config import K2Config


def tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.827,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "max_position_embeddings": 131072,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": 0,
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def random_weights(
    config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Weights scaled so activations stay O(1) through the stack and routing is not degenerate."""
    cfg = K2Config.from_dict(config)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("e_score_correction_bias"):
            t = torch.randn(shape, generator=gen) * 0.05
            out[name] = t.float()
            continue
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
        out[name] = t.to(dtype)
    return out


def write_checkpoint(
    path: Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    max_shard_bytes: int = 2**30,
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_sharded(path, tensors, max_shard_bytes=max_shard_bytes, metadata=None)
    return path


def int4_experts(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of the same model with its routed experts in K2-Thinking's INT4 format:
    each `mlp.experts.E.*_proj.weight` becomes `weight_packed`, `weight_scale`, `weight_shape`."""
    out = {}
    for name, t in tensors.items():
        if int4.is_int4_weight_name(name):
            packed, scale = int4.quantize_int4(t)
            out[name + "_packed"], out[name + "_scale"] = packed, scale
            out[name + "_shape"] = torch.tensor(list(t.shape), dtype=torch.int32)
        else:
            out[name] = t
    return {**config, "quantization_config": int4.K2_THINKING_QUANTIZATION}, out
