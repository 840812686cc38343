"""The C++ CPU ops (csrc/) against their plain-torch twins, on fresh random inputs each run:
RMSNorm, one MoE layer's routed experts, absorbed MLA decode off the paged cache (fp32 or bf16)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from k2model.checkpoint.int4 import quantize_int4
from k2model.kernels import cpu_ext, mla_decode
from k2model.layers import RMSNorm
from k2model.moe import LocalExperts
from k2model.runtime import Runtime
from tests.kernels.helpers import assert_near, poisoned_outputs

pytestmark = pytest.mark.skipif(
    not cpu_ext.available(), reason="no AVX2 CPU or C++ compiler for k2model's CPU extension"
)
TOL = 1e-5


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


@pytest.mark.parametrize(("rows", "dim"), [(1, 8), (3, 13), (17, 512), (64, 100)])
def test_rms_norm(rows: int, dim: int, gen: torch.Generator, monkeypatch) -> None:
    norm = RMSNorm(dim, 1e-6, Runtime.resolve(torch.float32))
    norm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
    wide = torch.randn(rows, dim + 5, generator=gen) * 3
    x = wide[:, :dim]  # strided rows, as the q/kv latents split from one projection are
    with poisoned_outputs(monkeypatch):
        out = norm(x)
    assert_near(out, norm.reference(x), TOL)


def _experts(
    n: int, dim: int, inter: int, gen: torch.Generator, held: torch.dtype = torch.bfloat16
) -> LocalExperts:
    ex = LocalExperts(n, dim, inter, Runtime.resolve(torch.float32))
    ex.hold(held)
    ex.gate_up.copy_(torch.randn(ex.gate_up.shape, generator=gen) * 0.2)
    ex.down.copy_(torch.randn(ex.down.shape, generator=gen) * 0.2)
    return ex


@pytest.mark.parametrize("held", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("tokens", "k"), [(1, 1), (1, 4), (5, 2), (33, 3), (70, 8)])
def test_routed_experts(tokens: int, k: int, held, gen: torch.Generator, monkeypatch) -> None:
    """Every expert id and none; ragged groups; experts with no rows at all; bf16-resident
    stacks and fp32 ones (fp32 and dequantised-fp8 checkpoints)."""
    ex = _experts(9, 40, 24, gen, held)
    x = torch.randn(tokens, 40, generator=gen)
    ids = torch.stack([torch.randperm(9, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    with poisoned_outputs(monkeypatch):
        out = ex(x, ids, weights)
    assert_near(out, ex.grouped(x, ids, weights), TOL)
    assert_near(out, ex.looped(x, ids, weights), TOL)


def _int4_experts(n: int, dim: int, inter: int, gen: torch.Generator) -> LocalExperts:
    ex = LocalExperts(n, dim, inter, Runtime.resolve(torch.float32))
    shapes = ((inter, dim), (inter, dim), (dim, inter))
    ex.set_int4(
        [
            tuple(quantize_int4(torch.randn(s, generator=gen) * 0.2) for s in shapes)
            for _ in range(n)
        ]
    )
    return ex


@pytest.mark.parametrize(("tokens", "k"), [(1, 1), (1, 4), (5, 2), (33, 3), (70, 8)])
@pytest.mark.parametrize(("dim", "inter"), [(64, 32), (96, 160)])
def test_routed_experts_int4(tokens, k, dim, inter, gen: torch.Generator, monkeypatch) -> None:
    """INT4 stacks widened in registers (csrc/routed_experts.cpp) against the dequantising twin:
    ragged groups, idle experts, several groups of 32 per row."""
    ex = _int4_experts(9, dim, inter, gen)
    x = torch.randn(tokens, dim, generator=gen)
    ids = torch.stack([torch.randperm(9, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen)
    with poisoned_outputs(monkeypatch):
        out = ex(x, ids, weights)
    assert_near(out, ex.grouped(x, ids, weights), TOL)
    assert_near(out, ex.looped(x, ids, weights), TOL)


def test_routed_experts_refuses_a_bad_expert_id(gen: torch.Generator) -> None:
    ex = _experts(4, 16, 8, gen)
    with pytest.raises(RuntimeError, match="expert id 4 outside"):
        ex(torch.randn(2, 16), torch.tensor([[0, 4], [1, 2]]), torch.rand(2, 2))


@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("batch", "heads", "lengths", "r"),
    [(1, 1, [1], 40), (1, 8, [37], 40), (3, 6, [5, 1, 64], 40), (4, 16, [9, 130, 2, 40], 512)],
)
def test_mla_decode(
    batch: int,
    heads: int,
    lengths: list[int],
    r: int,
    cache: torch.dtype,
    gen: torch.Generator,
    monkeypatch,
) -> None:
    """Scattered slots (as a paged cache has them), lengths shorter than the slot rows; an fp32
    cache and a bf16 one (widened as it is read: the twin widens it first), K2's r = 512."""
    d_r = 8
    width = max(lengths) + 3
    kv = torch.randn(600, r + d_r, generator=gen).to(cache)
    slots = torch.stack([torch.randperm(600, generator=gen)[:width] for _ in range(batch)])
    q = torch.randn(batch, heads, r + d_r, generator=gen)
    n = torch.tensor(lengths)
    with poisoned_outputs(monkeypatch):
        out = torch.empty(batch, heads, r)
        cpu_ext.extension().mla_decode(q, kv, slots, n, 0.125, r, out)
    assert_near(out, mla_decode.mla_decode_ref(q, kv, slots, n, 0.125, r), TOL)


def test_mla_decode_refuses_bad_slots_and_lengths() -> None:
    q, kv = torch.zeros(1, 2, 12), torch.zeros(10, 12)
    out = torch.empty(1, 2, 8)
    ext = cpu_ext.extension()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ext.mla_decode(q, kv, torch.tensor([[3, 10]]), torch.tensor([2]), 1.0, 8, out)
    with pytest.raises(RuntimeError, match="length 3 outside"):
        ext.mla_decode(q, kv, torch.tensor([[3, 4]]), torch.tensor([3]), 1.0, 8, out)


def test_cpu_generation_never_imports_triton() -> None:
    """Importing Triton costs a CPU service ~70 MB; only CUDA tensors need it."""
    code = (
        "import sys\n"
        "from k2model import EMBEDDED_CHECKPOINT\n"
        "from k2model.checkpoint.loader import load_model\n"
        "from k2model.generation import GenerationRequest, generate\n"
        "m = load_model(EMBEDDED_CHECKPOINT)\n"
        "for _ in generate(m, [GenerationRequest([5, 6, 7], 4)]): pass\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
