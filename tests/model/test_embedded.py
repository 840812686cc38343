"""The shipped checkpoint is what its committed script makes, is K2-format fp8, and generates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from k2model.checkpoint.shards import ShardedCheckpoint
from k2model.config import K2Config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_embedded_checkpoint.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_embedded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_checkpoint_is_reproducible() -> None:
    script = load_script()
    assert json.loads((EMBEDDED_CHECKPOINT / "config.json").read_text()) == script.CONFIG
    fresh = script.build()
    with ShardedCheckpoint.open(EMBEDDED_CHECKPOINT) as ckpt:
        assert sorted(fresh) == ckpt.names()
        for name, t in fresh.items():
            assert torch.equal(ckpt.get(name).view(torch.uint8), t.view(torch.uint8)), name


def test_every_k2_structural_feature_present() -> None:
    cfg = K2Config.from_dir(EMBEDDED_CHECKPOINT)
    assert cfg.fp8_block_size == (128, 128) and cfg.rope_scaling is not None
    assert cfg.first_k_dense_replace == 1 and cfg.n_shared_experts == 1 and cfg.q_lora_rank
    with ShardedCheckpoint.open(EMBEDDED_CHECKPOINT) as ckpt:
        assert ckpt.dtype("model.layers.1.mlp.experts.0.up_proj.weight") == torch.float8_e4m3fn
        assert ckpt.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == torch.float32


def test_fp8_resident_generates_like_dequantised() -> None:
    dense = generate_ids(load_model(EMBEDDED_CHECKPOINT), [[1, 2, 3], [7]], 8)
    resident = generate_ids(load_model(EMBEDDED_CHECKPOINT, fp8_resident=True), [[1, 2, 3], [7]], 8)
    assert dense == resident
