"""What a model computes in and on, fixed at load: the compute dtype, the device, and the ops
backend (kernels/ops.py). Every module of the model is built from one Runtime and creates its
tensors there, so nothing lands on the default device behind the loader's back.

Device names: "cpu", "cuda", "cuda:N", "meta" (shapes only: tests check placement with it), and
"auto" (the first CUDA device when there is one, else the CPU). A CUDA device that is not there
is an error at load (DeviceUnavailable), not a silent CPU run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k2model.kernels.ops import Ops, choose_ops

DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N", "meta")


class DeviceUnavailable(RuntimeError):
    """The requested device is not on this machine."""


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceUnavailable(f"device must be one of {DEVICE_FORMS}, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        index = device.index or 0
        if index >= count:
            raise DeviceUnavailable(
                f"device {name!r}: this machine has {count} CUDA device(s)"
                + ("" if count else " (no GPU visible to this process)")
            )
        return torch.device("cuda", index)
    if device.type not in ("cpu", "meta"):
        raise DeviceUnavailable(f"device must be one of {DEVICE_FORMS}, got {name!r}")
    return device


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 on accelerators; fp32 on CPUs, where bf16 matmuls without AVX-512 run ~10x slower."""
    return torch.float32 if torch.device(device).type in ("cpu", "meta") else torch.bfloat16


@dataclass(frozen=True)
class Runtime:
    dtype: torch.dtype
    device: torch.device
    ops: Ops

    @classmethod
    def resolve(
        cls,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        ops: str = "auto",
    ) -> Runtime:
        """DeviceUnavailable / OpsUnavailable when the device or a named backend is not here."""
        where = resolve_device(device)
        return cls(dtype or default_dtype(where), where, choose_ops(ops, where))

    def empty(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def ones(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.ones(shape, dtype=dtype or self.dtype, device=self.device)

    def zeros(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype or self.dtype, device=self.device)

    def fields(self) -> dict[str, str]:
        """device, ops and dtype as the Stats protos' Backend spells them."""
        dtype = str(self.dtype).removeprefix("torch.")
        return {"device": str(self.device), "ops": self.ops.name, "dtype": dtype}

    def describe(self) -> str:
        return f"device {self.device}, compute {str(self.dtype).removeprefix('torch.')}, ops {self.ops.name}"
