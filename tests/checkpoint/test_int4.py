"""INT4 routed experts (compressed-tensors pack-quantized, group 32: K2-Thinking and later):
the packing is the compressed-tensors library's own, the config is validated field by field,
weights stay packed (a quarter of bf16's bytes), and the model computes what the dequantised
weights compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from k2model import generate_ids
from k2model.checkpoint.int4 import (
    K2_THINKING_QUANTIZATION,
    dequantize_int4,
    is_int4_weight_name,
    pack_int4,
    quantize_int4,
    unpack_int4,
)
from k2model.checkpoint.loader import load_expert_slice, load_model
from k2model.checkpoint.random_init import (
    int4_experts,
    random_weights,
    tiny_config,
    write_checkpoint,
)
from k2model.checkpoint.shards import CheckpointError
from k2model.config import ConfigError, K2Config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    """(INT4 checkpoint, the same weights dequantised, in fp32: q * scale is exact there)."""
    config = tiny_config()
    tensors = random_weights(config, seed=3)
    int4_config, int4_tensors = int4_experts(config, tensors)
    dense = {}
    for name, t in int4_tensors.items():
        if name.endswith("_packed"):
            base = name.removesuffix("_packed")
            dense[base] = dequantize_int4(t, int4_tensors[base + "_scale"], torch.float32)
        elif not name.endswith(("_scale", "_shape")):
            dense[name] = t
    root = tmp_path_factory.mktemp("int4")
    return (
        write_checkpoint(root / "int4", int4_config, int4_tensors),
        write_checkpoint(root / "dense", config, dense),
    )


@pytest.mark.parametrize("shape", [(3, 8), (5, 64), (2, 4, 96)])
def test_packing_is_compressed_tensors_own(shape) -> None:
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_int4(q)
    assert torch.equal(packed, pack_to_int32(q, 4))  # offset binary, least significant first
    assert torch.equal(unpack_int4(packed, shape[-1]), q)
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size(shape)), q)


def test_nibbles_are_offset_binary() -> None:
    """0x...F8 = q 7 then q 0: stored = q + 8 (not two's complement, where 0xF is -1)."""
    assert unpack_int4(torch.tensor([[0x000000F8]], dtype=torch.int32), 2).tolist() == [[0, 7]]
    w = torch.randn(4, 64)
    packed, scale = quantize_int4(w)
    assert (
        (dequantize_int4(packed, scale, torch.float32) - w).abs()
        <= scale.float().repeat_interleave(32, -1) / 2 + 1e-6
    ).all()


def test_experts_stay_packed_and_compute_like_the_dequantised_weights(checkpoints) -> None:
    int4_path, dense_path = checkpoints
    int4 = load_model(int4_path, dtype=torch.float32)
    dense = load_model(dense_path, dtype=torch.float32)
    for moe in int4.moe_layers().values():
        ex = moe.experts
        assert ex.int4 and ex.int4_gate_up.dtype == torch.int32 and ex.gate_up.numel() == 0
        packed = sum(b.numel() * b.element_size() for n, b in ex.named_buffers() if "int4" in n)
        bf16 = 2 * ex.n_experts * 3 * ex.inter * ex.dim
        assert packed < 0.3 * bf16  # 4 bits + a bf16 scale per 32 values
    prompts = [[5, 17, 99, 3], list(range(40, 70)), [7]]
    assert generate_ids(int4, prompts, 8) == generate_ids(dense, prompts, 8)
    x = torch.randn(6, int4.cfg.hidden_size)
    layer = next(iter(int4.moe_layers()))
    got, want = int4.moe_layers()[layer](x), dense.moe_layers()[layer](x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_an_expert_slice_loads_only_its_packed_experts(checkpoints) -> None:
    int4_path, dense_path = checkpoints
    _, experts = load_expert_slice(int4_path, 2, 3, dtype=torch.float32)
    _, reference = load_expert_slice(dense_path, 2, 3, dtype=torch.float32)
    x, ids, w = torch.randn(4, 64), torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1]]), torch.rand(4, 2)
    for layer, ex in experts.items():
        assert ex.int4 and ex.int4_down.shape[0] == 3
        assert torch.allclose(ex(x, ids, w), reference[layer](x, ids, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"format": "float-quantized"}, "quantization_config.format"),
        ({"num_bits": 8}, "weights.num_bits"),
        ({"symmetric": False}, "weights.symmetric"),
        ({"group_size": 128}, "weights.group_size"),
        ({"actorder": "group"}, "weights.actorder"),
        ({"input_activations": {"num_bits": 8}}, "input_activations"),
    ],
)
def test_schemes_not_served_are_one_error_naming_the_field(change, field) -> None:
    quant = {
        **K2_THINKING_QUANTIZATION,
        "config_groups": {"group_0": dict(K2_THINKING_QUANTIZATION["config_groups"]["group_0"])},
    }
    group = quant["config_groups"]["group_0"]
    group["weights"] = dict(group["weights"])
    for key, value in change.items():
        if key == "format":
            quant[key] = value
        elif key == "input_activations":
            group[key] = value
        else:
            group["weights"][key] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        K2Config.from_dict(tiny_config(quantization_config=quant))


def test_int4_tensors_without_the_scheme_or_off_the_experts_are_refused(tmp_path) -> None:
    config = tiny_config()
    _, tensors = int4_experts(config, random_weights(config))
    plain = write_checkpoint(tmp_path / "noscheme", config, tensors)
    with pytest.raises(CheckpointError, match="no compressed-tensors scheme"):
        load_model(plain)
    int4_config, tensors = int4_experts(config, random_weights(config))
    name = "model.layers.0.self_attn.o_proj.weight"
    packed, scale = quantize_int4(tensors.pop(name))
    tensors |= {name + "_packed": packed, name + "_scale": scale,
                name + "_shape": torch.tensor([64, 64], dtype=torch.int32)}  # fmt: skip
    attention = write_checkpoint(tmp_path / "attn", int4_config, tensors)
    with pytest.raises(CheckpointError, match="routed experts only"):
        load_model(attention)


def test_a_multimodal_k2_5_checkpoint_loads_its_language_model(
    tmp_path, checkpoints, caplog
) -> None:
    """K2.5 / K2.6 nest the text model's config under text_config (quantization_config beside
    it) and its tensors under language_model.; the vision tower and projector are skipped."""
    int4_path, _ = checkpoints
    config = tiny_config(max_position_embeddings=262144)
    int4_config, tensors = int4_experts(config, random_weights(config, seed=3))
    quant = int4_config.pop("quantization_config")
    outer = {
        "architectures": ["KimiK25ForConditionalGeneration"],
        "model_type": "kimi_k25",
        "text_config": int4_config,
        "vision_config": {"hidden_size": 16},
        "quantization_config": quant,
    }
    multimodal = {f"language_model.{n}": t for n, t in tensors.items()}
    multimodal |= {"vision_tower.patch.weight": torch.zeros(4, 4), "mm_projector.w": torch.zeros(2)}
    path = write_checkpoint(tmp_path / "k25", outer, multimodal)
    with caplog.at_level("INFO"):
        model = load_model(path, dtype=torch.float32)
    assert "2 non-text tensors skipped" in caplog.text
    assert model.cfg.max_position_embeddings == 262144 and model.cfg.int4 is not None
    text = load_model(int4_path, dtype=torch.float32)
    assert generate_ids(model, [[5, 6, 7]], 6) == generate_ids(text, [[5, 6, 7]], 6)


def _break(tensors: dict[str, torch.Tensor], how: str) -> str:
    """Damages one expert's INT4 triple in place; returns what the loader must say."""
    base = "model.layers.1.mlp.experts.3.down_proj.weight"
    if how == "missing scale":
        del tensors[base + "_scale"]
        return f"missing tensor {base}_scale"
    if how == "wrong packed shape":
        tensors[base + "_packed"] = tensors[base + "_packed"][:, :-1].contiguous()
        return rf"{base}_packed is \[64, 3\] torch.int32, expected \[64, 4\]"
    if how == "wrong shape tensor":
        tensors[base + "_shape"] = torch.tensor([32, 64], dtype=torch.int32)
        return rf"{base}_shape says \[32, 64\], expected \[64, 32\]"
    if how == "one expert left dense":
        for part in ("packed", "scale", "shape"):
            del tensors[f"{base}_{part}"]
        tensors[base] = torch.zeros(64, 32, dtype=torch.bfloat16)
        return f"{base} is not INT4, though this checkpoint's other routed experts are"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["missing scale", "wrong packed shape", "wrong shape tensor", "one expert left dense"]
)
def test_a_damaged_int4_expert_is_named(tmp_path, how) -> None:
    config = tiny_config()
    int4_config, tensors = int4_experts(config, random_weights(config))
    message = _break(tensors, how)
    path = write_checkpoint(tmp_path / "bad", int4_config, tensors)
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_experts_whose_width_is_not_whole_groups_are_refused(tmp_path) -> None:
    """moe_intermediate_size 48: down_proj's 48 input columns are one and a half groups."""
    config = tiny_config(moe_intermediate_size=48)
    tensors = random_weights(config)
    out = {}
    for name, t in tensors.items():
        if is_int4_weight_name(name):
            cols = -(-t.shape[1] // 32) * 32
            wide = torch.nn.functional.pad(t, (0, cols - t.shape[1]))
            packed, scale = quantize_int4(wide)
            out |= {name + "_packed": packed[:, : t.shape[1] // 8], name + "_scale": scale,
                    name + "_shape": torch.tensor(list(t.shape), dtype=torch.int32)}  # fmt: skip
        else:
            out[name] = t
    quant = {**config, "quantization_config": K2_THINKING_QUANTIZATION}
    path = write_checkpoint(tmp_path / "odd", quant, out)
    with pytest.raises(CheckpointError, match="48 input columns are not whole groups of 32"):
        load_model(path)
