"""A bias-free linear layer whose weight is held dense, or as block-fp8 parts dequantised per call.

Keeping fp8 resident halves weight memory: the dense weight exists only while its layer runs (on
CUDA, no dense weight at all: the block-fp8 GEMM kernel reads the fp8 parts and their scales).
Several checkpoint matrices can be fused into one layer (q_a + kv_a, gate + up); each keeps its own
fp8 blocks and scales, and the parts are stacked along the output dimension when dequantised.
A dense weight may also be held in bf16 under an fp32 compute (kernels/bf16_weights.py): the same
product, half the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2model.checkpoint.fp8 import dequantize_block_fp8
from k2model.kernels import bf16_weights, dispatch

Fp8Part = tuple[torch.Tensor, torch.Tensor]  # (float8_e4m3fn weight [out, in], fp32 scale_inv)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.weight = nn.Buffer(torch.empty(out_features, in_features, dtype=dtype))
        self.fp8_parts: list[Fp8Part] | None = None

    def set_dense(self, weight: torch.Tensor) -> None:
        """Held in the compute dtype, or as given when it is bf16 under an fp32 compute."""
        self.weight = nn.Buffer(bf16_weights.hold(weight, self.dtype).contiguous())
        self.fp8_parts = None

    def set_fp8(self, parts: list[Fp8Part]) -> None:
        self.fp8_parts = parts
        self.weight = nn.Buffer(torch.empty(0, self.in_features, dtype=self.dtype))

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight in the compute dtype (dequantised now when fp8 is resident)."""
        if self.fp8_parts is None:
            return self.weight.to(self.dtype)
        mats = [dequantize_block_fp8(w, s, self.dtype) for w, s in self.fp8_parts]
        return mats[0] if len(mats) == 1 else torch.cat(mats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_parts is not None and dispatch.kernel_path(x):  # block-fp8 GEMM kernel
            return dispatch.fp8_linear(x, self.fp8_parts, self.dtype)
        if self.fp8_parts is None:
            return bf16_weights.linear(x, self.weight)
        return F.linear(x, self.dense_weight())

    def extra_repr(self) -> str:
        kept = "fp8" if self.fp8_parts is not None else str(self.weight.dtype)
        return f"in={self.in_features}, out={self.out_features}, weight={kept}"
