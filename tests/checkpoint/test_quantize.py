"""The quantiser: a tiny bf16 K2-shaped checkpoint converted to block-fp8 and checked back."""

import json
import math
from pathlib import Path

import pytest
import torch

from k2model.checkpoint.fp8 import dequantize_block_fp8
from k2model.checkpoint.quantize import main, quantize_checkpoint
from k2model.checkpoint.shards import (
    INDEX_NAME,
    CheckpointError,
    ShardedCheckpoint,
    write_sharded,
)

# Written out by hand from docs/checkpoint.md, tensor names rather than derived from is_quantized_weight_name.
QUANTIZED = {
    "model.layers.0.self_attn.q_a_proj.weight": (200, 300),
    "model.layers.0.self_attn.q_b_proj.weight": (256, 200),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (72, 300),
    "model.layers.0.self_attn.kv_b_proj.weight": (256, 64),
    "model.layers.0.self_attn.o_proj.weight": (300, 128),
    "model.layers.0.mlp.gate_proj.weight": (130, 300),
    "model.layers.0.mlp.up_proj.weight": (130, 300),
    "model.layers.0.mlp.down_proj.weight": (300, 130),
    "model.layers.1.mlp.experts.0.gate_proj.weight": (64, 300),
    "model.layers.1.mlp.experts.1.down_proj.weight": (300, 64),
    "model.layers.1.mlp.shared_experts.up_proj.weight": (64, 300),
}
UNQUANTIZED = {
    "model.embed_tokens.weight": ((50, 300), torch.bfloat16),
    "lm_head.weight": ((50, 300), torch.bfloat16),
    "model.norm.weight": ((300,), torch.bfloat16),
    "model.layers.0.input_layernorm.weight": ((300,), torch.bfloat16),
    "model.layers.0.self_attn.q_a_layernorm.weight": ((200,), torch.bfloat16),
    "model.layers.0.self_attn.rotary_emb.inv_freq": ((32,), torch.bfloat16),
    "model.layers.1.mlp.gate.weight": ((4, 300), torch.bfloat16),
    "model.layers.1.mlp.gate.e_score_correction_bias": ((4,), torch.float32),
}
CONFIG = {"model_type": "kimi_k2", "hidden_size": 300, "torch_dtype": "bfloat16"}
SIDE_FILES = {
    "tokenizer_config.json": '{"model_max_length": 131072}',
    "tiktoken.model": "aGVsbG8= 0\n",
    "chat_template.jinja": "{{ messages }}",
}


def _source_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g).bfloat16() for n, s in QUANTIZED.items()}
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors[
        "model.layers.0.mlp.up_proj.weight"
    ].float()
    tensors |= {n: torch.randn(s, generator=g).to(d) for n, (s, d) in UNQUANTIZED.items()}
    return tensors


def _make_source(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> Path:
    write_sharded(path, tensors, max_shard_bytes=100_000)
    (path / "config.json").write_text(json.dumps(config))
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    return path


@pytest.fixture
def converted(tmp_path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    tensors = _source_tensors()
    src = _make_source(tmp_path / "src", tensors, CONFIG)
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    quantize_checkpoint(src, tmp_path / "dst", max_shard_bytes=60_000)
    return tensors, tmp_path / "dst"


def test_names_dtypes_and_shapes(converted: tuple[dict[str, torch.Tensor], Path]) -> None:
    source, dst = converted
    scales = {f"{name}_scale_inv" for name in QUANTIZED}
    with ShardedCheckpoint.open(dst) as ckpt:
        assert set(ckpt.names()) == set(source) | scales
        assert len(set(map(ckpt.shard_of, ckpt.names()))) > 1
        for name, (out, inp) in QUANTIZED.items():
            assert ckpt.dtype(name) == torch.float8_e4m3fn
            assert ckpt.shape(name) == (out, inp)
            assert ckpt.dtype(f"{name}_scale_inv") == torch.float32
            assert ckpt.shape(f"{name}_scale_inv") == (math.ceil(out / 128), math.ceil(inp / 128))


def test_unquantized_tensors_are_copied_bit_exactly(
    converted: tuple[dict[str, torch.Tensor], Path],
) -> None:
    source, dst = converted
    with ShardedCheckpoint.open(dst) as ckpt:
        for name, (_, dtype) in UNQUANTIZED.items():
            assert ckpt.dtype(name) == dtype
            assert torch.equal(ckpt.get(name), source[name])


def test_dequantised_weights_are_close_to_the_source(
    converted: tuple[dict[str, torch.Tensor], Path],
) -> None:
    source, dst = converted
    with ShardedCheckpoint.open(dst) as ckpt:
        for name in QUANTIZED:
            restored = dequantize_block_fp8(
                ckpt.get(name), ckpt.get(f"{name}_scale_inv"), torch.float32
            )
            original = source[name].float()
            block_amax = ckpt.get(f"{name}_scale_inv").max() * 448
            # Within e4m3's 2^-4 relative rounding, plus subnormal slack relative to the scale.
            bound = original.abs() * 2.0**-4 + block_amax / 448 * 2.0**-10 + 1e-7
            assert ((restored - original).abs() <= bound).all(), name


def test_config_and_side_files(converted: tuple[dict[str, torch.Tensor], Path]) -> None:
    _, dst = converted
    config = json.loads((dst / "config.json").read_text())
    assert config == CONFIG | {
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    }
    for name, text in SIDE_FILES.items():
        assert (dst / name).read_text() == text
    assert not (dst / "pytorch_model.bin").exists()
    assert (dst / INDEX_NAME).exists()


def test_refuses_fp8_source(tmp_path: Path) -> None:
    tensors = _source_tensors()
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    src = _make_source(tmp_path / "src", tensors, CONFIG)
    with pytest.raises(CheckpointError, match=f"already quantised.*{name}"):
        quantize_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_refuses_source_whose_config_says_quantised(tmp_path: Path) -> None:
    config = CONFIG | {"quantization_config": {"quant_method": "fp8"}}
    src = _make_source(tmp_path / "src", _source_tensors(), config)
    with pytest.raises(CheckpointError, match="already quantised"):
        quantize_checkpoint(src, tmp_path / "dst")


def test_refuses_weights_that_cannot_be_block_quantised(tmp_path: Path) -> None:
    tensors = _source_tensors()
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.ones(3, 4, 5)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.ones(4, 4, dtype=torch.int32)
    src = _make_source(tmp_path / "src", tensors, CONFIG)
    with pytest.raises(CheckpointError, match=r"not 2-D bf16/fp16/fp32 \(2\)"):
        quantize_checkpoint(src, tmp_path / "dst")


def test_refuses_non_empty_destination(tmp_path: Path) -> None:
    src = _make_source(tmp_path / "src", _source_tensors(), CONFIG)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="new or empty"):
        quantize_checkpoint(src, tmp_path / "dst")
    with pytest.raises(CheckpointError, match="new or empty"):
        quantize_checkpoint(src, src)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _make_source(tmp_path / "src", _source_tensors(), CONFIG)
    assert main([str(src), str(tmp_path / "dst"), "--max-shard-bytes", "1000000"]) == 0
    with ShardedCheckpoint.open(tmp_path / "dst") as ckpt:
        assert ckpt.dtype("model.layers.0.self_attn.o_proj.weight") == torch.float8_e4m3fn
    assert main([str(tmp_path / "dst"), str(tmp_path / "again")]) == 1
    assert "already quantised" in capsys.readouterr().err
