"""`python -m k2model.checkpoint.quantize --int4`: a bf16 checkpoint becomes K2-Thinking's format,
which the compressed-tensors library reads back tensor for tensor, and whose packer's output loads
in ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig

from k2model import generate_ids
from k2model.checkpoint.int4 import (
    K2_THINKING_QUANTIZATION,
    dequantize_int4,
    is_int4_weight_name,
    quantize_int4,
)
from k2model.checkpoint.loader import load_model
from k2model.checkpoint.quantize import main, quantize_checkpoint
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.checkpoint.shards import CheckpointError, ShardedCheckpoint


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with ShardedCheckpoint.open(path) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.names()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    config = tiny_config()
    tensors = random_weights(config, seed=5)
    path = write_checkpoint(tmp_path_factory.mktemp("src") / "bf16", config, tensors)
    (path / "tiktoken.model").write_text("aGVsbG8= 0\n")
    return path, tensors


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("dst") / "int4"
    assert main(["--int4", str(source[0]), str(dst), "--max-shard-bytes", "40000"]) == 0
    return dst


def test_routed_experts_are_packed_and_the_rest_is_copied(source, converted) -> None:
    _, original = source
    out = _tensors(converted)
    experts = [n for n in original if is_int4_weight_name(n)]
    assert experts and all(".mlp.experts." in n for n in experts)
    assert len(experts) == 2 * 8 * 3  # 2 MoE layers, 8 experts, gate/up/down
    for name, t in original.items():
        if name in experts:
            assert name not in out
            packed, scale = quantize_int4(t)
            assert torch.equal(out[name + "_packed"], packed)
            assert torch.equal(out[name + "_scale"], scale)
            assert out[name + "_shape"].tolist() == list(t.shape)
        else:
            assert torch.equal(out[name], t), name
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization_config"] == K2_THINKING_QUANTIZATION
    assert (converted / "tiktoken.model").read_text() == "aGVsbG8= 0\n"
    with ShardedCheckpoint.open(converted) as ckpt:
        assert len({ckpt.shard_of(n) for n in ckpt.names()}) > 1


def test_compressed_tensors_reads_our_checkpoint(converted) -> None:
    """The library's own model-free dequantiser, driven by our config.json: it finds every
    packed weight through our ignore list (no residual qparams) and computes our dequantisation.
    It multiplies in the scale's bf16, ours in fp32 (where q * scale is exact): equal once
    rounded to bf16."""
    ours = _tensors(converted)
    theirs = CompressedTensorsDequantizer(converted, dtype=torch.float32).validate(dict(ours))
    bases = {n.removesuffix("_packed") for n in ours if n.endswith("_packed")}
    assert bases and not any(n.endswith(("_packed", "_scale", "_shape")) for n in theirs)
    for base in bases:
        want = dequantize_int4(ours[base + "_packed"], ours[base + "_scale"], torch.float32)
        assert torch.equal(theirs[base], want.bfloat16().float()), base


def test_the_compressed_tensors_packer_output_loads_in_ours(source, converted, tmp_path) -> None:
    """A checkpoint packed by compressed-tensors' PackedQuantizationCompressor (from the same
    scales) is ours tensor for tensor, and serves the same tokens. Both divide by the scale in
    fp32 here; given bf16 the library divides in bf16, and ~0.5% of nibbles move by one."""
    _, original = source
    scheme = QuantizationConfig.model_validate(K2_THINKING_QUANTIZATION).config_groups["group_0"]
    packed_by_them = {}
    for name, t in original.items():
        if not is_int4_weight_name(name):
            packed_by_them[name] = t
            continue
        _, scale = quantize_int4(t)
        state = PackedQuantizationCompressor.compress(
            {"weight": t.float(), "weight_scale": scale.float()}, scheme
        )
        packed_by_them |= {
            f"{name}_{part}": state[f"weight_{part}"] for part in ("packed", "scale")
        }
        packed_by_them[name + "_shape"] = state["weight_shape"]
    config = json.loads((converted / "config.json").read_text())
    theirs = write_checkpoint(tmp_path / "theirs", config, packed_by_them)
    ours = _tensors(converted)
    for name, t in _tensors(theirs).items():
        assert torch.equal(t.to(ours[name].dtype), ours[name]), name
    a, b = load_model(theirs, dtype=torch.float32), load_model(converted, dtype=torch.float32)
    prompts = [[3, 9, 27, 81], [100]]
    assert generate_ids(a, prompts, 6) == generate_ids(b, prompts, 6)


def test_a_multimodal_source_keeps_its_vision_tower(tmp_path) -> None:
    config = tiny_config()
    inner = random_weights(config, seed=2)
    tensors = {f"language_model.{n}": t for n, t in inner.items()}
    tensors["vision_tower.patch.weight"] = torch.ones(32, 32, dtype=torch.bfloat16)
    outer = {"model_type": "kimi_k25", "text_config": config, "vision_config": {}}
    src = write_checkpoint(tmp_path / "src", outer, tensors)
    quantize_checkpoint(src, tmp_path / "dst", fmt="int4")
    out = _tensors(tmp_path / "dst")
    assert "language_model.model.layers.1.mlp.experts.0.up_proj.weight_packed" in out
    assert torch.equal(out["vision_tower.patch.weight"], tensors["vision_tower.patch.weight"])
    quant = json.loads((tmp_path / "dst" / "config.json").read_text())["quantization_config"]
    assert quant["ignore"][-2:] == ["re:vision_tower.*", "re:mm_projector.*"]
    model = load_model(tmp_path / "dst", dtype=torch.float32)
    assert model.cfg.int4 is not None


def test_refusals(source, converted, tmp_path, capsys) -> None:
    assert main(["--int4", str(converted), str(tmp_path / "again")]) == 1
    assert "already quantised" in capsys.readouterr().err
    config = tiny_config(moe_intermediate_size=48)
    src = write_checkpoint(tmp_path / "odd", config, random_weights(config))
    with pytest.raises(CheckpointError, match=r"int4 weights that are not 2-D with input columns"):
        quantize_checkpoint(src, tmp_path / "out", fmt="int4")
    assert not (tmp_path / "out").exists()
