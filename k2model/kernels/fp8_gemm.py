"""Block-fp8 GEMM in Triton: C = (A * a_scale) @ (B * b_scale)^T with fp32 accumulation.

A [M, K] fp8 activations with one scale per row and 128 channels ([M, ceil(K/128)], `act_quant`);
B [N, K] an fp8 checkpoint weight with one scale per 128x128 block ([ceil(N/128), ceil(K/128)]).
The K loop steps one 128-block at a time: the tensor cores multiply fp8 tiles and each partial
product is scaled into the fp32 accumulator (DeepSeek-V3 `fp8_gemm`). Ragged M, N and K edges are
masked (zero-padded). The torch reference dequantises both operands and multiplies in fp32.
"""

import torch

from k2model.checkpoint.fp8 import BLOCK, act_dequant_fp8, dequantize_block_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

if triton is not None:

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr,
        a_s_ptr,
        b_ptr,
        b_s_ptr,
        c_ptr,
        M,
        N,
        K,
        stride_am,
        stride_asm,
        stride_bn,
        stride_bsn,
        stride_cm,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped tile order: GROUP_M row tiles share each column tile while it is in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        size_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % size_m
        pid_n = (pid % (GROUP_M * tiles_n)) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok, n_ok = offs_m < M, offs_n < N
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
        a_s_ptrs = a_s_ptr + offs_m * stride_asm
        b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * stride_bsn  # BLOCK_K is the scale block

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a_s = tl.load(a_s_ptrs + kb, mask=m_ok, other=0.0)
            b_s = tl.load(b_s_ptrs + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(m: int) -> dict[str, int]:
    """Tile shape by row count: small M (decode) is weight-bandwidth bound, so narrower N tiles
    give more programs; large M gets 64x128 tiles (bench/kernels.py's sweep on an H100)."""
    if m <= 64:
        block_m = max(16, triton.next_power_of_2(m))
        return {"BLOCK_M": block_m, "BLOCK_N": 32, "num_warps": 4, "num_stages": 6}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4}  # H100 sweep's best


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton launch: a [M, K] fp8, a_scale [M, ceil(K/128)], b [N, K] fp8, b_scale
    [ceil(N/128), ceil(K/128)] -> [M, N] in out_dtype."""
    assert triton is not None, "triton is not installed"
    (m, k), (n, k_b) = a.shape, b.shape
    assert k == k_b, f"inner dimensions differ: {k} vs {k_b}"
    assert a.dtype == b.dtype == torch.float8_e4m3fn, (a.dtype, b.dtype)
    assert a_scale.dtype == b_scale.dtype == torch.float32
    nb_k, nb_n = triton.cdiv(k, BLOCK), triton.cdiv(n, BLOCK)
    assert tuple(a_scale.shape) == (m, nb_k), (tuple(a_scale.shape), (m, nb_k))
    assert tuple(b_scale.shape) == (nb_n, nb_k), (tuple(b_scale.shape), (nb_n, nb_k))
    for t in (a, b, a_scale, b_scale):
        assert t.stride(-1) == 1 and t.device == a.device
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return c
    cfg = config or default_config(m)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](
        a,
        a_scale,
        b,
        b_scale,
        c,
        m,
        n,
        k,
        a.stride(0),
        a_scale.stride(0),
        b.stride(0),
        b_scale.stride(0),
        c.stride(0),
        BLOCK_K=BLOCK,
        GROUP_M=8,
        **cfg,
    )
    return c


def fp8_gemm_ref(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    a32 = act_dequant_fp8(a, a_scale, torch.float32)
    return (a32 @ dequantize_block_fp8(b, b_scale, torch.float32).T).to(out_dtype)
