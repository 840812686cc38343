"""The paged MLA latent cache: per layer and token, the normalised latent c_kv and the roped k_pe.

Storage is one tensor [layers, num_blocks * block_size, kv_lora_rank + qk_rope_head_dim]; token t of
a sequence lives at slot block_table[t // block_size] * block_size + t % block_size.
k_pe keeps the checkpoint's interleaved rope layout (see rope.py).

The storage dtype may be narrower than the model's compute dtype (a bf16 cache under an fp32 model
on CPU: half the bytes per cached token). Values are rounded once, when written; `gather` widens
what it reads back to `compute_dtype`, and the paged decode kernels widen as they load.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        self.num_blocks, self.block_size, self.dim = num_blocks, block_size, dim
        self.compute_dtype = compute_dtype or dtype
        self.data = torch.zeros(
            num_layers, num_blocks * block_size, dim, dtype=dtype, device=device
        )

    @property
    def bytes_per_token(self) -> int:
        return self.data.shape[0] * self.dim * self.data.element_size()

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        """values [T, dim] go to slots [T]."""
        self.data[layer].index_copy_(0, slots, values.to(self.data.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """slots [B, L] -> [B, L, dim], in the compute dtype."""
        rows = self.data[layer].index_select(0, slots.flatten()).view(*slots.shape, self.dim)
        return rows.to(self.compute_dtype)
