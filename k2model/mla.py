"""Multi-head latent attention (docs/model.md, attention) over the paged latent cache.

Notation: H heads, d_n nope dims, d_r rope dims, d_v value dims, r = kv_lora_rank.
Both forms first write the new tokens' [c_kv | k_pe] (r + d_r values) into the cache, then attend
over each sequence's whole context read back from it:
- naive: expand every cached latent to per-head keys and values with kv_b_proj (prefill);
- absorbed: fold W_UK into the query and W_UV into the output, attend in latent space (decode).
They are the same function; tests keep them equal.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from k2model.batch import BatchMeta
from k2model.config import K2Config
from k2model.kv_cache import PagedKVCache
from k2model.layers import RMSNorm, as_dtype, as_f32
from k2model.linear import Linear
from k2model.rope import apply_rope
from k2model.runtime import Runtime

AttentionForm = Literal["naive", "absorbed"]


class MLA(nn.Module):
    def __init__(self, cfg: K2Config, layer: int, rt: Runtime) -> None:
        super().__init__()
        self.layer, self.ops = layer, rt.ops
        self.h, self.d_n, self.d_r = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
        )
        self.d_v, self.r = cfg.v_head_dim, cfg.kv_lora_rank
        self.r_q = cfg.q_lora_rank
        self.scale = cfg.softmax_scale
        d, qk = cfg.hidden_size, self.h * cfg.qk_head_dim
        # x -> [c_q | c_kv | k_pe] in one projection (q_a_proj and kv_a_proj_with_mqa fused).
        self.qkv_a = Linear(d, (self.r_q or qk) + self.r + self.d_r, rt)
        # The checkpoint's q_a/kv_a norms have no eps in HF remote code, hence 1e-6 (docs/model.md, norms).
        self.q_norm = RMSNorm(self.r_q, 1e-6, rt) if self.r_q else None
        self.q_b = Linear(self.r_q, qk, rt) if self.r_q else None
        self.kv_norm = RMSNorm(self.r, 1e-6, rt)
        self.kv_b = Linear(self.r, self.h * (self.d_n + self.d_v), rt)
        self.o = Linear(self.h * self.d_v, d, rt)
        self._absorbed: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        rot: torch.Tensor,  # [T, d_r/2] complex rotations of each token's position
        meta: BatchMeta,
        cache: PagedKVCache,
        form: AttentionForm,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_a(x)
        if self.q_b is not None:
            c_q, c_kv, k_pe = qkv.split([self.r_q, self.r, self.d_r], dim=-1)
            q = self.q_b(self.q_norm(c_q))
        else:
            q, c_kv, k_pe = qkv.split([qkv.shape[-1] - self.r - self.d_r, self.r, self.d_r], -1)
        q = q.view(t, self.h, self.d_n + self.d_r)  # [T, H, d_n + d_r]
        q_nope, q_pe = q.split([self.d_n, self.d_r], dim=-1)
        q_pe = apply_rope(q_pe, rot[:, None])
        k_pe = apply_rope(k_pe, rot)  # [T, d_r], one rope key shared by all heads
        cache.write(self.layer, meta.write_slots, torch.cat((self.kv_norm(c_kv), k_pe), -1))
        if meta.decode and form == "absorbed" and self.ops.paged_decode(x):  # no gather
            o = self._decode_paged(q_nope, q_pe, cache, meta)
            return self.o(o.reshape(t, self.h * self.d_v))

        ctx = cache.gather(self.layer, meta.ctx_slots)  # [B, L, r + d_r]
        if meta.decode:  # [B, 1, H, *] is a view of the rows
            q_nope, q_pe = q_nope[:, None], q_pe[:, None]
        else:
            q_nope, q_pe = q_nope[meta.q_index], q_pe[meta.q_index]  # [B, Q, H, *]
        attend = self._naive if form == "naive" else self._attend_absorbed
        o = attend(q_nope, q_pe, ctx, meta.mask)  # [B, Q, H, d_v]
        o = o.flatten(0, 1) if meta.decode else o[meta.q_valid]  # [T, H, d_v] in row order
        return self.o(o.reshape(t, self.h * self.d_v))

    def _naive(self, q_nope, q_pe, ctx, mask) -> torch.Tensor:
        """Per-head keys and values expanded from the latents, then one fused attention call:
        torch's scaled_dot_product_attention, whose CPU flash kernel (fp32 softmax statistics,
        no [Q, L] scores in memory) needs one head size for q, k and v, so v is padded with zero
        columns to the query's (d_n + d_r) and the output cut back to d_v. 1.9-2.4x the written-out
        form's speed at 512-token prompts on 2 cores (bench/prefill_attention.py), which is its twin
        (`naive_reference`)."""
        b, n_ctx = ctx.shape[:2]
        c_kv, k_pe = ctx.split([self.r, self.d_r], dim=-1)
        kv = self.kv_b(c_kv).view(b, n_ctx, self.h, self.d_n + self.d_v)
        k_nope, v = kv.split([self.d_n, self.d_v], dim=-1)
        k_pe = k_pe[:, :, None].expand(b, n_ctx, self.h, self.d_r)  # one rope key for every head
        q = torch.cat((q_nope, as_dtype(q_pe, q_nope.dtype)), -1)  # [B, Q, H, d_n + d_r]
        k = torch.cat((k_nope, as_dtype(k_pe, k_nope.dtype)), -1)  # [B, L, H, d_n + d_r]
        width = max(q.shape[-1], self.d_v)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, mask, scale=self.scale)  # [B, H, Q, width]
        return o.transpose(1, 2)[..., : self.d_v]  # [B, Q, H, d_v]

    def naive_reference(self, q_nope, q_pe, ctx, mask) -> torch.Tensor:
        """`_naive` written out: scores, masked softmax in fp32, weighted values."""
        b, n_ctx = ctx.shape[:2]
        c_kv, k_pe = ctx.split([self.r, self.d_r], dim=-1)
        kv = self.kv_b(c_kv).view(b, n_ctx, self.h, self.d_n + self.d_v)
        k_nope, v = kv.split([self.d_n, self.d_v], dim=-1)
        # q.k = q_nope.k_nope + q_pe.k_pe, with the one rope key shared by every head
        scores = torch.einsum("bqhn,blhn->bhql", q_nope, k_nope)
        scores = scores + torch.einsum("bqhe,ble->bhql", q_pe, k_pe)
        p = self._softmax(scores, mask)  # [B, H, Q, L]
        return torch.einsum("bhql,blhv->bqhv", p, v)  # [B, Q, H, d_v]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head, W_UK^T [H, r, d_n] (q_nope -> latent query) and W_UV [H, d_v, r] (latent
        output -> value), as [out, in] matrices like every linear weight, from kv_b_proj.

        Made contiguous once while kv_b is dense, in the dtype it is held in (keyed on its weight
        tensor, so reloading invalidates them); with fp8 resident they are dequantised per call
        like every other weight.
        """
        weight = self.kv_b.weight
        if self._absorbed is not None and self._absorbed[0] is weight:
            return self._absorbed[1]
        dense = weight if self.kv_b.fp8_parts is None else self.kv_b.dense_weight()
        w = dense.view(self.h, self.d_n + self.d_v, self.r)
        pair = (w[:, : self.d_n].transpose(1, 2).contiguous(), w[:, self.d_n :].contiguous())
        if self.kv_b.fp8_parts is None:
            self._absorbed = (weight, pair)
        return pair

    def _attend_absorbed(self, q_nope, q_pe, ctx, mask) -> torch.Tensor:
        b, q_len = q_nope.shape[:2]
        n = b * q_len
        w_uk_t, w_uv = self.absorbed_weights()
        q_lat = self.ops.head_linear(q_nope.reshape(n, self.h, self.d_n), w_uk_t)  # [N, H, r]
        q = torch.cat((q_lat, q_pe.reshape(n, self.h, self.d_r)), -1)
        q = q.view(b, q_len * self.h, self.r + self.d_r)  # [B, Q*H, r + d_r]
        # One latent key [c_kv | k_pe] per token, shared by every head and query.
        scores = torch.bmm(q, ctx.transpose(1, 2)).view(b, q_len, self.h, -1).transpose(1, 2)
        p = self._softmax(scores, mask)  # [B, H, Q, L]
        o_lat = torch.bmm(p.transpose(1, 2).reshape(b, q_len * self.h, -1), ctx[..., : self.r])
        o = self.ops.head_linear(o_lat.view(n, self.h, self.r), w_uv)  # [N, H, d_v]
        return o.view(b, q_len, self.h, self.d_v)

    def _decode_paged(self, q_nope, q_pe, cache: PagedKVCache, meta: BatchMeta) -> torch.Tensor:
        """`_attend_absorbed` for one query per sequence, attending straight off the paged cache
        (kernels/mla_decode.py). q_nope [B, H, d_n], q_pe [B, H, d_r] -> [B, H, d_v]."""
        w_uk_t, w_uv = self.absorbed_weights()
        q = torch.cat((self.ops.head_linear(q_nope, w_uk_t), q_pe), -1)  # [B, H, r + d_r]
        kv = cache.data[self.layer]  # [slots, r + d_r]; a decode row attends to its whole context
        o_lat = self.ops.mla_decode(q, kv, meta.ctx_slots, meta.ctx_lens, self.scale, self.r)
        return self.ops.head_linear(o_lat, w_uv)  # [B, H, d_v]

    def _softmax(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scaled, masked softmax in fp32 over the last (context) axis. mask [B, 1, Q, L]."""
        scores = (as_f32(scores) * self.scale).masked_fill(~mask, float("-inf"))
        return as_dtype(scores.softmax(-1), self.o.dtype)
