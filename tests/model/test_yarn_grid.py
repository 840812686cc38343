"""YaRN frequencies, cos/sin multiplier and softmax scale equal transformers' over a grid of
rope configs, including configs that give only one of mscale / mscale_all_dim.

Regression: with mscale 0.707 alone, our multiplier was 1.2450 against
transformers' 1.3466 (it infers the factor from `factor` alone unless both are given)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from k2model.checkpoint.random_init import tiny_config
from k2model.config import K2Config
from k2model.rope import yarn_inv_freq

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3  # noqa: E402

ABSENT = object()
GRID = list(
    itertools.product(
        [ABSENT, 0.0, 0.707, 1.0],  # mscale
        [ABSENT, 0.0, 0.707, 1.0],  # mscale_all_dim
        [4.0, 32.0],  # factor
        [ABSENT, 0.0, 1.0, 32.0],  # beta_fast
    )
)
EXTRA = [  # attention_factor given, and an untruncated correction range
    ({"attention_factor": 0.9}, 32.0),
    ({"truncate": False, "beta_fast": 32.0}, 40.0),
    ({"mscale": 0.707, "mscale_all_dim": 0.707, "attention_factor": 1.1}, 64.0),
]


def rope(mscale, mscale_all_dim, factor, beta_fast) -> dict:
    out = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 4096}
    for key, value in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
        if value is not ABSENT:
            out[key] = value
    if beta_fast is not ABSENT:
        out["beta_fast"] = beta_fast
    out["beta_slow"] = 1.0
    return out


def compare(parameters: dict) -> None:
    raw = tiny_config(model_type="deepseek_v3", rope_scaling=None, rope_theta=None)
    raw["rope_parameters"] = {**parameters, "rope_theta": 50000.0}
    ours = K2Config.from_dict(raw)
    hf_config = transformers.DeepseekV3Config(**raw)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    inv_freq, factor = yarn_inv_freq(ours)
    assert factor == pytest.approx(hf_factor, rel=1e-12), parameters
    assert torch.allclose(inv_freq.double(), hf_inv_freq.double(), rtol=1e-6, atol=0), parameters
    hf_scale = modeling_deepseek_v3.yarn_apply_mscale(
        hf_config.rope_parameters, ours.qk_head_dim**-0.5
    )
    assert ours.softmax_scale == pytest.approx(hf_scale, rel=1e-12), parameters


@pytest.mark.parametrize(("mscale", "mscale_all_dim", "factor", "beta_fast"), GRID)
def test_grid_matches_transformers(mscale, mscale_all_dim, factor, beta_fast) -> None:
    compare(rope(mscale, mscale_all_dim, factor, beta_fast))


@pytest.mark.parametrize(("extra", "factor"), EXTRA)
def test_explicit_attention_factor_and_truncate_match_transformers(extra, factor) -> None:
    compare({**rope(ABSENT, ABSENT, factor, ABSENT), **extra})


def test_the_reported_case() -> None:
    raw = tiny_config(rope_scaling=rope(0.707, ABSENT, 32.0, 1.0))
    _, factor = yarn_inv_freq(K2Config.from_dict(raw))
    assert factor == pytest.approx(0.1 * math.log(32.0) + 1.0)  # 1.3466, not 1.2450
