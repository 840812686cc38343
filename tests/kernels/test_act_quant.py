"""act_quant (Triton) equals act_quant_fp8, the torch reference, bit for bit."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from k2model.checkpoint.fp8 import FP8_MAX
from tests.kernels.helpers import DEVICE, poisoned_outputs

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from k2model.kernels.act_quant import act_quant, act_quant_ref


def expected_fp8_bytes(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The reference's fp8 bytes; under the interpreter, as ITS fp32 -> fp8 cast rounds them.

    Triton's interpreter rounds fp32 -> fp8 half-up without carrying into the exponent (31.5 -> 16
    instead of 32); the GPU cast rounds like torch. Emulating the interpreter keeps this a test of
    the kernel's indexing and scaling, which is what can differ between the two."""
    if DEVICE.type == "cuda":
        return act_quant_ref(x.cpu())[0].view(torch.uint8)
    from triton._C.libtriton import ir
    from triton.language import float8e4nv, float32
    from triton.runtime.interpreter import _convert_float

    k = x.shape[-1]
    nb = scales.shape[-1]
    blocks = F.pad(x.float(), (0, nb * 128 - k)).unflatten(-1, (nb, 128))
    scaled = (blocks / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).flatten(-2)[..., :k]
    raw = _convert_float(scaled.contiguous().numpy(), float32, float8e4nv, ir.ROUNDING_MODE.RTNE)
    return torch.from_numpy(np.ascontiguousarray(raw).astype(np.uint8))


@pytest.mark.parametrize("shape", [(1, 128), (3, 7), (17, 200), (5, 384), (2, 3, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(shape, dtype, monkeypatch) -> None:
    x = (torch.randn(shape) * torch.rand(shape[-1]) * 10).to(dtype).to(DEVICE)
    x[..., :5] = 0  # short all-zero blocks: the 1e-4 scale floor applies
    with poisoned_outputs(monkeypatch):
        y, s = act_quant(x)
    # The reference runs on CPU: torch's CUDA division by a scalar multiplies by its reciprocal
    # (1 ulp off at times), while the kernel and torch's CPU division round correctly.
    s_ref = act_quant_ref(x.cpu())[1]
    assert y.dtype == torch.float8_e4m3fn and y.shape == x.shape
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(y.view(torch.uint8).cpu(), expected_fp8_bytes(x.cpu(), s_ref))


def test_extreme_values_saturate_not_overflow(monkeypatch) -> None:
    x = torch.tensor([[1e30, -1e30, 1.0] + [0.0] * 125, [1e-30] * 128], device=DEVICE)
    with poisoned_outputs(monkeypatch):
        y, s = act_quant(x)
    assert torch.isfinite(y.float()).all()
    assert y.float()[0, 0] == 448 and y.float()[0, 1] == -448
    assert s[1, 0].item() == pytest.approx(1e-4 / 448)
