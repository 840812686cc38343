"""A rank's expert slice, loaded straight from the checkpoint, equals that slice of the full model,
and loading it reads no other tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, K2Config, load_model
from k2model.checkpoint.loader import load_expert_slice
from k2model.checkpoint.random_init import random_weights, tiny_config, write_checkpoint
from k2model.checkpoint.shards import ShardedCheckpoint
from services.experts.routed import PoolSpec
from services.experts.shard import ExpertShard


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory) -> Path:
    """bf16, split over several shard files so that slices live in different files."""
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("ck") / "ck"
    return write_checkpoint(path, cfg, random_weights(cfg, seed=3), max_shard_bytes=64 * 1024)


@pytest.mark.parametrize(("first", "count"), [(0, 8), (0, 4), (4, 4), (2, 2), (7, 1)])
def test_slice_equals_full_model(sharded_ckpt: Path, first: int, count: int) -> None:
    full = load_model(sharded_ckpt, torch.float32).moe_layers()
    cfg, experts = load_expert_slice(sharded_ckpt, first, count, torch.float32)
    assert sorted(experts) == sorted(full) and cfg.n_routed_experts == 8
    for layer, ex in experts.items():
        assert ex.n_experts == count
        assert torch.equal(ex.gate_up, full[layer].experts.gate_up[first : first + count])
        assert torch.equal(ex.down, full[layer].experts.down[first : first + count])


def test_reads_only_its_own_experts(sharded_ckpt: Path, monkeypatch) -> None:
    read: list[str] = []
    original = ShardedCheckpoint.get

    def spy(self: ShardedCheckpoint, name: str) -> torch.Tensor:
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(ShardedCheckpoint, "get", spy)
    load_expert_slice(sharded_ckpt, 4, 2, torch.float32)
    want = {
        f"model.layers.{i}.mlp.experts.{e}.{w}_proj.weight"
        for i in (1, 2)
        for e in (4, 5)
        for w in ("gate", "up", "down")
    }
    assert set(read) == want and len(read) == len(want)


@pytest.mark.parametrize("fp8_resident", [False, True])
def test_fp8_checkpoint_slice_computes_like_the_model(fp8_resident: bool) -> None:
    """The embedded checkpoint is block-fp8: dequantised now, or kept resident and dequantised
    per call; both give the full model's expert outputs."""
    full = load_model(EMBEDDED_CHECKPOINT, torch.float32, fp8_resident=fp8_resident)
    cfg, experts = load_expert_slice(EMBEDDED_CHECKPOINT, 4, 4, torch.float32, fp8_resident)
    x = torch.randn(5, cfg.hidden_size)
    ids = torch.tensor([[4, 7], [5, 6], [7, 4], [6, 5], [4, 5]])
    w = torch.rand(5, 2)
    for layer, ex in experts.items():
        assert ex.fp8 == fp8_resident
        got = ex(x, ids - 4, w)
        want = full.moe_layers()[layer].experts(x, ids, w)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_slice_outside_the_experts_is_refused(sharded_ckpt: Path) -> None:
    for first, count in [(6, 4), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="outside"):
            load_expert_slice(sharded_ckpt, first, count)


def test_pool_spec_places_contiguous_slices() -> None:
    cfg = K2Config.from_dir(EMBEDDED_CHECKPOINT)
    spec = PoolSpec.of(cfg, 4)
    assert spec.per_rank == 2 and [spec.first(r) for r in range(4)] == [0, 2, 4, 6]
    assert spec.moe_layers == tuple(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    with pytest.raises(ValueError, match="evenly"):
        PoolSpec.of(cfg, 3)


def test_shard_load_holds_its_rank_slice() -> None:
    shard = ExpertShard.load(EMBEDDED_CHECKPOINT, 1, 2, torch.float32, False, torch.device("cpu"))
    full = load_model(EMBEDDED_CHECKPOINT, torch.float32).moe_layers()
    assert shard.spec.first(1) == 4 and shard.dtype == torch.float32
    for layer, ex in shard.experts.items():
        assert torch.equal(ex.down, full[layer].experts.down[4:8])
