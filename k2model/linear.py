"""A bias-free linear layer whose weight is held dense, or as block-fp8 parts dequantised per call.

Keeping fp8 resident halves weight memory: the dense weight exists only while its layer runs (on
CUDA, no dense weight at all: the block-fp8 GEMM kernel reads the fp8 parts and their scales).
Several checkpoint matrices can be fused into one layer (q_a + kv_a, gate + up); each keeps its own
fp8 blocks and scales, and the parts are stacked along the output dimension when dequantised.
A dense weight may also be held in bf16 under an fp32 compute where the ops backend computes with
it (kernels/ops.py, kernels/bf16_weights.py): the same product, half the bytes. Everything is held
on the runtime's device; fp8 parts are buffers, so `.to()` moves them too.
"""

from __future__ import annotations

import torch
from torch import nn

from k2model.checkpoint.fp8 import dequantize_block_fp8
from k2model.kernels.dispatch import Fp8Part
from k2model.runtime import Runtime


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rt: Runtime) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, rt.dtype
        self.ops, self.device = rt.ops, rt.device
        self.weight = nn.Buffer(rt.empty(out_features, in_features))
        self.n_fp8 = 0  # fp8 parts held as buffers fp8_w{i} / fp8_s{i} (so .to() moves them)

    @property
    def fp8_parts(self) -> list[Fp8Part] | None:
        if not self.n_fp8:
            return None
        return [(getattr(self, f"fp8_w{i}"), getattr(self, f"fp8_s{i}")) for i in range(self.n_fp8)]

    def set_dense(self, weight: torch.Tensor) -> None:
        """Held in the compute dtype, or as given when the ops backend computes with it (bf16
        under an fp32 compute, on the cpu backend)."""
        held = self.ops.held_dtype(weight.dtype, self.dtype)
        self.weight = nn.Buffer(weight.to(self.device, held).contiguous())
        self._drop_fp8()

    def set_fp8(self, parts: list[Fp8Part]) -> None:
        self._drop_fp8()
        for i, (w, s) in enumerate(parts):
            self.register_buffer(f"fp8_w{i}", w.to(self.device))
            self.register_buffer(f"fp8_s{i}", s.to(self.device))
        self.n_fp8 = len(parts)
        self.weight = nn.Buffer(
            torch.empty(0, self.in_features, dtype=self.dtype, device=self.device)
        )

    def _drop_fp8(self) -> None:
        for i in range(self.n_fp8):
            delattr(self, f"fp8_w{i}")
            delattr(self, f"fp8_s{i}")
        self.n_fp8 = 0

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight in the compute dtype (dequantised now when fp8 is resident)."""
        parts = self.fp8_parts
        if parts is None:
            return self.weight.to(self.dtype)
        mats = [dequantize_block_fp8(w, s, self.dtype) for w, s in parts]
        return mats[0] if len(mats) == 1 else torch.cat(mats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.fp8_parts
        if parts is not None:
            return self.ops.fp8_linear(x, parts, self.dtype)
        return self.ops.linear(x, self.weight)

    def extra_repr(self) -> str:
        kept = "fp8" if self.n_fp8 else str(self.weight.dtype)
        return f"in={self.in_features}, out={self.out_features}, weight={kept}"
