"""Every tensor of a loaded model is placed through the device argument (k2model/runtime.py):
on the meta device nothing lands on the CPU behind the loader's back, and `.to()` moves all of
it (rope tables and resident fp8 parts are buffers)."""

from __future__ import annotations

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT, load_model
from k2model.checkpoint.loader import load_expert_slice
from k2model.runtime import DeviceUnavailable, Runtime, resolve_device


class NoCpuTensors(torch.overrides.TorchFunctionMode):
    """Records every tensor a torch function returns on the CPU while active."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.numel() > 1:
            self.cpu.append(getattr(func, "__name__", str(func)))
        return out


def _cpu_reads(names: list[str]) -> list[str]:
    """The checkpoint's own tensors are read on the CPU (safetensors) and then moved: those
    calls are the loader's reads, not placements."""
    return [n for n in names if n not in ("get_slice", "__getitem__", "view", "reshape")]


@pytest.mark.parametrize("fp8_resident", [False, True])
def test_a_meta_model_holds_nothing_elsewhere(fp8_resident: bool) -> None:
    model = load_model(EMBEDDED_CHECKPOINT, device="meta", ops="torch", fp8_resident=fp8_resident)
    placed = {name: t.device.type for name, t in model.named_buffers()}
    assert set(placed.values()) == {"meta"}, [n for n, d in placed.items() if d != "meta"]
    assert any("rope" in n for n in placed)  # the rope table is a buffer too
    if fp8_resident:
        assert any(n.endswith("fp8_w0") for n in placed)
        assert any(n.endswith("fp8_gate") for n in placed)
    assert model.new_cache(4, 16).data.device.type == "meta"
    _, experts = load_expert_slice(EMBEDDED_CHECKPOINT, 0, 2, device="meta", ops="torch")
    assert {b.device.type for ex in experts.values() for b in ex.buffers()} == {"meta"}


def test_building_on_meta_creates_no_cpu_tensors() -> None:
    from k2model.config import K2Config
    from k2model.model import K2Model

    rt = Runtime.resolve(torch.float32, "meta", "torch")
    with NoCpuTensors() as mode:
        K2Model(K2Config.from_dir(EMBEDDED_CHECKPOINT), rt)
    assert _cpu_reads(mode.cpu) == []


def test_to_moves_every_buffer() -> None:
    model = load_model(EMBEDDED_CHECKPOINT, ops="torch", fp8_resident=True).to("meta")
    assert {b.device.type for b in model.buffers()} == {"meta"}


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceUnavailable, match="must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="no GPU visible"):
            resolve_device("cuda:1")
