"""A round's dispatch and combine over R ranks' shards equals the whole layer's grouped experts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from k2model.moe import LocalExperts
from k2model.runtime import Runtime
from services.experts.plan import combine, pack, packed_bytes, split, unpack
from services.experts.routed import PoolSpec, Routed
from services.experts.shard import ExpertShard

D, INTER, E, K = 32, 16, 8, 3
LAYERS = (1, 2, 4)


def full_layers(seed: int) -> dict[int, LocalExperts]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        ex = LocalExperts(E, D, INTER, Runtime.resolve(torch.float32))
        ex.gate_up.copy_(torch.randn(ex.gate_up.shape, generator=gen) * 0.2)
        ex.down.copy_(torch.randn(ex.down.shape, generator=gen) * 0.2)
        out[layer] = ex
    return out


def shards(layers: dict[int, LocalExperts], ranks: int) -> list[ExpertShard]:
    """Rank r's experts cut from the full stacks (what load_expert_slice reads from a checkpoint)."""
    spec = PoolSpec(D, K, E, LAYERS, ranks)
    out = []
    for r in range(ranks):
        lo, hi = spec.first(r), spec.first(r) + spec.per_rank
        mine = {}
        for layer, ex in layers.items():
            part = LocalExperts(spec.per_rank, D, INTER, Runtime.resolve(torch.float32))
            part.gate_up.copy_(ex.gate_up[lo:hi])
            part.down.copy_(ex.down[lo:hi])
            mine[layer] = part
        out.append(ExpertShard(r, spec, mine))
    return out


def random_call(gen: torch.Generator, layer: int, rows: int, dtype=torch.float32) -> Routed:
    x = torch.randn(rows, D, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(rows)])
    return Routed(layer, x, ids.reshape(rows, K), torch.rand(rows, K, generator=gen))


def run_round(calls: list[Routed], pool: list[ExpertShard]) -> list[torch.Tensor]:
    """What the pool does, with the collectives replaced by pack -> unpack."""
    spec = pool[0].spec
    parts = split(calls, spec, torch.float32)
    partials = []
    for part, shard in zip(parts, pool, strict=True):
        rows, pairs = part.header
        received = unpack(pack(part), rows, pairs, D, torch.float32)
        partials.append(shard.compute(received))
    return combine(calls, parts, partials)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_round_equals_local_experts(ranks: int) -> None:
    layers = full_layers(ranks)
    gen = torch.Generator().manual_seed(10 + ranks)
    calls = [random_call(gen, layer, rows) for layer, rows in [(1, 5), (2, 1), (1, 33), (4, 7)]]
    outs = run_round(calls, shards(layers, ranks))
    for call, out in zip(calls, outs, strict=True):
        want = layers[call.layer](call.x, call.ids, call.weights)
        assert out.shape == call.x.shape and rel_err(out, want) < 1e-5


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.sampled_from(LAYERS), st.integers(1, 12)), min_size=1, max_size=5),
    ranks=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_round_equals_looped_twin_for_any_mix(sizes, ranks: int, seed: int) -> None:
    layers = full_layers(seed % 3)
    gen = torch.Generator().manual_seed(seed)
    calls = [random_call(gen, layer, rows) for layer, rows in sizes]
    for call, out in zip(calls, run_round(calls, shards(layers, ranks)), strict=True):
        want = layers[call.layer].looped(call.x, call.ids, call.weights)
        assert rel_err(out, want) < 1e-5


def test_bf16_rows_come_back_in_bf16() -> None:
    layers = full_layers(0)
    gen = torch.Generator().manual_seed(0)
    call = random_call(gen, 2, 9, torch.bfloat16)
    (out,) = run_round([call], shards(layers, 2))
    want = layers[2](call.x.float(), call.ids, call.weights)
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 1e-2


def test_each_row_travels_to_a_rank_once_with_only_its_pairs() -> None:
    spec = PoolSpec(D, K, E, LAYERS, 2)
    x = torch.arange(3 * D, dtype=torch.float32).reshape(3, D)
    ids = torch.tensor([[0, 1, 2], [0, 4, 5], [5, 6, 7]])  # row 0 only rank 0; row 2 only rank 1
    weights = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    r0, r1 = split([Routed(2, x, ids, weights)], spec, torch.float32)
    assert r0.rows.tolist() == [0, 1] and r1.rows.tolist() == [1, 2]
    assert torch.equal(r0.x, x[[0, 1]]) and torch.equal(r1.x, x[[1, 2]])
    # (local row, layer, local expert) per routed assignment; rank 1's experts are 4..7 -> 0..3
    assert r0.pairs.tolist() == [[0, 2, 0], [0, 2, 1], [0, 2, 2], [1, 2, 0]]
    assert r1.pairs.tolist() == [[0, 2, 0], [0, 2, 1], [1, 2, 1], [1, 2, 2], [1, 2, 3]]
    assert r1.weights.tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_unpack_round_trip(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    (part, _) = split([random_call(gen, 1, 6)], PoolSpec(D, K, E, LAYERS, 2), dtype)
    buf = pack(part)
    rows, pairs = part.header
    assert buf.dtype == torch.uint8 and buf.numel() == packed_bytes(rows, pairs, D, dtype)
    back = unpack(buf, rows, pairs, D, dtype)
    assert torch.equal(back.x, part.x) and back.x.dtype == dtype
    assert torch.equal(back.pairs, part.pairs) and torch.equal(back.weights, part.weights)
