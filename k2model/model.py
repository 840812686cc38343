"""The K2 decoder: embeddings, pre-norm blocks (MLA + dense MLP or MoE), final norm, untied lm_head.

`forward` runs one step over a ragged batch (prompts, prompt chunks or single decode tokens) whose
KV lives in a `PagedKVCache`; batch metadata is an argument, never state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from k2model.batch import BatchMeta
from k2model.config import K2Config
from k2model.kernels.ops import Ops
from k2model.kv_cache import PagedKVCache
from k2model.layers import MLP, RMSNorm, as_dtype, as_f32
from k2model.mla import MLA, AttentionForm
from k2model.moe import MoE
from k2model.rope import RotaryTable
from k2model.runtime import Runtime


class DecoderLayer(nn.Module):
    def __init__(self, cfg: K2Config, layer: int, rt: Runtime, routed_experts: bool = True) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt)
        self.attn = MLA(cfg, layer, rt)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt)
        self.ffn: MLP | MoE = (
            MoE(cfg, rt, routed_experts)
            if cfg.is_moe_layer(layer)
            else MLP(cfg.hidden_size, cfg.intermediate_size, rt)
        )

    def forward(self, h, rot, meta: BatchMeta, cache: PagedKVCache, form: AttentionForm):
        h = h + self.attn(self.attn_norm(h), rot, meta, cache, form)
        return h + self.ffn(self.ffn_norm(h))


class K2Model(nn.Module):
    def __init__(self, cfg: K2Config, rt: Runtime, routed_experts: bool = True) -> None:
        """routed_experts=False: MoE layers hold no routed experts (the expert service does)."""
        super().__init__()
        self.cfg, self.rt, self.dtype = cfg, rt, rt.dtype
        self.embed = nn.Buffer(rt.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rt, routed_experts) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rt)
        self.lm_head = nn.Buffer(rt.empty(cfg.vocab_size, cfg.hidden_size))
        self.rope = RotaryTable(cfg, rt.device)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def ops(self) -> Ops:
        return self.rt.ops

    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.ffn for i, layer in enumerate(self.layers) if isinstance(layer.ffn, MoE)}

    def new_cache(
        self, num_blocks: int, block_size: int, kv_dtype: torch.dtype | None = None
    ) -> PagedKVCache:
        """kv_dtype: the storage dtype (None: the model's own)."""
        cfg = self.cfg
        return PagedKVCache(
            cfg.num_hidden_layers,
            num_blocks,
            block_size,
            cfg.kv_cache_dim,
            kv_dtype or self.dtype,
            self.device,
            compute_dtype=self.dtype,
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        meta: BatchMeta,
        cache: PagedKVCache,
        form: AttentionForm = "absorbed",
        all_logits: bool = False,
        on_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits (fp32) for each sequence's last new token [B, V], or for every row [T, V].

        `on_layer(i)` runs as soon as layer i has written this batch's KV to the cache (prefill
        streams each layer's latents from there while the next layer computes).
        """
        h = as_dtype(self.embed[input_ids], self.dtype)
        rot = self.rope.lookup(meta.positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, meta, cache, form)
            if on_layer is not None:
                on_layer(i)
        if not all_logits and not meta.decode:  # decode rows are already one per sequence
            h = h[meta.last_rows]
        return as_f32(self.rt.ops.linear(self.norm(h), self.lm_head))
