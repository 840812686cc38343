"""MLA decode (Triton) against a gather-and-softmax reference, over a shuffled paged cache."""

import pytest
import torch

from tests.kernels.helpers import DEVICE, HALF_DTYPES, assert_near, poisoned_outputs, tolerance

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from k2model.kernels.mla_decode import mla_decode, mla_decode_ref

PAGE = 4


def paged_batch(lengths: list[int], heads: int, r: int, d_pe: int, dtype: torch.dtype):
    """A cache whose pages are handed out in random order, and whose unused rows (including the
    slot that padding positions point at) hold NaN: reading past a length poisons the output."""
    width = max(lengths)
    pages = [-(-n // PAGE) for n in lengths]
    total = sum(pages) + 1  # page 0 is never handed out
    kv = torch.full((total * PAGE, r + d_pe), float("nan"))
    order = (torch.randperm(total - 1) + 1).tolist()
    slots = torch.zeros(len(lengths), width, dtype=torch.long)  # padding -> slot 0 (NaN)
    for b, n in enumerate(lengths):
        table = torch.tensor([order.pop() for _ in range(pages[b])])
        pos = torch.arange(n)
        slots[b, :n] = table[pos // PAGE] * PAGE + pos % PAGE
        kv[slots[b, :n]] = torch.randn(n, r + d_pe)
    q = torch.randn(len(lengths), heads, r + d_pe)
    lens = torch.tensor(lengths)
    return [t.to(DEVICE) for t in (q.to(dtype), kv.to(dtype), slots, lens)]


@pytest.mark.parametrize(
    "lengths,splits",
    [([1], 1), ([31, 32, 33], 1), ([1, 64, 100, 7], 3), ([200, 5], 8), ([40], 2)],
)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_matches_reference(lengths, splits, dtype, monkeypatch) -> None:
    q, kv, slots, lens = paged_batch(lengths, heads=4, r=64, d_pe=16, dtype=dtype)
    scale = 64**-0.5
    with poisoned_outputs(monkeypatch):
        out = mla_decode(q, kv, slots, lens, scale, 64, num_splits=splits, block_n=32)
    kv_ref = torch.nan_to_num(kv)  # the reference masks after reading: keep it finite
    assert_near(out, mla_decode_ref(q, kv_ref, slots, lens, scale, 64), tolerance(dtype))


def test_ragged_dims_and_head_tiles(monkeypatch) -> None:
    """r and d_r that are not powers of two; 20 heads in tiles of 16; 16-token tiles."""
    q, kv, slots, lens = paged_batch([17, 50, 3], heads=20, r=48, d_pe=8, dtype=torch.float32)
    with poisoned_outputs(monkeypatch):
        out = mla_decode(q, kv, slots, lens, 0.1, 48, num_splits=2, block_h=16, block_n=16)
    ref = mla_decode_ref(q, torch.nan_to_num(kv), slots, lens, 0.1, 48)
    assert_near(out, ref, tolerance(torch.float32))


def test_default_splits_match_one_split(monkeypatch) -> None:
    q, kv, slots, lens = paged_batch([300, 129], heads=4, r=64, d_pe=16, dtype=torch.float32)
    with poisoned_outputs(monkeypatch):
        auto = mla_decode(q, kv, slots, lens, 0.2, 64)
        one = mla_decode(q, kv, slots, lens, 0.2, 64, num_splits=1)
    assert_near(auto, one, tolerance(torch.float32))
