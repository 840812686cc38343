"""Logits agree with transformers' DeepseekV3ForCausalLM on tiny K2-shaped checkpoints (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2model.checkpoint.fp8 import dequantize_block_fp8
from k2model.checkpoint.loader import load_model
from k2model.checkpoint.quantize import quantize_checkpoint
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.checkpoint.shards import ShardedCheckpoint
from tests.model.helpers import Runner, rel_err

transformers = pytest.importorskip("transformers")

TOL = 1e-4
PROMPTS = [[5, 9, 200, 3, 17], [11, 2, 300, 45, 6, 7, 8, 99, 100, 101, 400], [42]]


def hf_model(path: Path) -> torch.nn.Module:
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def make(tmp_path: Path, name: str = "ckpt", **overrides) -> Path:
    # transformers converts per-expert tensors into its fused layout only for model_type
    # deepseek_v3; our loader treats kimi_k2 and deepseek_v3 alike (tested in test_config).
    cfg = tiny_config(model_type="deepseek_v3", **overrides)
    return write_checkpoint(tmp_path / name, cfg, random_weights(cfg, dtype=torch.float32))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="module")
def models(ckpt: Path):
    return load_model(ckpt, dtype=torch.float32), hf_model(ckpt)


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_batched_ragged_prefill_matches_hf(models, form) -> None:
    ours, hf = models
    logits = Runner(ours).step(dict(enumerate(PROMPTS)), form, all_logits=True)
    start = 0
    for ids in PROMPTS:
        got = logits[start : start + len(ids)]
        start += len(ids)
        assert rel_err(got, hf_logits(hf, ids)) < TOL


def test_step_by_step_paged_decode_matches_hf(models) -> None:
    """Sequences at different lengths decode one token per step in one batch."""
    ours, hf = models
    runner = Runner(ours)
    runner.step({i: p[:-3] if len(p) > 3 else p for i, p in enumerate(PROMPTS[:2])}, "naive")
    full = [p + [7, 300, 11, 2] for p in PROMPTS[:2]]
    refs = [hf_logits(hf, f) for f in full]
    for step in range(4):
        feed = {}
        for i, f in enumerate(full):
            feed[i] = [f[runner.lengths[i]]]
        logits = runner.step(feed, "absorbed")
        for i in range(2):
            pos = runner.lengths[i] - 1
            assert rel_err(logits[i], refs[i][pos]) < TOL, (step, i)


def test_chunked_prefill_matches_hf(models) -> None:
    ours, hf = models
    ids = PROMPTS[1]
    runner = Runner(ours)
    runner.step({0: ids[:4]}, "naive")
    logits = runner.step({0: ids[4:]}, "naive", all_logits=True)
    assert rel_err(logits, hf_logits(hf, ids)[4:]) < TOL


def test_group_limited_routing_matches_hf(tmp_path: Path) -> None:
    path = make(tmp_path, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    ours, hf = load_model(path, dtype=torch.float32), hf_model(path)
    for ids in PROMPTS:
        logits = Runner(ours).step({0: ids}, "naive", all_logits=True)
        assert rel_err(logits, hf_logits(hf, ids)) < TOL


def test_rope_parameters_style_config_matches_hf(tmp_path: Path) -> None:
    """transformers 5 writes rope_theta and YaRN under `rope_parameters`."""
    rope = dict(tiny_config()["rope_scaling"], rope_type="yarn", rope_theta=50000.0)
    rope.pop("type")
    path = make(tmp_path, rope_scaling=None, rope_theta=None, rope_parameters=rope)
    ours, hf = load_model(path, dtype=torch.float32), hf_model(path)
    logits = Runner(ours).step({0: PROMPTS[1]}, "naive", all_logits=True)
    assert rel_err(logits, hf_logits(hf, PROMPTS[1])) < TOL


@pytest.mark.parametrize("resident", [False, True])
def test_fp8_checkpoint_matches_its_dequantised_twin(tmp_path: Path, resident: bool) -> None:
    """Our fp8 load (dense or fp8-resident) equals HF on the bf16->fp32 dequantised twin."""
    src = make(tmp_path, "src", hidden_size=256, moe_intermediate_size=128, intermediate_size=384)
    fp8 = tmp_path / "fp8"
    quantize_checkpoint(src, fp8)
    twin = {}
    with ShardedCheckpoint.open(fp8) as q:
        for name in q.names():
            if name.endswith("_scale_inv"):
                continue
            t = q.get(name)
            if t.dtype == torch.float8_e4m3fn:
                t = dequantize_block_fp8(t, q.get(name + "_scale_inv"), torch.float32)
            twin[name] = t.float()
    cfg = tiny_config(
        model_type="deepseek_v3", hidden_size=256, moe_intermediate_size=128, intermediate_size=384
    )
    twin_path = write_checkpoint(tmp_path / "twin", cfg, twin)
    ours = load_model(fp8, dtype=torch.float32, fp8_resident=resident)
    hf = hf_model(twin_path)
    for ids in PROMPTS[:2]:
        logits = Runner(ours).step({0: ids}, "absorbed", all_logits=True)
        assert rel_err(logits, hf_logits(hf, ids)) < TOL
