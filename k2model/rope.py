"""YaRN rotary embedding on interleaved pairs (K2_SPEC 2.4-2.5).

The checkpoint's rope dims rotate interleaved pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i].
`apply_rope` returns the rotated pairs de-interleaved ([evens..., odds...]); q and k (and every
cached k_pe) use the same layout, so every dot product equals the interleaved one.
"""

from __future__ import annotations

import math

import torch

from k2model.config import K2Config, yarn_mscale


def yarn_inv_freq(cfg: K2Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] and the cos/sin multiplier, using the checkpoint's own betas."""
    d, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    freq_extra = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
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

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original frequency, 0 interpolates by `factor`
    inv_freq = freq_inter * (1 - extrapolate) + freq_extra * extrapolate
    scale = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
    return inv_freq.float(), scale


class RotaryTable:
    """cos/sin per position, grown on demand; indexed by absolute token position."""

    def __init__(self, cfg: K2Config, device: torch.device | str = "cpu") -> None:
        self.inv_freq, self.mscale = yarn_inv_freq(cfg)
        self.inv_freq = self.inv_freq.to(device)
        self.cos = torch.empty(0, cfg.qk_rope_head_dim // 2, device=device)
        self.sin = torch.empty_like(self.cos)
        self._grow(cfg.max_position_embeddings if cfg.max_position_embeddings <= 8192 else 8192)

    def _grow(self, n: int) -> None:
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(pos, self.inv_freq)
        self.cos = angles.cos() * self.mscale
        self.sin = angles.sin() * self.mscale

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [*positions.shape, d/2] (fp32)."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._grow(max(needed, 2 * self.cos.shape[0]))
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., d]; cos/sin broadcast to [..., d/2]. Output de-interleaved."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
