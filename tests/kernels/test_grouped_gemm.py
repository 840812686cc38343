"""Grouped GEMM (Triton) over the moe_align layout against a per-expert torch loop."""

import pytest
import torch

from k2model.checkpoint.fp8 import act_quant_fp8, quantize_block_fp8
from tests.kernels.helpers import (
    DEVICE,
    FP8_ACC_TOL,
    HALF_DTYPES,
    assert_near,
    poisoned_outputs,
    tolerance,
)

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from k2model.kernels.grouped_gemm import grouped_gemm, grouped_gemm_ref
from k2model.kernels.moe_align import moe_align

E = 5


def routing(tokens: int, k: int) -> torch.Tensor:
    return torch.stack([torch.randperm(E)[:k] for _ in range(tokens)]).to(DEVICE)


def quantized_stack(n: int, kdim: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [quantize_block_fp8(torch.randn(n, kdim) * torch.rand(n, 1)) for _ in range(E)]
    return torch.stack([p[0] for p in parts]).to(DEVICE), torch.stack([p[1] for p in parts]).to(
        DEVICE
    )


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("tokens,k,block_m", [(1, 1, 16), (9, 2, 16), (40, 3, 32)])
def test_dense_matches_reference(dtype, swiglu, tokens, k, block_m, monkeypatch) -> None:
    n, kdim = 40, 72  # ragged against the 64-wide N and K tiles
    a = torch.randn(tokens, kdim, device=DEVICE).to(dtype)
    b = (torch.randn(E, n, kdim, device=DEVICE) * 0.3).to(dtype)
    up = (torch.randn(E, n, kdim, device=DEVICE) * 0.3).to(dtype) if swiglu else None
    ids = routing(tokens, k)
    row_w = torch.rand(tokens * k, device=DEVICE)
    layout = moe_align(ids, E, block_m)
    with poisoned_outputs(monkeypatch):
        out = grouped_gemm(
            a, b, *layout, tokens * k, k, torch.float32, block_m, up, row_weight=row_w
        )
    ref = grouped_gemm_ref(a, b, ids.reshape(-1), k, torch.float32, up, row_weight=row_w)
    assert_near(out, ref, tolerance(dtype))


def test_strided_halves_of_a_stacked_weight(monkeypatch) -> None:
    """gate and up as the two halves of one [E, 2N, K] tensor (the dense LocalExperts layout)."""
    gate_up = torch.randn(E, 2 * 24, 32, device=DEVICE)
    a, ids = torch.randn(6, 32, device=DEVICE), routing(6, 2)
    layout = moe_align(ids, E, 16)
    with poisoned_outputs(monkeypatch):
        out = grouped_gemm(a, gate_up[:, :24], *layout, 12, 2, torch.float32, 16, gate_up[:, 24:])
    ref = grouped_gemm_ref(a, gate_up[:, :24], ids.reshape(-1), 2, torch.float32, gate_up[:, 24:])
    assert_near(out, ref, tolerance(torch.float32))


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("per_token", [True, False])
def test_fp8_matches_reference(swiglu, per_token, monkeypatch) -> None:
    """Block-fp8 weights with ragged 128-blocks (N 200, K 300); input rows per token (top_k = k)
    or per assignment (top_k = 1, the down projection), with routing weights."""
    tokens, k, n, kdim = 7, 3, 200, 300
    rows = tokens if per_token else tokens * k
    aq, a_s = (t.to(DEVICE) for t in act_quant_fp8(torch.randn(rows, kdim) * 2))
    b, b_s = quantized_stack(n, kdim)
    up, up_s = quantized_stack(n, kdim) if swiglu else (None, None)
    ids, top_k = routing(tokens, k), k if per_token else 1
    row_w = torch.rand(tokens * k, device=DEVICE)
    layout = moe_align(ids, E, 16)
    with poisoned_outputs(monkeypatch):
        out = grouped_gemm(
            aq, b, *layout, tokens * k, top_k, torch.float32, 16, up, a_s, b_s, up_s, row_w
        )
    flat = ids.reshape(-1)
    ref = grouped_gemm_ref(aq, b, flat, top_k, torch.float32, up, a_s, b_s, up_s, row_w)
    assert_near(out, ref, FP8_ACC_TOL)
