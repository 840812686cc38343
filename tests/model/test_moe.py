"""Grouped and gathered MoE paths equal the per-(token, expert) loop; the router matches its spec."""

from __future__ import annotations

import pytest
import torch

from k2model.checkpoint.random_init import tiny_config
from k2model.config import K2Config
from k2model.moe import LocalExperts, Router
from k2model.runtime import Runtime


def experts(seed: int) -> LocalExperts:
    torch.manual_seed(seed)
    ex = LocalExperts(6, 32, 16, Runtime.resolve(torch.float32))
    ex.gate_up.copy_(torch.randn_like(ex.gate_up) * 0.2)
    ex.down.copy_(torch.randn_like(ex.down) * 0.2)
    return ex


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_grouped_equals_loop(tokens: int) -> None:
    ex = experts(tokens)
    x = torch.randn(tokens, 32)
    ids = torch.stack([torch.randperm(6)[:3] for _ in range(tokens)])
    w = torch.rand(tokens, 3)
    assert torch.allclose(ex(x, ids, w), ex.looped(x, ids, w), atol=1e-5, rtol=1e-5)


def test_router_weights_use_unbiased_scores() -> None:
    cfg = K2Config.from_dict(tiny_config(n_routed_experts=4, num_experts_per_tok=2))
    r = Router(cfg, Runtime.resolve(torch.float32))
    r.weight.zero_()
    r.weight[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    r.bias.copy_(torch.tensor([10.0, 10.0, 0.0, 0.0]))  # the bias alone picks experts 0 and 1
    ids, w = r(torch.tensor([[1.0] + [0.0] * (cfg.hidden_size - 1)]))
    assert sorted(ids[0].tolist()) == [0, 1]
    s = torch.sigmoid(torch.tensor([1.0, 2.0]))
    expected = s / s.sum() * cfg.routed_scaling_factor
    got = w[0][ids[0].argsort()]
    assert torch.allclose(got, expected)


def test_group_limited_selection_keeps_best_groups() -> None:
    cfg = K2Config.from_dict(
        tiny_config(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    )
    r = Router(cfg, Runtime.resolve(torch.float32))
    r.weight.zero_()
    # Expert 0 has the single best score, but group 3 (experts 6, 7) has the best top-2 sum.
    r.weight[:, 0] = torch.tensor([5.0, -5.0, 0, 0, 0, 0, 3.0, 3.0])
    ids, _ = r(torch.tensor([[1.0] + [0.0] * (cfg.hidden_size - 1)]))
    assert sorted(ids[0].tolist()) == [6, 7]
