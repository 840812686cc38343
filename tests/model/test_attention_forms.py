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


def test_absorbed_equals_naive_in_bf16(tiny_ckpt) -> None:
    from k2model.checkpoint.loader import load_model

    model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    batch = dict(enumerate(random_prompts(7, 3, model.cfg.vocab_size)))
    naive = Runner(model).step(batch, "naive", all_logits=True)
    absorbed = Runner(model).step(batch, "absorbed", all_logits=True)
    assert rel_err(absorbed, naive) < 3e-2


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
