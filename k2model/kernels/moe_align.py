"""Routed assignments sorted by expert and padded to whole row blocks, in Triton.

ids [T, k] expert ids -> the layout a grouped GEMM walks block by block:
- sorted_ids [capacity] int32: the flat assignment index (t * k + j) of each row, grouped by
  expert in expert order, each expert's run padded to a multiple of block_m with the sentinel T * k;
  within an expert, assignments keep their flat order (a stable sort);
- expert_ids [capacity / block_m] int32: the expert of each row block (past the end: >= E);
- n_post [1] int32: the padded total, so blocks at or past n_post / block_m are empty.
capacity = T * k + E * (block_m - 1), rounded up to whole blocks, bounds the padded total
without reading it on the host.

One program does it all (counts, prefix sums, then a scatter in chunks with a running cursor per
expert kept in global scratch): built for decode-sized batches of a few thousand assignments.
The torch reference computes the same layout with a stable argsort.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

if triton is not None:

    @triton.jit
    def _moe_align_kernel(
        ids_ptr,
        sorted_ptr,
        expert_ids_ptr,
        n_post_ptr,
        cursor_ptr,
        n,
        capacity,
        E: tl.constexpr,
        BINS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        bins = tl.arange(0, BINS)
        chunk = tl.arange(0, CHUNK)
        counts = tl.zeros((BINS,), dtype=tl.int32)
        for c0 in range(0, n, CHUNK):
            offs = c0 + chunk
            e = tl.load(ids_ptr + offs, mask=offs < n, other=E).to(tl.int32)  # bin E: padding
            counts += tl.histogram(e, BINS)
        counts = tl.where(bins < E, counts, 0)
        padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
        ends = tl.cumsum(padded, axis=0)
        tl.store(n_post_ptr, tl.sum(padded, axis=0))
        tl.store(cursor_ptr + bins, ends - padded)  # where each expert's next row goes

        # Block b belongs to the expert whose run covers row b * BLOCK_M: count the runs ending
        # at or before it (empty runs end where they start, so they are skipped).
        for b0 in range(0, capacity // BLOCK_M, CHUNK):
            blk = b0 + chunk
            before = (ends[None, :] <= (blk * BLOCK_M)[:, None]) & (bins[None, :] < E)
            tl.store(
                expert_ids_ptr + blk,
                tl.sum(before.to(tl.int32), axis=1),
                mask=blk < capacity // BLOCK_M,
            )
        for r0 in range(0, capacity, CHUNK):
            tl.store(sorted_ptr + r0 + chunk, n, mask=r0 + chunk < capacity)
        tl.debug_barrier()  # the padding is written before any row lands

        for c0 in range(0, n, CHUNK):
            offs = c0 + chunk
            ok = offs < n
            e = tl.load(ids_ptr + offs, mask=ok, other=E).to(tl.int32)
            # rank among earlier assignments of the same expert within this chunk
            earlier = (e[:, None] == e[None, :]) & (chunk[None, :] < chunk[:, None])
            rank = tl.sum(earlier.to(tl.int32), axis=1)
            base = tl.load(cursor_ptr + e, mask=ok, other=0)
            tl.store(sorted_ptr + base + rank, offs, mask=ok)
            tl.debug_barrier()  # every thread read the cursors before they move
            tl.store(cursor_ptr + bins, tl.load(cursor_ptr + bins) + tl.histogram(e, BINS))
            tl.debug_barrier()


def capacity(n_assignments: int, n_experts: int, block_m: int) -> int:
    """Rows enough for any routing: every expert's run padded by at most block_m - 1 rows."""
    return -(-(n_assignments + n_experts * (block_m - 1)) // block_m) * block_m


def moe_align(
    ids: torch.Tensor, n_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launch: ids [T, k] (ints in [0, n_experts)) -> (sorted_ids, expert_ids, n_post)."""
    assert triton is not None, "triton is not installed"
    assert not ids.is_floating_point() and ids.dim() == 2, (ids.dtype, ids.dim())
    assert block_m >= 1 and block_m & (block_m - 1) == 0, "block_m must be a power of two"
    flat = ids.reshape(-1).contiguous()
    n, dev = flat.numel(), ids.device
    cap = capacity(n, n_experts, block_m)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(cap // block_m, dtype=torch.int32, device=dev)
    n_post = torch.empty(1, dtype=torch.int32, device=dev)
    bins = triton.next_power_of_2(n_experts + 1)
    cursor = torch.empty(bins, dtype=torch.int32, device=dev)
    _moe_align_kernel[(1,)](
        flat,
        sorted_ids,
        expert_ids,
        n_post,
        cursor,
        n,
        cap,
        E=n_experts,
        BINS=bins,
        BLOCK_M=block_m,
        CHUNK=128,
        num_warps=8,
    )
    return sorted_ids, expert_ids, n_post


def moe_align_ref(
    ids: torch.Tensor, n_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = ids.reshape(-1)
    n, dev = flat.numel(), ids.device
    counts = torch.bincount(flat, minlength=n_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = flat.argsort(stable=True)
    expert = flat[order]
    first = torch.cumsum(counts, 0) - counts  # position of each expert's first sorted row
    dest = starts[expert] + torch.arange(n, device=dev) - first[expert]
    cap = capacity(n, n_experts, block_m)
    sorted_ids = torch.full((cap,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.int()
    n_post = int(padded.sum())
    block_start = torch.arange(cap // block_m, device=dev) * block_m
    expert_ids = torch.searchsorted(torch.cumsum(padded, 0), block_start, right=True).int()
    return sorted_ids, expert_ids, torch.tensor([n_post], dtype=torch.int32, device=dev)
