"""What the model calls for its GPU kernels: Triton on CUDA tensors, the torch references elsewhere.

The model's layers call these only where `kernel_path` says so (CUDA tensors), so the CPU path stays
the plain-torch code; tests switch `kernel_path` on to run the same glue on CPU over the twins.
Kernel files are imported on first use, so importing this module never imports Triton. Each
function computes the same math on either path (the references are the kernels' twins).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from k2model.kernels import cpu_ext

Fp8Part = tuple[torch.Tensor, torch.Tensor]  # (float8_e4m3fn weight [out, in], fp32 scale_inv)


@dataclass(frozen=True)
class ExpertWeights:
    """One layer's routed experts stacked over E: gate, up [E, I, D]; down [E, D, I].

    Dense (bf16/fp32), or fp8 with per-128x128-block scales [E, ceil(rows/128), ceil(cols/128)].
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None = None
    up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    @property
    def fp8(self) -> bool:
        return self.gate_scale is not None


def kernel_path(t: torch.Tensor) -> bool:
    """Whether the model's layers take their kernel path (these functions) for this tensor."""
    return t.is_cuda


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def on_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_installed()


def fp8_linear(x: torch.Tensor, parts: list[Fp8Part], out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] @ concat(parts)^T: x quantised once per token and 128 channels, then one
    block-fp8 GEMM per part (fused parts' blocks need not line up), outputs concatenated."""
    from k2model.kernels import act_quant, fp8_gemm

    triton = on_triton(x)
    quant = act_quant.act_quant if triton else act_quant.act_quant_ref
    gemm = fp8_gemm.fp8_gemm if triton else fp8_gemm.fp8_gemm_ref
    xq, xs = quant(x.reshape(-1, x.shape[-1]))
    out = [gemm(xq, xs, w, s, out_dtype) for w, s in parts]
    y = out[0] if len(out) == 1 else torch.cat(out, -1)
    return y.view(*x.shape[:-1], y.shape[-1])


def mla_decode(
    q: torch.Tensor,
    kv: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    sm_scale: float,
    r: int,
) -> torch.Tensor:
    """q [B, H, r + d_r] against the cache rows kv[slots[b, :lengths[b]]] -> [B, H, r]; the cache
    may be narrower than q (bf16 under fp32), widened as it is read."""
    if cpu_ext.takes(q) and kv.dtype in (torch.float32, torch.bfloat16):  # csrc/mla_decode.cpp
        out = torch.empty(q.shape[0], q.shape[1], r, dtype=q.dtype)
        cpu_ext.extension().mla_decode(
            q.contiguous(), kv.contiguous(), slots.contiguous(), lengths, sm_scale, r, out
        )
        return out
    from k2model.kernels import mla_decode as kernel

    run = kernel.mla_decode if on_triton(q) else kernel.mla_decode_ref
    return run(q, kv, slots, lengths, sm_scale, r)


def paged_decode(x: torch.Tensor) -> bool:
    """Whether decode attends straight off the paged cache (`mla_decode`) for activations x:
    on CUDA (Triton) and on CPUs with k2model's extension; elsewhere it gathers the context."""
    return kernel_path(x) or cpu_ext.takes(x)


def routed_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """The `RoutedExperts` contract (x [T, D], ids and weights [T, k] -> [T, D]) over stacks."""
    from k2model.kernels import fused_moe

    run = fused_moe.fused_moe if on_triton(x) else fused_moe.fused_moe_ref
    return run(x, ids, weights, experts)
