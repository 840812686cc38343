"""Block-fp8 weight and activation quantisation against slow per-element references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model.checkpoint.fp8 import (
    act_dequant_fp8,
    act_quant_fp8,
    dequantize_block_fp8,
    is_quantized_weight_name,
    quantize_block_fp8,
)
from k2model.checkpoint.shards import CheckpointError

E4M3_MAX = 448.0
# e4m3 has 3 mantissa bits: round-to-nearest is within 2^-4 relative for normal values; below
# the smallest normal (2^-6) the spacing is 2^-9, so the absolute error is at most 2^-10.
REL_BOUND = 2.0**-4
SUBNORMAL_BOUND = 2.0**-10


def _varied_weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights whose magnitude differs by orders of magnitude between rows and columns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    rows = torch.logspace(-3, 2, out)[torch.randperm(out, generator=g)]
    cols = torch.logspace(-1, 1, inp)[torch.randperm(inp, generator=g)]
    return w * rows[:, None] * cols[None, :]


def _block_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    """Slow twin: amax of each block, one Python iteration per block."""
    ob, ib = math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)
    amax = torch.empty(ob, ib)
    for i in range(ob):
        for j in range(ib):
            amax[i, j] = w[i * block : (i + 1) * block, j * block : (j + 1) * block].abs().max()
    return amax


def _expanded(scale: torch.Tensor, shape: tuple[int, ...], block: int) -> torch.Tensor:
    """scale[i // block, j // block] at every [i, j], by gather rather than by padding."""
    rows = torch.arange(shape[0]) // block
    cols = torch.arange(shape[1]) // block
    return scale[rows][:, cols]


def _assert_within_bound(x: torch.Tensor, approx: torch.Tensor, scale: torch.Tensor) -> None:
    bound = REL_BOUND * x.abs() + SUBNORMAL_BOUND * scale
    excess = (approx - x).abs() - bound * (1 + 1e-6)
    assert excess.max().item() <= 0, f"worst excess {excess.max().item()}"


@pytest.mark.parametrize(("out", "inp", "block"), [(200, 300, 128), (576, 256, 128), (5, 7, 4)])
def test_roundtrip_error_is_bounded_by_block_scale(out: int, inp: int, block: int) -> None:
    w = _varied_weight(out, inp)
    w_fp8, scale_inv = quantize_block_fp8(w, block)
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (math.ceil(out / block), math.ceil(inp / block))
    torch.testing.assert_close(scale_inv, _block_amax(w, block) / E4M3_MAX, rtol=1e-6, atol=0)
    restored = dequantize_block_fp8(w_fp8, scale_inv, torch.float32, block)
    _assert_within_bound(w, restored, _expanded(scale_inv, w.shape, block))


def test_block_maximum_maps_to_the_fp8_maximum() -> None:
    w = _varied_weight(200, 300)
    w_fp8, _ = quantize_block_fp8(w)
    per_block = _block_amax(w_fp8.float(), 128)
    assert torch.equal(per_block, torch.full_like(per_block, E4M3_MAX))


def test_bf16_input_and_output() -> None:
    w = _varied_weight(130, 129).bfloat16()
    w_fp8, scale_inv = quantize_block_fp8(w)
    restored = dequantize_block_fp8(w_fp8, scale_inv)
    assert restored.dtype == torch.bfloat16
    # One more bf16 rounding (8 mantissa bits) on top of the fp8 bound.
    bound = (REL_BOUND + 2.0**-8) * w.float().abs() + _expanded(scale_inv, w.shape, 128) * 2.0**-9
    assert ((restored.float() - w.float()).abs() <= bound).all()


def test_zero_block_gets_a_finite_scale_and_stays_zero() -> None:
    w = _varied_weight(256, 256)
    w[:128, 128:] = 0
    w_fp8, scale_inv = quantize_block_fp8(w)
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()
    restored = dequantize_block_fp8(w_fp8, scale_inv, torch.float32)
    assert torch.equal(restored[:128, 128:], torch.zeros(128, 128))
    assert torch.isfinite(restored).all()


def test_non_finite_weight_is_refused() -> None:
    w = torch.ones(4, 4)
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_block_fp8(w)


@pytest.mark.parametrize(("out", "inp"), [(200, 300), (576, 384), (128, 128), (1, 129)])
def test_dequant_equals_manual_multiplication(out: int, inp: int) -> None:
    g = torch.Generator().manual_seed(1)
    w_fp8 = (torch.randn(out, inp, generator=g) * 50).to(torch.float8_e4m3fn)
    scale = torch.rand(math.ceil(out / 128), math.ceil(inp / 128), generator=g) + 0.01
    expected = torch.empty(out, inp)
    for i in range(out):  # W[i, j] = w_fp8[i, j] * scale_inv[i // 128, j // 128], row by row
        expected[i] = w_fp8[i].float() * scale[i // 128].repeat_interleave(128)[:inp]
    assert torch.equal(dequantize_block_fp8(w_fp8, scale, torch.float32), expected)
    assert torch.equal(dequantize_block_fp8(w_fp8, scale), expected.bfloat16())


@pytest.mark.parametrize("bad_shape", [(1, 3), (2, 2), (3, 2), (2, 3, 1), (6,)])
def test_scale_shape_mismatch_raises(bad_shape: tuple[int, ...]) -> None:
    w_fp8 = torch.zeros(200, 300).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"needs \[2, 3\]"):
        dequantize_block_fp8(w_fp8, torch.ones(bad_shape))


def test_non_matrix_weight_raises() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.ones(4))


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 300),
    inp=st.integers(1, 300),
    log_scale=st.floats(-20, 20),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_bound_holds_for_any_shape_and_magnitude(
    out: int, inp: int, log_scale: float, seed: int
) -> None:
    w = _varied_weight(out, inp, seed) * 2.0**log_scale
    w_fp8, scale_inv = quantize_block_fp8(w)
    restored = dequantize_block_fp8(w_fp8, scale_inv, torch.float32)
    _assert_within_bound(w, restored, _expanded(scale_inv, w.shape, 128))


def test_act_quant_scales_follow_dsv3_per_token_per_128_channels() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 300, generator=g) * torch.logspace(-2, 2, 5)[None, :, None]
    x[0, 0, 128:256] = 0  # an all-zero group takes the 1e-4 floor
    x_fp8, scales = act_quant_fp8(x)
    assert x_fp8.dtype == torch.float8_e4m3fn and x_fp8.shape == x.shape
    assert scales.shape == (3, 5, 3) and scales.dtype == torch.float32
    for group in range(3):
        amax = x[..., group * 128 : (group + 1) * 128].abs().amax(dim=-1)
        torch.testing.assert_close(scales[..., group], torch.clamp(amax, min=1e-4) / E4M3_MAX)
    assert scales[0, 0, 1].item() == pytest.approx(1e-4 / E4M3_MAX)
    restored = act_dequant_fp8(x_fp8, scales, torch.float32)
    per_channel_scale = scales.repeat_interleave(128, dim=-1)[..., :300]
    _assert_within_bound(x, restored, per_channel_scale)


def test_act_dequant_rejects_mismatched_scales() -> None:
    x_fp8, scales = act_quant_fp8(torch.randn(4, 256))
    with pytest.raises(ValueError, match="scales have shape"):
        act_dequant_fp8(x_fp8, scales[:, :1])


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.7.self_attn.q_b_proj.weight",
        "model.layers.60.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.3.self_attn.kv_b_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.experts.0.gate_proj.weight",
        "model.layers.60.mlp.experts.383.down_proj.weight",
        "model.layers.5.mlp.shared_experts.up_proj.weight",
    ],
)
def test_quantized_weight_names(name: str) -> None:
    assert is_quantized_weight_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.0.self_attn.rotary_emb.inv_freq",
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
        "model.layers.1.mlp.experts.0.gate_proj.bias",
        "prefix.model.layers.0.mlp.up_proj.weight",
    ],
)
def test_unquantized_names(name: str) -> None:
    assert not is_quantized_weight_name(name)
