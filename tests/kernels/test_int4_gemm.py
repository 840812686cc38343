"""W4A16 grouped GEMM (Triton) over INT4 words, and the fused INT4 MoE, against their torch twins
and the model's LocalExperts."""

import pytest
import torch

from k2model.checkpoint.int4 import dequantize_int4, quantize_int4
from k2model.moe import LocalExperts
from k2model.runtime import Runtime
from tests.kernels.helpers import DEVICE, HALF_DTYPES, assert_near, poisoned_outputs, tolerance

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from k2model.kernels.fused_moe import fused_moe, fused_moe_ref
from k2model.kernels.grouped_gemm import grouped_gemm_ref
from k2model.kernels.int4_gemm import int4_grouped_gemm
from k2model.kernels.moe_align import moe_align

E = 5


def routing(tokens: int, k: int, experts: int = E) -> torch.Tensor:
    return torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]).to(DEVICE)


def int4_stack(n: int, kdim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E experts' [n, kdim] weights, packed: rows of different magnitudes, so scales vary."""
    parts = [quantize_int4(torch.randn(n, kdim) * torch.rand(n, 1)) for _ in range(E)]
    packed = torch.stack([p[0] for p in parts]).to(DEVICE)
    return packed, torch.stack([p[1] for p in parts]).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("tokens,k,block_m", [(1, 1, 16), (9, 2, 16), (40, 3, 32)])
def test_int4_matches_reference(dtype, swiglu, tokens, k, block_m, monkeypatch) -> None:
    n, kdim = 40, 96  # ragged against the 64-wide N and K tiles; K is whole groups of 32
    a = torch.randn(tokens, kdim, device=DEVICE).to(dtype)
    b, b_s = int4_stack(n, kdim)
    up, up_s = int4_stack(n, kdim) if swiglu else (None, None)
    ids = routing(tokens, k)
    row_w = torch.rand(tokens * k, device=DEVICE)
    layout = moe_align(ids, E, block_m)
    with poisoned_outputs(monkeypatch):
        out = int4_grouped_gemm(
            a, b, b_s, *layout, tokens * k, k, torch.float32, block_m, up, up_s, row_w
        )
    flat = ids.reshape(-1)
    ref = grouped_gemm_ref(a, b, flat, k, torch.float32, up, None, b_s, up_s, row_w)
    assert_near(out, ref, tolerance(dtype))
    if not swiglu:  # the twin is the product with the dequantised weights
        dense = dequantize_int4(b, b_s, torch.float32)
        assert_near(ref, _plain(a, dense, flat, k, row_w), 1e-6)


def _plain(a: torch.Tensor, w: torch.Tensor, flat: torch.Tensor, k: int, row_w) -> torch.Tensor:
    rows = torch.arange(flat.numel(), device=a.device) // k
    return torch.einsum("jk,jnk->jn", a.float()[rows], w[flat]) * row_w[:, None]


def int4_experts(dim: int, inter: int, n_experts: int) -> LocalExperts:
    ex = LocalExperts(n_experts, dim, inter, Runtime.resolve(torch.float32))
    ex.set_int4(
        [
            tuple(
                quantize_int4(torch.randn(*s) * 0.2) for s in ((inter, dim),) * 2 + ((dim, inter),)
            )
            for _ in range(n_experts)
        ]
    )
    return ex


@pytest.mark.parametrize("tokens", [1, 13])
def test_fused_int4_moe_matches_its_twin_and_the_model(tokens, monkeypatch) -> None:
    """gate and up as the two halves of the stacked INT4 words, down at I/8 words per row."""
    ex = int4_experts(dim=160, inter=96, n_experts=6)
    w = ex.stacked()
    assert w.int4 and not w.fp8 and w.gate.stride() == w.up.stride()
    w = type(w)(*(t.to(DEVICE) for t in w.__dict__.values()))
    x, ids, weights = torch.randn(tokens, 160), routing(tokens, 2, 6).cpu(), torch.rand(tokens, 2)
    with poisoned_outputs(monkeypatch):
        out = fused_moe(x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), w)
    ref = fused_moe_ref(x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), w)
    assert_near(out, ref, tolerance(torch.float32))
    assert_near(ref.cpu(), ex.grouped(x, ids, weights), 1e-5)
