"""A bf16 latent KV cache under the fp32 model (`model.kv_dtype: bfloat16`: half the bytes per
cached and per transferred token) computes exactly what an fp32 cache holding the same rounded
latents computes, through both decode paths (the C++ kernel reading bf16 off the paged cache, and
the gathered torch path), on the embedded checkpoint, the tiny parity config and K2's 576-value
latent: the rounding at the write is the only difference.

It is not the default: on these random-weight checkpoints, whose top logits and router scores are
near ties, that rounding flips a greedy token within a few dozen (a test below keeps it measured),
and greedy output equal to the fp32 reference is what the served paths are tested against.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, load_model
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.generation import GenerationRequest, generate
from k2model.kernels import cpu_ext
from k2model.kv_cache import PagedKVCache
from k2model.model import K2Model
from tests.model.helpers import Runner

STEPS = 24


class RoundingCache(PagedKVCache):
    """fp32 storage that rounds every write through bf16: the bf16 cache's values, held wide."""

    def write(self, layer: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        super().write(layer, slots, values.to(torch.bfloat16).float())


def k2_latent(tmp: Path) -> Path:
    cfg = tiny_config(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32)
    return write_checkpoint(tmp, cfg, random_weights(cfg, seed=3))


def greedy(model: K2Model, cache: PagedKVCache, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy decoding through `cache` (each prompt's blocks laid out one after another)."""
    runner = Runner(model, num_blocks=cache.num_blocks, block_size=cache.block_size)
    runner.cache = cache
    logits = runner.step(dict(enumerate(prompts)), "naive")
    out = [[int(t)] for t in logits.argmax(-1)]
    for _ in range(STEPS - 1):
        logits = runner.step({i: [o[-1]] for i, o in enumerate(out)}, "absorbed")
        for o, t in zip(out, logits.argmax(-1), strict=True):
            o.append(int(t))
    return out


@pytest.mark.parametrize("which", ["embedded", "tiny", "k2-latent"])
@pytest.mark.parametrize("kernel", [True, False], ids=["cpp-kernel", "torch"])
def test_a_bf16_cache_is_an_fp32_cache_of_rounded_latents(
    which: str, kernel: bool, tiny_ckpt: Path, tmp_path: Path, monkeypatch
) -> None:
    if kernel and not cpu_ext.available():
        pytest.skip("no CPU extension here")
    if not kernel:
        monkeypatch.setattr(cpu_ext, "takes", lambda _x: False)
    path = {"embedded": EMBEDDED_CHECKPOINT, "tiny": tiny_ckpt}.get(which) or k2_latent(tmp_path)
    model = load_model(path, dtype=torch.float32)
    rng = random.Random(len(which))
    vocab = min(model.cfg.vocab_size, 3840)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 7, 40, 130)]
    cfg = model.cfg
    shape = (cfg.num_hidden_layers, 64, 16, cfg.kv_cache_dim)
    rounded = RoundingCache(*shape, torch.float32)
    narrow = model.new_cache(64, 16, torch.bfloat16)
    assert narrow.data.dtype == torch.bfloat16
    assert greedy(model, narrow, prompts) == greedy(model, rounded, prompts)


def test_on_random_weights_bf16_rounding_flips_a_near_tie_greedy_token() -> None:
    """Why fp32 stays the default on CPU: the embedded checkpoint's greedy text changes."""
    model = load_model(EMBEDDED_CHECKPOINT, dtype=torch.float32)

    def greedy(kv_dtype: torch.dtype | None) -> list[int]:
        steps = generate(model, [GenerationRequest([7], 32)], kv_dtype=kv_dtype)
        return [e.token_id for step in steps for e in step]

    wide, narrow = greedy(None), greedy(torch.bfloat16)
    same = next((i for i, (a, b) in enumerate(zip(wide, narrow, strict=True)) if a != b), 32)
    assert 8 <= same < 32


def test_the_bf16_cache_holds_half_the_bytes_and_widens_what_it_gives_back(tiny_fp32) -> None:
    wide, narrow = tiny_fp32.new_cache(4, 16), tiny_fp32.new_cache(4, 16, torch.bfloat16)
    assert narrow.bytes_per_token * 2 == wide.bytes_per_token
    values = torch.randn(3, narrow.dim)
    slots = torch.tensor([0, 17, 63])
    narrow.write(0, slots, values)
    back = narrow.gather(0, slots[None])
    assert back.dtype == torch.float32
    assert torch.equal(back[0], values.to(torch.bfloat16).float())
