"""The K2 decoder: embeddings, pre-norm blocks (MLA + dense MLP or MoE), final norm, untied lm_head.

`forward` runs one step over a ragged batch (prompts, prompt chunks or single decode tokens) whose
KV lives in a `PagedKVCache`; batch metadata is an argument, never state.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import torch
from torch import nn

from k2model.batch import BatchMeta
from k2model.config import K2Config
from k2model.kernels.ops import Ops
from k2model.kv_cache import PagedKVCache
from k2model.layers import MLP, RMSNorm, as_dtype, as_f32
from k2model.mla import MLA, AttentionForm
from k2model.moe import MoE, PendingExperts, SubmitsExperts, drive, settle
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
        return drive(self.steps(h, rot, meta, cache, form))

    def steps(self, h, rot, meta: BatchMeta, cache: PagedKVCache, form: AttentionForm):
        """The block as a generator that yields at its expert hop, if it has one (MoE.steps)."""
        h = h + self.attn(self.attn_norm(h), rot, meta, cache, form)
        x = self.ffn_norm(h)
        if isinstance(self.ffn, MoE):
            return h + (yield from self.ffn.steps(x))
        return h + self.ffn(x)


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
        return self._logits(h, meta, all_logits)

    def _logits(self, h: torch.Tensor, meta: BatchMeta, all_logits: bool) -> torch.Tensor:
        if not all_logits and not meta.decode:  # decode rows are already one per sequence
            h = h[meta.last_rows]
        return as_f32(self.rt.ops.linear(self.norm(h), self.lm_head))

    def steps(
        self, input_ids: torch.Tensor, meta: BatchMeta, cache: PagedKVCache, form: AttentionForm
    ) -> Generator[PendingExperts, torch.Tensor, torch.Tensor]:
        """`forward` (last-token logits) as a generator that yields at every expert hop."""
        h = as_dtype(self.embed[input_ids], self.dtype)
        rot = self.rope.lookup(meta.positions)
        for layer in self.layers:
            h = yield from layer.steps(h, rot, meta, cache, form)
        return self._logits(h, meta, all_logits=False)

    @property
    def submits_experts(self) -> bool:
        """Whether the routed experts are remote and can be sent before they are collected."""
        return any(isinstance(m.remote, SubmitsExperts) for m in self.moe_layers().values())

    def forward_interleaved(
        self,
        parts: Sequence[tuple[torch.Tensor, BatchMeta]],
        cache: PagedKVCache,
        form: AttentionForm = "absorbed",
    ) -> list[torch.Tensor]:
        """Micro-batches of disjoint sequences in lockstep (ping-pong): each runs to its next
        expert hop and sends its rows, then the next runs (its attention while the other's rows
        are at the expert pool), then each collects its sum and goes on. The logits of each part,
        as `forward` gives them for that part alone."""
        runs = [self.steps(ids, meta, cache, form) for ids, meta in parts]
        waiting: list[PendingExperts | None] = [None] * len(runs)
        out: list[torch.Tensor | None] = [None] * len(runs)
        live = list(range(len(runs)))
        try:
            while live:
                for k in list(live):
                    value = waiting[k].result() if waiting[k] is not None else None
                    waiting[k] = None
                    try:
                        waiting[k] = runs[k].send(value)  # type: ignore[arg-type]
                    except StopIteration as done:
                        out[k] = done.value
                        live.remove(k)
        except BaseException:
            settle(waiting)
            raise
        return [o for o in out if o is not None]
