"""moe_align (Triton) equals its torch reference exactly, and the layout it makes is valid."""

import pytest
import torch

from tests.kernels.helpers import DEVICE, poisoned_outputs

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from k2model.kernels.moe_align import capacity, moe_align, moe_align_ref


def routed(tokens: int, k: int, experts: int, skew: bool = False) -> torch.Tensor:
    if skew:  # most assignments on two experts: long runs, many empty experts
        ids = torch.where(torch.rand(tokens, k) < 0.8, torch.randint(0, 2, (tokens, k)), -1)
        ids = torch.where(ids < 0, torch.randint(0, experts, (tokens, k)), ids)
        return ids.to(DEVICE)
    return torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]).to(DEVICE)


def check_layout(ids: torch.Tensor, n_experts: int, block_m: int, layout) -> None:
    sorted_ids, expert_ids, n_post = (t.cpu() for t in layout)
    flat, n = ids.reshape(-1).cpu(), ids.numel()
    total = int(n_post)
    assert total % block_m == 0 and total <= capacity(n, n_experts, block_m)
    real = sorted_ids[:total][sorted_ids[:total] < n]
    assert sorted(real.tolist()) == list(range(n)), "each assignment exactly once"
    assert (sorted_ids[total:] == n).all()
    rows_expert = expert_ids[: total // block_m].long().repeat_interleave(block_m)
    pos = sorted_ids[:total] < n
    assert torch.equal(flat[sorted_ids[:total][pos].long()], rows_expert[pos])
    assert (expert_ids[: total // block_m].diff() >= 0).all()


@pytest.mark.parametrize(
    "tokens,k,experts,block_m,skew",
    [
        (1, 1, 8, 16, False),
        (5, 2, 8, 4, False),
        (37, 8, 13, 16, False),
        (200, 2, 16, 16, False),  # more assignments than one chunk of 128
        (90, 4, 384, 16, True),
        (64, 8, 384, 16, False),  # K2 decode at batch 64
    ],
)
def test_matches_reference(tokens, k, experts, block_m, skew, monkeypatch) -> None:
    ids = routed(tokens, k, experts, skew)
    with poisoned_outputs(monkeypatch):
        got = moe_align(ids, experts, block_m)
    want = moe_align_ref(ids, experts, block_m)
    for g, w, name in zip(got, want, ("sorted_ids", "expert_ids", "n_post"), strict=True):
        assert torch.equal(g.cpu(), w.cpu()), name
    check_layout(ids, experts, block_m, got)
