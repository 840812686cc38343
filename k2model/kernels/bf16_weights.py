"""Matmuls of fp32 activations with weights held in bf16: the CPU decode path.

A bf16 checkpoint computed in fp32 (k2model's CPU default) need not widen its weights when it
loads: bf16 -> fp32 is exact, so `x @ w.float().T` is the same product whether the weight is
widened once at load or per 8 values inside the kernel. Holding bf16 halves weight memory and the
bytes each decode step reads, and decode on a CPU is bound by those reads (the fp32 GEMV of the
BLAS reaches ~10 GB/s from DRAM on two cores; csrc/bf16_gemm.cpp reads bf16 at about that rate,
i.e. twice the weights per second).

The kernel is csrc/bf16_gemm.cpp in cpu_ext's extension; the "cpu" ops backend (kernels/ops.py)
holds bf16 weights for it and calls it, every other backend widens them at load. Each function falls back to its twin (`*_ref`,
plain torch) for shapes the kernel does not take: many rows (prefill, where the BLAS's compute rate
matters more than the bytes) and non-bf16 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2model.kernels import cpu_ext

# Above this many rows the BLAS on widened weights is faster (compute-bound; see bench/model.py).
MAX_ROWS = 96


def _takes(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    return w.dtype == torch.bfloat16 and 0 < rows <= MAX_ROWS and cpu_ext.takes(x)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T in x's dtype; w in x's dtype, or bf16 under fp32 x."""
    if w.dtype == x.dtype:
        return F.linear(x, w)
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not _takes(x, w, flat.shape[0]):
        return linear_ref(x, w)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape[0], w.shape[0], dtype=x.dtype)
    cpu_ext.extension().linear(flat, w, out)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], w.shape[0])


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Twin of `linear`: widen the weight, then the BLAS."""
    return F.linear(x, w.to(x.dtype))


def head_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One linear per head: x [M, H, K], w [H, N, K] -> [M, H, N] (y[:, h] = x[:, h] @ w[h]^T)."""
    if not _takes(x, w, x.shape[0]) or x.stride(-1) != 1 or w.stride(-1) != 1:
        return head_linear_ref(x, w)
    out = torch.empty(x.shape[0], x.shape[1], w.shape[1], dtype=x.dtype)
    cpu_ext.extension().head_linear(x, w, out)
    return out


def head_linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Twin of `head_linear`: batched matmul over heads on the widened weight."""
    return torch.bmm(x.transpose(0, 1), w.to(x.dtype).transpose(1, 2)).transpose(0, 1)
