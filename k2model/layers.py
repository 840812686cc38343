"""RMSNorm and the SwiGLU MLP (the dense first layers and the shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2model.kernels import cpu_ext
from k2model.linear import Linear


def as_f32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32; skips the (still dispatched, ~2 us) no-op cast when it already is."""
    return x if x.dtype == torch.float32 else x.float()


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)) with the statistics in fp32, cast back before the weight (docs/model.md, norms)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Buffer(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.stride(-1) == 1 and cpu_ext.takes(x):  # one C++ pass per row
            out = torch.empty(x.shape, dtype=x.dtype)
            cpu_ext.extension().rms_norm(x, self.weight, self.eps, out)
            return out
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The twin of the C++ path (csrc/rms_norm.cpp), and the path for every other input."""
        h = as_f32(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * as_dtype(h, x.dtype)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are fused into one [2I, D] projection."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.inter = inter
        self.gate_up = Linear(dim, 2 * inter, dtype)
        self.down = Linear(inter, dim, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up)
