"""The bf16-weight CPU kernel (csrc/bf16_gemm.cpp) against its twins, on fresh random inputs."""

from __future__ import annotations

import random

import pytest
import torch

from k2model.kernels import bf16_weights, cpu_ext
from k2model.kernels.ops import Ops
from tests.kernels.helpers import assert_near, poisoned_outputs

needs_kernel = pytest.mark.skipif(
    not cpu_ext.available(), reason="no AVX2 CPU or C++ compiler for the bf16-weight kernel"
)
TOL = 1e-5  # fp32 products of the same values; only the summation order differs


def _rand(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, bf16_weights.MAX_ROWS])
@pytest.mark.parametrize(("n", "k"), [(1, 8), (3, 5), (64, 512), (65, 130), (200, 7)])
def test_linear_matches_widened_blas(
    rows: int, n: int, k: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiles of 4 rows x 2 features, their ragged edges, K tails below 8, 64-feature blocks."""
    x, w = _rand(rows, k, gen=gen), _rand(n, k, gen=gen).bfloat16()
    with poisoned_outputs(monkeypatch):
        out = bf16_weights.linear(x, w)
    assert_near(out, bf16_weights.linear_ref(x, w), TOL)


@needs_kernel
def test_linear_takes_leading_dims_and_strided_rows(gen: torch.Generator) -> None:
    x = _rand(2, 3, 40, gen=gen)[..., :32]  # rows 40 apart, 32 features used
    w = _rand(24, 32, gen=gen).bfloat16()
    out = bf16_weights.linear(x, w)
    assert out.shape == (2, 3, 24)
    assert_near(out, x @ w.float().T, TOL)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_head_linear_on_strided_views(
    rows: int, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shapes MLA uses: q_nope is a view of q, W_UV a per-head slice of kv_b's weight."""
    heads, d_n, d_r, r, d_v = 4, 16, 8, 40, 12
    q = _rand(rows, heads, d_n + d_r, gen=gen)
    kv_b = _rand(heads, d_n + d_v, r, gen=gen).bfloat16()
    q_nope, w_uv = q[..., :d_n], kv_b[:, d_n:]
    w_uk_t = kv_b[:, :d_n].transpose(1, 2).contiguous()
    with poisoned_outputs(monkeypatch):
        q_lat = bf16_weights.head_linear(q_nope, w_uk_t)
        o = bf16_weights.head_linear(q_lat, w_uv)
    want_lat = torch.einsum("mhd,hdr->mhr", q_nope, kv_b[:, :d_n].float())
    assert_near(q_lat, want_lat, TOL)
    assert_near(o, torch.einsum("mhr,hvr->mhv", want_lat, w_uv.float()), 10 * TOL)
    assert_near(o, bf16_weights.head_linear_ref(q_lat, w_uv), TOL)


def test_other_dtypes_and_many_rows_take_the_twin(gen: torch.Generator) -> None:
    w = _rand(16, 24, gen=gen)
    x = _rand(3, 24, gen=gen)
    assert torch.equal(bf16_weights.linear(x, w), torch.nn.functional.linear(x, w))
    many = _rand(bf16_weights.MAX_ROWS + 1, 24, gen=gen)
    assert torch.equal(bf16_weights.linear(many, w.bfloat16()), many @ w.bfloat16().float().T)


def test_only_the_cpu_backend_holds_bf16_and_only_under_fp32() -> None:
    cpu, torch_ops = Ops("cpu"), Ops("torch")
    assert cpu.held_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert cpu.held_dtype(torch.bfloat16, torch.bfloat16) == torch.bfloat16
    assert cpu.held_dtype(torch.float16, torch.float32) == torch.float32
    assert cpu.held_dtype(torch.float32, torch.float32) == torch.float32
    assert torch_ops.held_dtype(torch.bfloat16, torch.float32) == torch.float32


@needs_kernel
def test_bad_operands_are_refused() -> None:
    ext = cpu_ext.extension()
    x, w = torch.zeros(2, 8), torch.zeros(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="features"):
        ext.linear(torch.zeros(2, 9), w, torch.empty(2, 3))
    with pytest.raises(RuntimeError, match="out has shape"):
        ext.linear(x, w, torch.empty(3, 2))
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        ext.linear(x, w.float(), torch.empty(2, 3))
