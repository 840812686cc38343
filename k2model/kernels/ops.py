"""The ops backend: which kernels a model runs, chosen once at load and handed to every layer.

Backends (deployment `ops:`, load_model(ops=)):
- "torch": the plain-torch twins everywhere (the reference every other backend is tested against);
- "cpu": k2model's C++ extension (kernels/cpu_ext.py) on CPU tensors: bf16-resident matmuls,
  RMSNorm, one-call routed experts (bf16, fp32 or INT4 packed), MLA decode off the paged cache;
  shapes it does not take (many rows, other dtypes) use the twins;
- "triton": the Triton kernels (block-fp8 GEMM, grouped MoE, MLA decode) on the model's device,
  CUDA, or CPU tensors under TRITON_INTERPRET=1 (tests).
"auto" picks triton on CUDA when it is installed, else cpu on a CPU that has the extension, else
torch. A named backend that cannot run is an error at load (OpsUnavailable), never a silent
fallback. Layers call `Ops` methods and never test devices; the choice is logged by whoever loads
(services report it in Stats and /metrics).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from k2model.checkpoint.fp8 import dequantize_block_fp8
from k2model.kernels import bf16_weights, cpu_ext
from k2model.kernels.dispatch import Fp8Part

if TYPE_CHECKING:
    from k2model.moe import LocalExperts

OpsName = Literal["torch", "cpu", "triton"]
OPS_CHOICES = ("auto", "torch", "cpu", "triton")


class OpsUnavailable(RuntimeError):
    """A requested ops backend cannot run here (the message says why)."""


@dataclass(frozen=True)
class Ops:
    name: OpsName

    def paged_decode(self, x: torch.Tensor) -> bool:
        """Whether decode over activations x attends straight off the paged cache (else the
        context is gathered first): the kernels on triton; the C++ op on cpu, for fp32."""
        return self.name == "triton" or (self.name == "cpu" and cpu_ext.takes(x))

    def held_dtype(self, stored: torch.dtype, compute: torch.dtype) -> torch.dtype:
        """The dtype a `stored` weight is held in under `compute`: bf16 stays bf16 under fp32
        with the cpu backend (its matmuls widen in registers); anything else is `compute`."""
        if self.name == "cpu" and stored == torch.bfloat16 and compute == torch.float32:
            return stored
        return compute

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ w [N, K]^T in x's dtype; w in x's dtype, or bf16 under fp32 x."""
        if w.dtype == x.dtype:
            return F.linear(x, w)
        if self.name == "cpu":
            return bf16_weights.linear(x, w)
        return bf16_weights.linear_ref(x, w)

    def head_linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One linear per head: x [M, H, K], w [H, N, K] -> [M, H, N]."""
        if self.name == "cpu":
            return bf16_weights.head_linear(x, w)
        return bf16_weights.head_linear_ref(x, w)

    def fp8_linear(self, x: torch.Tensor, parts: list[Fp8Part], dtype: torch.dtype) -> torch.Tensor:
        """x @ concat(parts)^T for block-fp8 parts: the fp8 GEMM kernel on triton, else the parts
        dequantised for this call only (fp8 stays resident)."""
        if self.name == "triton":
            from k2model.kernels import dispatch

            return dispatch.fp8_linear(x, parts, dtype)
        mats = [dequantize_block_fp8(w, s, dtype) for w, s in parts]
        return F.linear(x, mats[0] if len(mats) == 1 else torch.cat(mats))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if self.name == "cpu" and x.dim() == 2 and x.stride(-1) == 1 and cpu_ext.takes(x):
            out = torch.empty(x.shape, dtype=x.dtype)  # one C++ pass per row
            cpu_ext.extension().rms_norm(x, weight, eps, out)
            return out
        return rms_norm_ref(x, weight, eps)

    def mla_decode(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        slots: torch.Tensor,
        lengths: torch.Tensor,
        sm_scale: float,
        r: int,
    ) -> torch.Tensor:
        """q [B, H, r + d_r] against the cache rows kv[slots[b, :lengths[b]]] -> [B, H, r]."""
        if self.name == "cpu" and cpu_ext.takes(q) and kv.dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(q.shape[0], q.shape[1], r, dtype=q.dtype)  # csrc/mla_decode.cpp
            cpu_ext.extension().mla_decode(
                q.contiguous(), kv.contiguous(), slots.contiguous(), lengths, sm_scale, r, out
            )
            return out
        from k2model.kernels import mla_decode as kernel  # imports triton: not on the cpu path

        run = kernel.mla_decode if self.name == "triton" else kernel.mla_decode_ref
        return run(q, kv, slots, lengths, sm_scale, r)

    def routed_experts(
        self, experts: LocalExperts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """One MoE layer's routed experts: the grouped kernels (triton), one C++ call (cpu), or
        `experts.grouped`, the twin. INT4 experts stay packed on both fast paths (W4A16 grouped
        kernels; one C++ call widening each weight row in registers); the twin dequantises each
        active expert."""
        if self.name == "triton":
            from k2model.kernels import fused_moe

            return fused_moe.fused_moe(x, ids, weights, experts.stacked())
        if experts.int4:
            if self.name == "cpu" and cpu_ext.takes(x):
                out = torch.empty(x.shape, dtype=x.dtype)
                cpu_ext.extension().routed_experts_int4(
                    x.contiguous(),
                    ids.contiguous(),
                    weights.float().contiguous(),
                    experts.int4_gate_up,
                    experts.int4_gate_up_scale,
                    experts.int4_down,
                    experts.int4_down_scale,
                    out,
                )
                return out
            return experts.grouped(x, ids, weights)
        held = experts.gate_up.dtype in (torch.bfloat16, torch.float32)
        if (
            self.name == "cpu"
            and not experts.fp8
            and held
            and experts.gate_up.shape[0]
            and cpu_ext.takes(x)
        ):
            out = torch.empty(x.shape, dtype=x.dtype)  # the whole layer in one C++ call
            x, ids, w = x.contiguous(), ids.contiguous(), weights.float().contiguous()
            cpu_ext.extension().routed_experts(x, ids, w, experts.gate_up, experts.down, out)
            return out
        return experts.grouped(x, ids, weights)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * (x / rms(x)), statistics in fp32, cast back before the weight: the twin of
    csrc/rms_norm.cpp."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


TORCH = Ops("torch")


def choose_ops(requested: str, device: torch.device) -> Ops:
    """The backend for `requested` (one of OPS_CHOICES) on `device`; OpsUnavailable when a
    named backend cannot run there."""
    if requested not in OPS_CHOICES:
        raise OpsUnavailable(f"ops must be one of {OPS_CHOICES}, got {requested!r}")
    triton = importlib.util.find_spec("triton") is not None
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if requested == "auto":
        if device.type == "cuda":
            return Ops("triton" if triton else "torch")
        return Ops("cpu" if device.type == "cpu" and cpu_ext.available() else "torch")
    if requested == "cpu":
        if device.type != "cpu":
            raise OpsUnavailable(f"ops: cpu runs on CPU tensors, the model is on {device}")
        if not cpu_ext.available():
            raise OpsUnavailable(
                "ops: cpu needs k2model's C++ extension, which is not available here (an AVX2 "
                f"CPU and a C++ compiler): {cpu_ext.unavailable_reason()}"
            )
    if requested == "triton":
        if not triton:
            raise OpsUnavailable("ops: triton needs the triton package, which is not installed")
        if device.type != "cuda" and not interpreted:
            raise OpsUnavailable(
                f"ops: triton needs a CUDA device (the model is on {device}), or TRITON_INTERPRET=1"
            )
    return Ops(requested)  # type: ignore[arg-type]  # checked against OPS_CHOICES above
