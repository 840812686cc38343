"""Loader errors name every bad tensor; stale and stray files are ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from k2model.checkpoint.loader import load_model
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.checkpoint.shards import CheckpointError
from tests.model.helpers import Runner, rel_err


def write(tmp_path: Path, mutate=None, **kw) -> Path:
    cfg = tiny_config()
    tensors = random_weights(cfg, seed=2)
    if mutate:
        mutate(tensors)
    return write_checkpoint(tmp_path / "ck", cfg, tensors, **kw)


def test_missing_tensor_named(tmp_path: Path) -> None:
    path = write(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj"
    ):
        load_model(path)


def test_every_problem_in_one_error(tmp_path: Path) -> None:
    def mutate(t):
        t.pop("model.norm.weight")
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
        t["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)

    with pytest.raises(CheckpointError) as err:
        load_model(write(tmp_path, mutate))
    text = str(err.value)
    assert "missing tensor model.norm.weight" in text
    assert "o_proj.weight has shape [3, 3], expected [64, 64]" in text
    assert "unexpected tensor model.layers.0.self_attn.surprise.weight" in text


def test_unsupported_dtype(tmp_path: Path) -> None:
    def mutate(t):
        t["model.norm.weight"] = torch.ones(64, dtype=torch.int32)

    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has unsupported dtype"):
        load_model(write(tmp_path, mutate))


def test_fp8_without_scale(tmp_path: Path) -> None:
    def mutate(t):
        name = "model.layers.0.self_attn.o_proj.weight"
        t[name] = t[name].to(torch.float8_e4m3fn)

    with pytest.raises(CheckpointError, match=r"is fp8 but has no .*o_proj\.weight_scale_inv"):
        load_model(write(tmp_path, mutate))


def test_bad_index_file(tmp_path: Path) -> None:
    path = write(tmp_path, max_shard_bytes=20_000)
    (path / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(CheckpointError):
        load_model(path)


def test_stale_inv_freq_and_stray_files_ignored(tmp_path: Path, tiny_ckpt: Path) -> None:
    path = write(
        tmp_path,
        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}),
        max_shard_bytes=20_000,
    )
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    save_file({"junk": torch.zeros(1)}, str(path / "consolidated.safetensors"))
    model = load_model(path, dtype=torch.float32)
    ref = write_checkpoint(tmp_path / "ref", tiny_config(), random_weights(tiny_config(), seed=2))
    a = Runner(model).step({0: [1, 2, 3]}, "naive")
    b = Runner(load_model(ref, dtype=torch.float32)).step({0: [1, 2, 3]}, "naive")
    assert rel_err(a, b) == 0.0


def test_mtp_layer_ignored(tmp_path: Path) -> None:
    """DeepSeek-V3 checkpoints carry an MTP layer past num_hidden_layers; inference skips it."""
    path = write(tmp_path, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(2, 2)}))
    load_model(path)


def test_without_routed_experts_reads_none_and_needs_a_remote(tiny_ckpt: Path) -> None:
    """Prefill/decode instances with remote experts hold no routed experts at all."""
    from k2model.checkpoint.loader import load_expert_slice

    model = load_model(tiny_ckpt, dtype=torch.float32, routed_experts=False)
    moes = model.moe_layers()
    assert all(m.experts.gate_up.numel() == 0 for m in moes.values())
    with pytest.raises(RuntimeError, match="no remote"):
        Runner(model).step({0: [1, 2, 3]}, "naive")
    _, experts = load_expert_slice(tiny_ckpt, 0, model.cfg.n_routed_experts, dtype=torch.float32)
    for layer, moe in moes.items():
        moe.remote = experts[layer]
    full = load_model(tiny_ckpt, dtype=torch.float32)
    a = Runner(model).step({0: [1, 2, 3]}, "naive")
    b = Runner(full).step({0: [1, 2, 3]}, "naive")
    assert rel_err(a, b) < 1e-6
