"""Grouped GEMM over the routed experts, in Triton: every selected expert's rows in one launch.

Rows come in the `moe_align` layout: row block i belongs to expert expert_ids[i] and lists flat
assignment indices (the sentinel n_assign marks padding). Assignment j reads input row
j // top_k (top_k = k when the input is one row per token, 1 when it is one row per assignment)
and writes output row j:
    C[j] = A[j // top_k] @ B[e]^T                              (plain)
    C[j] = silu(A[j // top_k] @ B[e]^T) * (A[j // top_k] @ B_up[e]^T)   (SwiGLU, with B_up)
optionally times row_weight[j]. Weights are [E, N, K] with contiguous K (strided views such as the
gate and up halves of a stacked gate_up are fine). bf16/fp16/fp32 operands, or fp8 with A scaled
per row and 128 channels and B per 128x128 block, as in fp8_gemm.py. fp32 accumulation throughout.
The torch reference loops over experts.
"""

import torch
import torch.nn.functional as F

from k2model.checkpoint.fp8 import BLOCK, act_dequant_fp8, dequantize_block_fp8
from k2model.checkpoint.int4 import dequantize_int4

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

if triton is not None:

    @triton.jit
    def block_rows(sorted_ptr, expert_ids_ptr, pid_m, n_assign, top_k, BLOCK_M: tl.constexpr):
        """Row block pid_m of the moe_align layout: its assignment rows, which are real, the
        input row each reads, and the block's expert."""
        rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < n_assign
        a_rows = tl.where(row_ok, rows // top_k, 0).to(tl.int64)
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        return rows, row_ok, a_rows, e

    @triton.jit
    def finish_block(
        acc,
        acc_u,
        rows,
        row_ok,
        offs_n,
        n_ok,
        w_ptr,
        c_ptr,
        stride_cm,
        SWIGLU: tl.constexpr,
        ROW_WEIGHT: tl.constexpr,
    ):
        """SwiGLU of the two accumulators, the row weight, and the store of the block."""
        if SWIGLU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_u
        if ROW_WEIGHT:
            acc = acc * tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr,
        a_s_ptr,
        b_ptr,
        b_s_ptr,
        u_ptr,
        u_s_ptr,
        c_ptr,
        w_ptr,
        sorted_ptr,
        expert_ids_ptr,
        n_post_ptr,
        n_assign,
        N,
        K,
        top_k,
        stride_am,
        stride_asm,
        stride_be,
        stride_bn,
        stride_bse,
        stride_bsn,
        stride_ue,
        stride_un,
        stride_use,
        stride_usn,
        stride_cm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FP8: tl.constexpr,
        SWIGLU: tl.constexpr,
        ROW_WEIGHT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_m * BLOCK_M >= tl.load(n_post_ptr):
            return  # a block past the padded total: nothing routed here
        rows, row_ok, a_rows, e = block_rows(
            sorted_ptr, expert_ids_ptr, pid_m, n_assign, top_k, BLOCK_M
        )
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_ok = offs_n < N

        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        u_ptrs = u_ptr + e * stride_ue + offs_n[None, :].to(tl.int64) * stride_un + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if FP8:  # BLOCK_K is the 128-channel scale block
                a_s = tl.load(a_s_ptr + a_rows * stride_asm + kb, mask=row_ok, other=0.0)
                b_s = tl.load(
                    b_s_ptr + e * stride_bse + (offs_n // BLOCK_K) * stride_bsn + kb,
                    mask=n_ok,
                    other=0.0,
                )
                acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            else:
                acc = tl.dot(a, b, acc=acc, input_precision=PRECISION)
            if SWIGLU:
                u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if FP8:
                    u_s = tl.load(
                        u_s_ptr + e * stride_use + (offs_n // BLOCK_K) * stride_usn + kb,
                        mask=n_ok,
                        other=0.0,
                    )
                    acc_u += tl.dot(a, u) * a_s[:, None] * u_s[None, :]
                else:
                    acc_u = tl.dot(a, u, acc=acc_u, input_precision=PRECISION)
                u_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        finish_block(
            acc, acc_u, rows, row_ok, offs_n, n_ok, w_ptr, c_ptr, stride_cm, SWIGLU, ROW_WEIGHT
        )


def _scale_strides(s: torch.Tensor | None) -> tuple[int, int]:
    return (s.stride(0), s.stride(1)) if s is not None else (0, 0)


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    n_post: torch.Tensor,
    n_assign: int,
    top_k: int,
    out_dtype: torch.dtype,
    block_m: int,
    b_up: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Triton launch: a [rows, K], b (and b_up) [E, N, K], the moe_align layout (made with the
    same block_m) -> C [n_assign, N] in out_dtype. Scales are given exactly when a is fp8."""
    assert triton is not None, "triton is not installed"
    n_exp, n, k = b.shape
    fp8 = a.dtype == torch.float8_e4m3fn
    assert a.dim() == 2 and a.shape[1] == k and b.dtype == a.dtype, (tuple(a.shape), b.dtype)
    assert a.stride(-1) == 1 and b.stride(-1) == 1, "K must be contiguous"
    assert b_up is None or (b_up.shape == b.shape and b_up.stride() == b.stride())
    assert (a_scale is not None) == fp8 and (b_scale is not None) == fp8
    assert (up_scale is not None) == (fp8 and b_up is not None)
    if fp8:
        nb_n, nb_k = triton.cdiv(n, BLOCK), triton.cdiv(k, BLOCK)
        assert tuple(a_scale.shape) == (a.shape[0], nb_k), tuple(a_scale.shape)
        assert tuple(b_scale.shape) == (n_exp, nb_n, nb_k), tuple(b_scale.shape)
        assert up_scale is None or up_scale.shape == b_scale.shape
    assert row_weight is None or tuple(row_weight.shape) == (n_assign,)
    assert sorted_ids.numel() == expert_ids.numel() * block_m, "layout made with another block_m"
    c = torch.empty(n_assign, n, dtype=out_dtype, device=a.device)
    block_n = block_n or (128 if fp8 else 64)
    u = b_up if b_up is not None else b
    grid = (expert_ids.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a,
        a_scale,
        b,
        b_scale,
        u,
        up_scale,
        c,
        row_weight,
        sorted_ids,
        expert_ids,
        n_post,
        n_assign,
        n,
        k,
        top_k,
        a.stride(0),
        a_scale.stride(0) if fp8 else 0,
        b.stride(0),
        b.stride(1),
        *_scale_strides(b_scale),
        u.stride(0),
        u.stride(1),
        *_scale_strides(up_scale),
        c.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK if fp8 else 64,
        FP8=fp8,
        SWIGLU=b_up is not None,
        ROW_WEIGHT=row_weight is not None,
        PRECISION="ieee"
        if a.dtype == torch.float32
        else "tf32",  # tf32: the default; only fp32 uses it
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return c


def _dense(w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return w.float()
    if w.dtype == torch.int32:  # INT4 words (kernels/int4_gemm.py)
        return dequantize_int4(w, scale, torch.float32)
    return dequantize_block_fp8(w, scale, torch.float32)


def grouped_gemm_ref(
    a: torch.Tensor,
    b: torch.Tensor,
    flat_ids: torch.Tensor,
    top_k: int,
    out_dtype: torch.dtype,
    b_up: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract, with the expert of each assignment given directly: flat_ids [n_assign].
    Also the twin of int4_gemm.py: INT4 words in b / b_up with their scales, a unscaled."""
    a32 = a.float() if a_scale is None else act_dequant_fp8(a, a_scale, torch.float32)
    c = torch.zeros(flat_ids.numel(), b.shape[1], device=a.device)
    for e in flat_ids.unique().tolist():
        rows = (flat_ids == e).nonzero().squeeze(1)
        x = a32[rows // top_k]
        y = x @ _dense(b[e], None if b_scale is None else b_scale[e]).T
        if b_up is not None:
            y = F.silu(y) * (x @ _dense(b_up[e], None if up_scale is None else up_scale[e]).T)
        c[rows] = y
    if row_weight is not None:
        c = c * row_weight.float()[:, None]
    return c.to(out_dtype)
