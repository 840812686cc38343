"""Block-fp8 GEMM (Triton) against dequantise-then-multiply in fp32, over ragged shapes."""

import pytest
import torch

from k2model.checkpoint.fp8 import act_quant_fp8, quantize_block_fp8
from tests.kernels.helpers import DEVICE, FP8_ACC_TOL, assert_near, poisoned_outputs, tolerance

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from k2model.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref


def operands(m: int, n: int, k: int):
    # Scales that vary by block, so a scale read from the wrong block shows.
    w = torch.randn(n, k) * torch.rand(n, 1) * torch.rand(1, k) * 4
    x = torch.randn(m, k) * torch.rand(m, 1) * 3
    (wq, ws), (xq, xs) = quantize_block_fp8(w), act_quant_fp8(x)
    return [t.to(DEVICE) for t in (xq, xs, wq, ws)]


@pytest.mark.parametrize(
    "m,n,k", [(1, 128, 128), (5, 200, 300), (16, 64, 129), (33, 256, 384), (130, 130, 257)]
)
def test_matches_reference(m, n, k, monkeypatch) -> None:
    args = operands(m, n, k)
    with poisoned_outputs(monkeypatch):
        out = fp8_gemm(*args, torch.float32)
    assert_near(out, fp8_gemm_ref(*args, torch.float32), FP8_ACC_TOL)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output(out_dtype, monkeypatch) -> None:
    args = operands(70, 192, 256)
    with poisoned_outputs(monkeypatch):
        out = fp8_gemm(*args, out_dtype)
    assert out.dtype == out_dtype
    assert_near(out, fp8_gemm_ref(*args, torch.float32), tolerance(out_dtype) + FP8_ACC_TOL)


def test_explicit_tile_config(monkeypatch) -> None:
    """A 16-row tile with 32-column tiles: four column tiles share each weight-scale block."""
    args = operands(40, 160, 256)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    with poisoned_outputs(monkeypatch):
        out = fp8_gemm(*args, torch.float32, config=cfg)
    assert_near(out, fp8_gemm_ref(*args, torch.float32), FP8_ACC_TOL)


def test_rejects_mismatched_scales() -> None:
    xq, xs, wq, ws = operands(4, 128, 256)
    with pytest.raises(AssertionError):
        fp8_gemm(xq, xs, wq, ws[:, :1], torch.float32)
