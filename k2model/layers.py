"""RMSNorm and the SwiGLU MLP (the dense first layers and the shared expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2model.linear import Linear


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)) with the statistics in fp32, cast back before the weight (K2_SPEC 2.1)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Buffer(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


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
