"""The shapes the Triton kernels share (stacked experts, fp8 parts) and the fp8 linear glue.

The triton ops backend (kernels/ops.py) calls these; kernel files are imported on first use, so
importing this module never imports Triton. Each kernel has its torch twin beside it.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

Fp8Part = tuple[torch.Tensor, torch.Tensor]  # (float8_e4m3fn weight [out, in], fp32 scale_inv)


@dataclass(frozen=True)
class ExpertWeights:
    """One layer's routed experts stacked over E: gate, up [E, I, D]; down [E, D, I].

    Dense (bf16/fp32); fp8 with per-128x128-block scales [E, ceil(rows/128), ceil(cols/128)];
    or INT4, packed int32 [E, rows, cols/8] with bf16 group scales [E, rows, cols/32]
    (checkpoint/int4.py).
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None = None
    up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None

    @property
    def int4(self) -> bool:
        return self.gate.dtype == torch.int32

    @property
    def fp8(self) -> bool:
        return self.gate_scale is not None and not self.int4


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fp8_linear(x: torch.Tensor, parts: list[Fp8Part], out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] @ concat(parts)^T on the Triton kernels: x quantised once per token and 128
    channels, then one block-fp8 GEMM per part (fused parts' blocks need not line up), outputs
    concatenated."""
    from k2model.kernels import act_quant, fp8_gemm

    xq, xs = act_quant.act_quant(x.reshape(-1, x.shape[-1]))
    out = [fp8_gemm.fp8_gemm(xq, xs, w, s, out_dtype) for w, s in parts]
    y = out[0] if len(out) == 1 else torch.cat(out, -1)
    return y.view(*x.shape[:-1], y.shape[-1])


def fp8_linear_ref(x: torch.Tensor, parts: list[Fp8Part], out_dtype: torch.dtype) -> torch.Tensor:
    """Twin of `fp8_linear` (the same activation quantisation, in torch)."""
    from k2model.kernels import act_quant, fp8_gemm

    xq, xs = act_quant.act_quant_ref(x.reshape(-1, x.shape[-1]))
    out = [fp8_gemm.fp8_gemm_ref(xq, xs, w, s, out_dtype) for w, s in parts]
    y = out[0] if len(out) == 1 else torch.cat(out, -1)
    return y.view(*x.shape[:-1], y.shape[-1])
