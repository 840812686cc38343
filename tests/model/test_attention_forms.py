"""Absorbed MLA equals naive MLA; paged decode equals full recompute, whatever the block layout."""

from __future__ import annotations

import random

import pytest
import torch

from k2model.batch import SeqSlice, build_batch
from k2model.model import K2Model
from tests.model.helpers import Runner, rel_err


def random_prompts(seed: int, n: int, vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 23))] for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_absorbed_equals_naive_on_ragged_batch(tiny_fp32: K2Model, seed: int) -> None:
    prompts = random_prompts(seed, 5, tiny_fp32.cfg.vocab_size)
    batch = dict(enumerate(prompts))
    naive = Runner(tiny_fp32).step(batch, "naive", all_logits=True)
    absorbed = Runner(tiny_fp32).step(batch, "absorbed", all_logits=True)
    assert rel_err(absorbed, naive) < 1e-5


@pytest.mark.parametrize("seed", [1, 2, 7])
def test_absorbed_equals_naive_in_bf16(tmp_path, seed: int) -> None:
    """The two forms round differently in bf16; through a router a near tie then picks another
    expert and the logits jump, so this compares them on dense layers."""
    from k2model.checkpoint.loader import load_model
    from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint

    cfg = tiny_config(first_k_dense_replace=3)
    model = load_model(write_checkpoint(tmp_path, cfg, random_weights(cfg, seed=1)), torch.bfloat16)
    batch = dict(enumerate(random_prompts(seed, 3, model.cfg.vocab_size)))
    naive = Runner(model).step(batch, "naive", all_logits=True)
    absorbed = Runner(model).step(batch, "absorbed", all_logits=True)
    assert rel_err(absorbed, naive) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_naive_attention_equals_its_reference(tiny_ckpt, dtype) -> None:
    """MLA._naive (scaled_dot_product_attention) == naive_reference (scores, masked softmax,
    values) on a ragged batch with cached prefixes and padded query rows."""
    from k2model.checkpoint.loader import load_model

    attn = load_model(tiny_ckpt, dtype).layers[0].attn
    rng = torch.Generator().manual_seed(0)
    slices = [SeqSlice(0, 5, [0, 1]), SeqSlice(6, 9, [2, 3, 4, 5]), SeqSlice(3, 1, [6])]
    meta = build_batch(slices, block_size=4)
    b, q_len, n_ctx = *meta.q_valid.shape, meta.ctx_slots.shape[1]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=rng).to(dtype)

    q_nope, q_pe = rand(b, q_len, attn.h, attn.d_n), rand(b, q_len, attn.h, attn.d_r)
    ctx = rand(b, n_ctx, attn.r + attn.d_r)
    fused = attn._naive(q_nope, q_pe, ctx, meta.mask)
    written = attn.naive_reference(q_nope, q_pe, ctx, meta.mask)
    valid = meta.q_valid
    assert fused.shape == written.shape == (b, q_len, attn.h, attn.d_v)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(fused[valid], written[valid]) < tol


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_paged_decode_equals_full_recompute(tiny_fp32: K2Model, block_size: int) -> None:
    """Decode token by token through shuffled blocks; compare with one full prefill each step."""
    prompts = random_prompts(3, 3, tiny_fp32.cfg.vocab_size)
    runner = Runner(tiny_fp32, num_blocks=512, block_size=block_size)
    random.Random(0).shuffle(runner.alloc._free)  # blocks far apart and out of order
    runner.step(dict(enumerate(prompts)), "naive")
    seqs = [list(p) for p in prompts]
    rng = random.Random(1)
    for _ in range(5):
        new = [rng.randrange(tiny_fp32.cfg.vocab_size) for _ in seqs]
        logits = runner.step({i: [t] for i, t in enumerate(new)}, "absorbed")
        for i, t in enumerate(new):
            seqs[i].append(t)
            full = Runner(tiny_fp32).step({0: seqs[i]}, "naive")
            assert rel_err(logits[i], full[0]) < 1e-5


def test_batch_metadata_rejects_short_block_table() -> None:
    with pytest.raises(ValueError, match="block table"):
        build_batch([SeqSlice(start=3, n_new=2, block_table=[0])], block_size=4)
    with pytest.raises(ValueError, match="at least one"):
        build_batch([SeqSlice(start=0, n_new=0, block_table=[0])], block_size=4)


def test_sequences_do_not_see_each_other(tiny_fp32: K2Model) -> None:
    """A sequence's logits are the same alone and inside a batch with others."""
    prompts = random_prompts(11, 4, tiny_fp32.cfg.vocab_size)
    together = Runner(tiny_fp32).step(dict(enumerate(prompts)), "absorbed")
    for i, p in enumerate(prompts):
        alone = Runner(tiny_fp32).step({0: p}, "absorbed")
        assert rel_err(together[i], alone[0]) < 1e-5
