"""Absorbed MLA decode attention over the paged latent cache, in Triton (flash-decoding).

One query token per sequence, H heads, each query already absorbed into latent space:
q [B, H, r + d_r] = [q_nope @ W_UK | q_pe]. Every cached token holds one latent row
kv [r + d_r] = [c_kv | k_pe] shared by all heads, which is both the key (all r + d_r dims) and
the value (the first r dims). Sequence b attends to the rows at slots[b, :lengths[b]] of the
layer's cache (lengths >= 1; slots past the length are never read).

Stage 1 splits each sequence's context into `num_splits` chunks; a program takes one sequence, a
tile of heads and one chunk, loads each latent tile once for both products (q.k and p.v), and keeps
an online softmax in fp32. Stage 2 merges the chunks by their log-sum-exp. With one split, stage 1
writes the output directly. The torch reference gathers the context and runs a plain softmax.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

if triton is not None:

    @triton.jit
    def _mla_decode_split_kernel(
        q_ptr,
        kv_ptr,
        slots_ptr,
        lens_ptr,
        o_ptr,
        lse_ptr,
        sm_scale_log2,
        H,
        stride_qb,
        stride_qh,
        stride_kv,
        stride_sb,
        stride_ob,
        stride_oh,
        stride_os,
        stride_lb,
        stride_lh,
        R: tl.constexpr,
        D_PE: tl.constexpr,
        R_P2: tl.constexpr,
        PE_P2: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        split = tl.program_id(2)
        length = tl.load(lens_ptr + b).to(tl.int32)
        # Chunks are whole BLOCK_N tiles, so only the last tile of a sequence is ragged.
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, length)

        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, R_P2)
        offs_pe = tl.arange(0, PE_P2)
        h_ok, r_ok, pe_ok = offs_h < H, offs_r < R, offs_pe < D_PE
        q_rows = q_ptr + b * stride_qb + offs_h[:, None] * stride_qh
        q_nope = tl.load(q_rows + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
        q_pe = tl.load(
            q_rows + R + offs_pe[None, :], mask=h_ok[:, None] & pe_ok[None, :], other=0.0
        )

        m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, R_P2), dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            slot = tl.load(slots_ptr + b * stride_sb + offs_n, mask=n_ok, other=0)
            rows = kv_ptr + slot.to(tl.int64)[:, None] * stride_kv
            c_kv = tl.load(rows + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            k_pe = tl.load(
                rows + R + offs_pe[None, :], mask=n_ok[:, None] & pe_ok[None, :], other=0.0
            )
            s = tl.dot(q_nope, tl.trans(c_kv), input_precision=PRECISION)
            s = tl.dot(q_pe, tl.trans(k_pe), acc=s, input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
            s = tl.where(n_ok[None, :], s * sm_scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(c_kv.dtype), c_kv, acc=acc, input_precision=PRECISION)
            m_i = m_new

        # An empty chunk (start >= end) leaves l_i = 0: its lse is -inf and stage 2 weighs it 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os
        tl.store(
            o_ptrs + offs_r[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=h_ok[:, None] & r_ok[None, :],
        )
        if NUM_SPLITS > 1:
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + b * stride_lb + offs_h * stride_lh + split, lse, mask=h_ok)

    @triton.jit
    def _mla_decode_combine_kernel(
        part_ptr,
        lse_ptr,
        o_ptr,
        stride_pb,
        stride_ph,
        stride_ps,
        stride_lb,
        stride_lh,
        stride_ob,
        stride_oh,
        R: tl.constexpr,
        R_P2: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        S_P2: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs_s = tl.arange(0, S_P2)
        offs_r = tl.arange(0, R_P2)
        s_ok, r_ok = offs_s < NUM_SPLITS, offs_r < R
        lse = tl.load(
            lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=float("-inf")
        )
        w = tl.exp2(lse - tl.max(lse, axis=0))  # the first chunk is never empty: max is finite
        w = w / tl.sum(w, axis=0)
        parts = tl.load(
            part_ptr
            + b * stride_pb
            + h * stride_ph
            + offs_s[:, None] * stride_ps
            + offs_r[None, :],
            mask=s_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        out = tl.sum(parts * w[:, None], axis=0)
        tl.store(
            o_ptr + b * stride_ob + h * stride_oh + offs_r,
            out.to(o_ptr.dtype.element_ty),
            mask=r_ok,
        )


def default_splits(batch: int, head_tiles: int, max_len: int, device: torch.device) -> int:
    """Enough chunks for about two programs per multiprocessor, none shorter than 256 tokens."""
    sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )
    want = triton.cdiv(2 * sms, batch * head_tiles)
    return max(1, min(want, triton.cdiv(max_len, 256), 64))


def mla_decode(
    q: torch.Tensor,
    kv: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    sm_scale: float,
    r: int,
    num_splits: int | None = None,
    block_h: int = 64,
    block_n: int = 64,  # defaults: the fastest of bench/kernels.py's sweep on an H100
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton launch: q [B, H, r + d_r], kv [S, r + d_r] (one layer of the cache), slots [B, L]
    int, lengths [B] int -> o_lat [B, H, r] in q.dtype."""
    assert triton is not None, "triton is not installed"
    (bsz, h, dim), (bs, width) = q.shape, slots.shape
    assert kv.dim() == 2 and kv.shape[1] == dim and 0 < r < dim, (tuple(kv.shape), dim, r)
    assert q.dtype == kv.dtype and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
    assert bs == bsz and tuple(lengths.shape) == (bsz,), (bs, bsz, tuple(lengths.shape))
    assert not slots.is_floating_point() and not lengths.is_floating_point()
    assert q.stride(-1) == 1 and kv.stride(-1) == 1 and slots.stride(-1) == 1
    assert len({t.device for t in (q, kv, slots, lengths)}) == 1, "tensors on different devices"
    block_h = min(block_h, max(16, triton.next_power_of_2(h)))  # tl.dot needs >= 16 rows
    head_tiles = triton.cdiv(h, block_h)
    splits = num_splits or default_splits(bsz, head_tiles, width, q.device)
    out = torch.empty(bsz, h, r, dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if splits == 1:
        part, lse = out[:, :, None], out  # lse is not written with one split
    else:
        part = torch.empty(bsz, h, splits, r, dtype=torch.float32, device=q.device)
        lse = torch.empty(bsz, h, splits, dtype=torch.float32, device=q.device)
    d_pe = dim - r
    _mla_decode_split_kernel[(bsz, head_tiles, splits)](
        q,
        kv,
        slots,
        lengths,
        part,
        lse,
        sm_scale * math.log2(math.e),
        h,
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        slots.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        R=r,
        D_PE=d_pe,
        R_P2=max(16, triton.next_power_of_2(r)),
        PE_P2=max(16, triton.next_power_of_2(d_pe)),
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        PRECISION="ieee"
        if q.dtype == torch.float32
        else "tf32",  # tf32: the default; only fp32 uses it
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits > 1:
        _mla_decode_combine_kernel[(bsz, h)](
            part,
            lse,
            out,
            part.stride(0),
            part.stride(1),
            part.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            R=r,
            R_P2=max(16, triton.next_power_of_2(r)),
            NUM_SPLITS=splits,
            S_P2=triton.next_power_of_2(splits),
        )
    return out


def mla_decode_ref(
    q: torch.Tensor,
    kv: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    sm_scale: float,
    r: int,
) -> torch.Tensor:
    ctx = kv[slots].float()  # [B, L, r + d_r]
    scores = torch.einsum("bhd,bld->bhl", q.float(), ctx) * sm_scale
    valid = torch.arange(slots.shape[1], device=q.device)[None] < lengths[:, None]  # [B, L]
    p = scores.masked_fill(~valid[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhl,blr->bhr", p, ctx[..., :r]).to(q.dtype)
