"""The expert pool starts without compiling DeepSpeed's shared-memory all-reduce op.

Regression: `deepspeed.init_distributed` on the CPU backend JIT-built
`deepspeed_shm_comm` under torch's file lock at every fresh start (the pool never all-reduces);
a rank killed mid-build left the lock, and later starts waited on it forever."""

from __future__ import annotations

import importlib

import pytest

deepspeed = pytest.importorskip("deepspeed")
ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` is torch

from services.experts.pool import _no_shm_comm_op  # noqa: E402


def test_deepspeed_skips_its_shm_op_once_switched_off(monkeypatch) -> None:
    built: list[str] = []
    builder = ds_torch.get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        pytest.skip("this accelerator has no shared-memory comm op")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, builder.NAME, True)
    monkeypatch.setattr(type(builder), "load", lambda self, *a, **k: built.append("load"))
    _no_shm_comm_op()
    assert ds_torch.build_shm_op() is None
    assert built == []
