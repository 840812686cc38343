"""Shared checks for kernel tests: the device, poisoned allocations and a max-norm comparison."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INT_POISON = -(2**30)


@contextmanager
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, torch.empty returns NaN-filled floats (fp8 included) and INT_POISON-filled
    ints, so an output element a kernel forgets to write shows up instead of reading as 0."""
    real_empty = torch.empty

    def empty(*size, **kwargs) -> torch.Tensor:
        t = real_empty(*size, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(INT_POISON) if t.dtype != torch.bool else t

    monkeypatch.setattr(torch, "empty", empty)
    try:
        yield
    finally:
        monkeypatch.setattr(torch, "empty", real_empty)


def assert_near(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """Same shape, every element finite, and max |out - ref| <= tol * max |ref|."""
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum()} non-finite elements"
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * max |ref| {scale:.3g}"


def tolerance(dtype: torch.dtype) -> float:
    """Max-norm tolerance of a result in this dtype (the interpreter computes in fp32/fp64)."""
    return {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]


# Hopper's fp8 tensor cores accumulate each 128-deep product in reduced precision (DeepSeek-V3
# report: about 14 mantissa bits) before the kernel adds it into fp32; the interpreter is exact.
FP8_ACC_TOL = 3e-3 if DEVICE.type == "cuda" else 2e-5

# Triton's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits, so on CPU the
# 16-bit float paths run in fp16 (the same kernel code) and bf16 runs on CUDA only.
HALF_DTYPES = [torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float16]
