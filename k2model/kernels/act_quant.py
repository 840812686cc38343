"""Per-token, per-128-channel fp8 activation quantisation (DeepSeek-V3 `act_quant`) in Triton.

x [M, K] -> (x_fp8 [M, K] float8_e4m3fn, scales [M, ceil(K/128)] fp32), x ~= x_fp8 * scale with
scale = max(amax, 1e-4) / 448 per row and 128-channel block; a ragged last block is treated as
zero-padded. The torch reference is `act_quant_ref` (= `k2model.checkpoint.fp8.act_quant_fp8`).
"""

import torch

from k2model.checkpoint.fp8 import ACT_SCALE_FLOOR, BLOCK, FP8_MAX, act_quant_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

if triton is not None:

    @triton.jit
    def _act_quant_kernel(
        x_ptr,
        y_ptr,
        s_ptr,
        K,
        stride_xm,
        stride_ym,
        stride_sm,
        FLOOR: tl.constexpr,
        MAX: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        m = tl.program_id(0).to(tl.int64)
        kb = tl.program_id(1)
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), FLOOR), MAX)
        # Correctly rounded division, as torch does, so both sides round to the same fp8 value.
        y = tl.minimum(tl.maximum(tl.div_rn(x, s), -MAX), MAX)
        tl.store(y_ptr + m * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + m * stride_sm + kb, s)


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launch: x [..., K] (bf16/fp16/fp32, last dim contiguous) -> (x_fp8, scales)."""
    assert triton is not None, "triton is not installed"
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    assert x.stride(-1) == 1, "last dimension must be contiguous"
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    m, nb = x2.shape[0], triton.cdiv(k, BLOCK)
    y = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, nb, dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, nb)](
            x2,
            y,
            s,
            k,
            x2.stride(0),
            y.stride(0),
            s.stride(0),
            FLOOR=ACT_SCALE_FLOOR,
            MAX=FP8_MAX,
            BLOCK_K=BLOCK,
        )
    return y.view(*lead, k), s.view(*lead, nb)


def act_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return act_quant_fp8(x)
