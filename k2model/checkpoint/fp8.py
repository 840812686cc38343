"""Block-fp8 (float8_e4m3fn) quantisation of K2 / DeepSeek-V3 checkpoints (docs/checkpoint.md, block fp8).

Weights: one fp32 scale per 128x128 block, stored as `<name>.weight_scale_inv` with shape
[ceil(out/128), ceil(in/128)]; despite the name, dequantisation MULTIPLIES by it. Ragged edges are
treated as zero-padded to whole blocks. Activations: dynamic scales per token and per 128
channels (DeepSeek-V3 `act_quant`). Everything is vectorised over blocks by padding and viewing
[out, in] as [ob, b, ib, b]; these plain-torch functions are the references for fp8 GPU kernels.
"""

import re

import torch
import torch.nn.functional as F

from k2model.checkpoint.shards import CheckpointError

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
ACT_SCALE_FLOOR = 1e-4  # DSV3 act_quant: s = max(|x_block|, 1e-4) / 448

# K2's quantised set: every attention / dense-MLP / routed-expert / shared-expert Linear weight.
# Embeddings, lm_head, norms, the router (`mlp.gate.weight`) and its bias, and inv_freq are not.
_QUANTIZED_WEIGHT = re.compile(
    r"model\.layers\.\d+\."
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))"
    r"\.weight"
)


def is_quantized_weight_name(name: str) -> bool:
    return _QUANTIZED_WEIGHT.fullmatch(name) is not None


def _n_blocks(size: int, block: int) -> int:
    return -(-size // block)


def _check_matrix(w: torch.Tensor, block: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")


def _to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """[out, in] -> fp32 [ob, b, ib, b], zero-padded to whole blocks."""
    out, inp = w.shape
    ob, ib = _n_blocks(out, block), _n_blocks(inp, block)
    padded = F.pad(w.float(), (0, ib * block - inp, 0, ob * block - out))
    return padded.view(ob, block, ib, block)


def _from_blocks(blocks: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    ob, block, ib, _ = blocks.shape
    return blocks.reshape(ob * block, ib * block)[:out, :inp]


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    # |scaled| <= 448 up to one fp32 rounding; clamp so the cast can never leave the fp8 range.
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_block_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (w_fp8 [out, in] float8_e4m3fn, scale_inv [ob, ib] fp32), scale = amax/448.

    An all-zero block gets the smallest normal fp32 scale instead of 0, so nothing divides by 0
    and it still dequantises to zeros.
    """
    _check_matrix(w, block)
    blocks = _to_blocks(w, block)  # [ob, b, ib, b]
    amax = blocks.abs().amax(dim=(1, 3))  # [ob, ib]
    if not torch.isfinite(amax).all():
        raise ValueError("cannot quantise a weight with inf or NaN entries")
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    w_fp8 = _to_fp8(blocks / scale[:, None, :, None])
    return _from_blocks(w_fp8, *w.shape).contiguous(), scale


def dequantize_block_fp8(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: int = BLOCK,
) -> torch.Tensor:
    """W[i, j] = w_fp8[i, j] * scale_inv[i // block, j // block], computed in fp32."""
    _check_matrix(w_fp8, block)
    out, inp = w_fp8.shape
    expected = (_n_blocks(out, block), _n_blocks(inp, block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, but a [{out}, {inp}] weight "
            f"in {block}x{block} blocks needs {list(expected)}"
        )
    blocks = _to_blocks(w_fp8, block) * scale_inv.float()[:, None, :, None]
    return _from_blocks(blocks, out, inp).to(dtype)


def act_quant_fp8(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_fp8 [..., K], scales [..., ceil(K/block)] fp32), x ~= x_fp8 * scale."""
    k = x.shape[-1]
    nb = _n_blocks(k, block)
    blocks = F.pad(x.float(), (0, nb * block - k)).unflatten(-1, (nb, block))  # [..., nb, b]
    scales = blocks.abs().amax(dim=-1).clamp(min=ACT_SCALE_FLOOR) / FP8_MAX  # [..., nb]
    x_fp8 = _to_fp8(blocks / scales[..., None]).flatten(-2)[..., :k].contiguous()
    return x_fp8, scales


def act_dequant_fp8(
    x_fp8: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    block: int = BLOCK,
) -> torch.Tensor:
    """Inverse of `act_quant_fp8`: x[..., j] = x_fp8[..., j] * scales[..., j // block]."""
    k = x_fp8.shape[-1]
    nb = _n_blocks(k, block)
    if tuple(scales.shape) != (*x_fp8.shape[:-1], nb):
        raise ValueError(
            f"scales have shape {tuple(scales.shape)}, expected {(*x_fp8.shape[:-1], nb)}"
        )
    blocks = F.pad(x_fp8.float(), (0, nb * block - k)).unflatten(-1, (nb, block))
    return (blocks * scales.float()[..., None]).flatten(-2)[..., :k].to(dtype)
