"""YaRN rotary embedding on interleaved pairs (docs/model.md, rotary embedding).

The checkpoint's rope dims rotate interleaved pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i]:
viewing each pair as a complex number, x' = x * e^(i * pos * inv_freq). The output keeps the
checkpoint's interleaved layout (as DeepSeek-V3's reference and vLLM do), and so does every cached
k_pe.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from k2model.config import K2Config
from k2model.layers import as_dtype, as_f32


def yarn_inv_freq(cfg: K2Config, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] (computed in fp64 on `device`) and the cos/sin multiplier,
    using the checkpoint's own betas."""
    d, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    freq_extra = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    y = cfg.rope_scaling
    if y is None:
        return freq_extra.float(), 1.0
    freq_inter = freq_extra / y.factor

    def correction_dim(n_rot: float) -> float:
        return (
            d
            * math.log(y.original_max_position_embeddings / (n_rot * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.arange(d // 2, dtype=torch.float64, device=device)
    ramp = ((ramp - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 interpolates by `factor`
    inv_freq = freq_inter * (1 - extrapolate) + freq_extra * extrapolate
    return inv_freq.float(), y.attention_factor


class RotaryTable(nn.Module):
    """Complex rotations mscale * e^(i * pos * inv_freq) per position, grown on demand. Its
    tensors are (non-persistent) buffers, so `.to()` moves them with the model."""

    def __init__(self, cfg: K2Config, device: torch.device | str = "cpu") -> None:
        super().__init__()
        inv_freq, self.mscale = yarn_inv_freq(cfg, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("table", torch.empty(0, 0, device=device), persistent=False)
        self._grow(min(cfg.max_position_embeddings, 8192))

    def _grow(self, n: int) -> None:
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(pos, self.inv_freq)
        self.table = torch.polar(torch.full_like(angles, self.mscale), angles)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """[*positions.shape, d/2] complex64 rotations."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.table.shape[0]:
            self._grow(max(needed, 2 * self.table.shape[0]))
        return self.table[positions]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., d] by rot [..., d/2] (broadcast); same layout out."""
    pairs = torch.view_as_complex(as_f32(x).unflatten(-1, (-1, 2)))
    return as_dtype(torch.view_as_real(pairs * rot).flatten(-2), x.dtype)
