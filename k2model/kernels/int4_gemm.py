"""W4A16 grouped GEMM over INT4 routed experts, in Triton: the grouped GEMM of grouped_gemm.py with
its weights read as compressed-tensors pack-quantized words (checkpoint/int4.py).

B is int32 [E, N, K/8] (eight offset-binary nibbles per word along K, least significant first)
with bf16 scales [E, N, K/32]. Each K tile of B is unpacked and scaled in registers,
w = (nibble - 8) * scale, in fp32 (where that product is exact), cast to A's dtype and fed to the
dot with fp32 accumulation; the packed words are the only weight bytes read. Same layout, SwiGLU
and row-weight contract as `grouped_gemm`; `grouped_gemm_ref` with INT4 weights is the twin.
"""

import torch

from k2model.quant_config import GROUP

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

if triton is not None:
    from k2model.kernels.grouped_gemm import block_rows, finish_block

    @triton.jit
    def _int4_tile(p_ptr, s_ptr, offs_n, ks, mask, stride_n, stride_sn, GROUP: tl.constexpr):
        """[BLOCK_K, BLOCK_N] of W^T in fp32 from the packed words and group scales."""
        n = offs_n[None, :].to(tl.int64)
        words = tl.load(p_ptr + n * stride_n + (ks // 8)[:, None], mask=mask, other=0)
        q = ((words >> ((ks % 8) * 4)[:, None]) & 0xF) - 8
        s = tl.load(s_ptr + n * stride_sn + (ks // GROUP)[:, None], mask=mask, other=0.0)
        return q.to(tl.float32) * s.to(tl.float32)

    @triton.jit
    def _int4_grouped_gemm_kernel(
        a_ptr,
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
        stride_be,
        stride_bn,
        stride_bse,
        stride_bsn,
        stride_cm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP: tl.constexpr,
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
        n_ok = offs_n < N
        b_ptr += e * stride_be
        b_s_ptr += e * stride_bse
        u_ptr += e * stride_be  # gate and up are views of one stack: the same strides
        u_s_ptr += e * stride_bse
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_am + ks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            mask = k_ok[:, None] & n_ok[None, :]
            b = _int4_tile(b_ptr, b_s_ptr, offs_n, ks, mask, stride_bn, stride_bsn, GROUP)
            acc = tl.dot(a, b.to(a.dtype), acc=acc, input_precision=PRECISION)
            if SWIGLU:
                u = _int4_tile(u_ptr, u_s_ptr, offs_n, ks, mask, stride_bn, stride_bsn, GROUP)
                acc_u = tl.dot(a, u.to(a.dtype), acc=acc_u, input_precision=PRECISION)
        finish_block(
            acc, acc_u, rows, row_ok, offs_n, n_ok, w_ptr, c_ptr, stride_cm, SWIGLU, ROW_WEIGHT
        )


def int4_grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    n_post: torch.Tensor,
    n_assign: int,
    top_k: int,
    out_dtype: torch.dtype,
    block_m: int,
    b_up: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Triton launch: a [rows, K] (bf16/fp16/fp32), b (and b_up) packed int32 [E, N, K/8] with
    scales [E, N, K/32], the moe_align layout (made with the same block_m) -> C [n_assign, N]."""
    assert triton is not None, "triton is not installed"
    n_exp, n, words = b.shape
    k = words * 8
    assert b.dtype == torch.int32 and a.dim() == 2 and a.shape[1] == k, (tuple(a.shape), b.shape)
    assert k % GROUP == 0 and tuple(b_scale.shape) == (n_exp, n, k // GROUP), tuple(b_scale.shape)
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and b_scale.stride(-1) == 1
    assert (b_up is None) == (up_scale is None)
    if b_up is not None:
        assert b_up.shape == b.shape and b_up.stride() == b.stride()
        assert up_scale.shape == b_scale.shape and up_scale.stride() == b_scale.stride()
    assert row_weight is None or tuple(row_weight.shape) == (n_assign,)
    assert sorted_ids.numel() == expert_ids.numel() * block_m, "layout made with another block_m"
    c = torch.empty(n_assign, n, dtype=out_dtype, device=a.device)
    grid = (expert_ids.numel(), triton.cdiv(n, block_n))
    _int4_grouped_gemm_kernel[grid](
        a,
        b,
        b_scale,
        b_up if b_up is not None else b,
        up_scale if up_scale is not None else b_scale,
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
        b.stride(0),
        b.stride(1),
        b_scale.stride(0),
        b_scale.stride(1),
        c.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=64,
        GROUP=GROUP,
        SWIGLU=b_up is not None,
        ROW_WEIGHT=row_weight is not None,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32",  # tf32: unused off fp32
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return c
