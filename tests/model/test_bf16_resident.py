"""A bf16 checkpoint computed in fp32 keeps its weights in bf16 (kernels/bf16_weights.py) and
computes the same logits as with the weights widened to fp32 at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2model.checkpoint.loader import load_expert_slice, load_model
from k2model.kernels import cpu_ext
from k2model.model import K2Model
from tests.model.helpers import Runner, rel_err

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason="no AVX2 CPU or C++ compiler for the bf16-weight kernel"
)


@pytest.fixture(scope="module")
def pair(tiny_ckpt: Path) -> tuple[K2Model, K2Model]:
    held = load_model(tiny_ckpt, dtype=torch.float32)
    widened = load_model(tiny_ckpt, dtype=torch.float32, bf16_resident=False)
    return held, widened


def test_matrices_are_held_in_bf16(pair: tuple[K2Model, K2Model]) -> None:
    held, widened = pair
    attn = held.layers[0].attn
    assert attn.qkv_a.weight.dtype == attn.kv_b.weight.dtype == torch.bfloat16
    assert held.embed.dtype == held.lm_head.dtype == torch.bfloat16
    assert all(m.experts.gate_up.dtype == torch.bfloat16 for m in held.moe_layers().values())
    assert held.layers[0].attn_norm.weight.dtype == torch.float32  # vectors are widened
    assert widened.layers[0].attn.kv_b.weight.dtype == torch.float32
    routers = [
        (m.router.weight.dtype, w.router.weight.dtype)
        for m, w in zip(held.moe_layers().values(), widened.moe_layers().values(), strict=True)
    ]
    assert routers and set(routers) == {(torch.bfloat16, torch.float32)}  # fp32 compute either way
    # the weights (persistent buffers): the rope table is the same either way
    held_bytes = sum(b.numel() * b.element_size() for b in held.state_dict().values())
    widened_bytes = sum(b.numel() * b.element_size() for b in widened.state_dict().values())
    assert held_bytes < 0.6 * widened_bytes


@pytest.mark.parametrize("form", ["absorbed", "naive"])
def test_logits_equal_widened_weights(pair: tuple[K2Model, K2Model], form: str) -> None:
    """Ragged prefill, then decode steps through the paged cache, batch of 3."""
    runs = [Runner(m) for m in pair]
    prompts = {0: [5, 9, 2, 7, 1], 1: [3, 3], 2: [11, 4, 8, 6, 2, 9, 13]}
    outs = [r.step(prompts, form) for r in runs]
    assert rel_err(outs[0], outs[1]) < 1e-5
    for _ in range(4):
        nxt = {seq: [int(outs[1][i].argmax())] for i, seq in enumerate(prompts)}
        outs = [r.step(nxt, form) for r in runs]
        assert rel_err(outs[0], outs[1]) < 1e-5


def test_expert_slices_are_held_like_the_model(tiny_ckpt: Path) -> None:
    _, held = load_expert_slice(tiny_ckpt, 1, 2, dtype=torch.float32)
    _, widened = load_expert_slice(tiny_ckpt, 1, 2, dtype=torch.float32, bf16_resident=False)
    for layer, ex in held.items():
        assert ex.gate_up.dtype == torch.bfloat16
        assert torch.equal(ex.gate_up.float(), widened[layer].gate_up)
        x = torch.randn(5, ex.dim)
        ids = torch.tensor([[0, 1]] * 5)
        w = torch.rand(5, 2)
        assert rel_err(ex(x, ids, w), widened[layer](x, ids, w)) < 1e-5
        assert rel_err(ex(x, ids, w), ex.looped(x, ids, w)) < 1e-5


def test_pure_torch_path_matches_the_extension(
    pair: tuple[K2Model, K2Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole CPU fast path (bf16 weights, C++ norm/experts/paged decode) against the model
    with every C++ op switched off: fp32 weights, torch ops, decode through a gathered context."""
    held, widened = pair
    fast, slow = Runner(held), Runner(widened)
    prompts = {0: [5, 9, 2, 7, 1], 1: [3, 3, 12]}
    want_fast = fast.step(prompts, "absorbed")
    with monkeypatch.context() as m:
        m.setattr(cpu_ext, "takes", lambda x: False)
        want_slow = slow.step(prompts, "absorbed")
    assert rel_err(want_fast, want_slow) < 1e-5
    for _ in range(3):
        nxt = {seq: [int(want_slow[i].argmax())] for i, seq in enumerate(prompts)}
        want_fast = fast.step(nxt, "absorbed")
        with monkeypatch.context() as m:
            m.setattr(cpu_ext, "takes", lambda x: False)
            want_slow = slow.step(nxt, "absorbed")
        assert rel_err(want_fast, want_slow) < 1e-5
