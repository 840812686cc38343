"""config.json parsing: K2's real values, both rope styles, and clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from k2model.checkpoint.random_init import tiny_config
from k2model.config import ConfigError, K2Config
from k2model.rope import yarn_inv_freq

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "k2_instruct_config.json"


def k2_raw() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not present (../shared is beside the repo in CI)")
    return json.loads(REFERENCE.read_text())


def test_real_k2_instruct_config() -> None:
    cfg = K2Config.from_dict(k2_raw())
    assert (cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_attention_heads) == (61, 384, 64)
    assert cfg.kv_cache_dim == 576 and cfg.fp8_block_size == (128, 128)
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1) and cfg.is_moe_layer(60)
    assert cfg.softmax_scale == pytest.approx(0.1308608, abs=1e-7)  # docs/model.md, softmax scale
    assert cfg.rope_scaling.beta_fast == 1.0 and cfg.rope_scaling.beta_slow == 1.0


def test_k2_yarn_hard_switch_at_19_20() -> None:
    """beta 1/1: frequencies 0..19 keep theta^(-2i/d), 20..31 are divided by the factor."""
    cfg = K2Config.from_dict(k2_raw())
    inv, mscale = yarn_inv_freq(cfg)
    base = 1.0 / 50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(inv[:20].double(), base[:20], rtol=1e-6)
    assert torch.allclose(inv[20:].double(), base[20:] / 32, rtol=1e-6)
    assert mscale == 1.0


def test_beta_fast_32_blends() -> None:
    raw = k2_raw()
    raw["rope_scaling"] = dict(raw["rope_scaling"], beta_fast=32.0)
    inv, _ = yarn_inv_freq(K2Config.from_dict(raw))
    base = 1.0 / 50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(inv[:9].double(), base[:9], rtol=1e-6)  # low = 8
    assert not torch.allclose(inv[10].double(), base[10], rtol=1e-3)


def test_factor_64_scale() -> None:
    raw = k2_raw()
    raw["rope_scaling"] = dict(raw["rope_scaling"], factor=64.0)
    assert K2Config.from_dict(raw).softmax_scale == pytest.approx(0.1446796, abs=1e-7)


def test_rope_parameters_style_equals_rope_scaling_style() -> None:
    old = tiny_config()
    rope = dict(old["rope_scaling"], rope_type="yarn", rope_theta=old["rope_theta"])
    del rope["type"]
    new = tiny_config(rope_scaling=None, rope_theta=None, rope_parameters=rope)
    assert K2Config.from_dict(old) == K2Config.from_dict(new)


def test_deepseek_v3_model_type_accepted() -> None:
    assert K2Config.from_dict(tiny_config(model_type="deepseek_v3")).model_type == "deepseek_v3"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_size": None}, "missing required fields: hidden_size"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"n_group": 3}, "divisible by n_group"),
        ({"topk_group": 2}, "topk_group"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"qk_rope_head_dim": 7}, "even"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type"),
        ({"rope_scaling": {"type": "yarn"}}, "factor"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}}, "block"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
            r"\[64, 64\] is not supported",
        ),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace"),
    ],
)
def test_bad_configs(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        K2Config.from_dict(tiny_config(**change))


def test_missing_and_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        K2Config.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="invalid JSON"):
        K2Config.from_dir(tmp_path)


def test_config_is_frozen() -> None:
    cfg = K2Config.from_dict(tiny_config())
    with pytest.raises(AttributeError):
        cfg.hidden_size = 1  # type: ignore[misc]
    assert math.isfinite(cfg.softmax_scale)
