"""RMSNorm and the SwiGLU MLP (the dense first layers and the shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2model.kernels.ops import rms_norm_ref
from k2model.linear import Linear
from k2model.runtime import Runtime


def as_f32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32; skips the (still dispatched, ~2 us) no-op cast when it already is."""
    return x if x.dtype == torch.float32 else x.float()


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)) with the statistics in fp32, cast back before the weight (docs/model.md, norms)."""

    def __init__(self, dim: int, eps: float, rt: Runtime) -> None:
        super().__init__()
        self.eps, self.ops = eps, rt.ops
        self.weight = nn.Buffer(rt.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The twin of every backend's path."""
        return rms_norm_ref(x, self.weight, self.eps)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are fused into one [2I, D] projection."""

    def __init__(self, dim: int, inter: int, rt: Runtime) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up = Linear(dim, 2 * inter, rt)
        self.down = Linear(inter, dim, rt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up)
