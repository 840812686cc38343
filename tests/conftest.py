"""Set before any test module is collected: on a machine without CUDA, Triton kernels run in
Triton's interpreter on CPU tensors. Triton reads TRITON_INTERPRET when a kernel is decorated,
and libraries imported while collecting (compressed-tensors imports triton) must not decorate
first under another setting."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def int4_embedded(tmp_path_factory) -> tuple[Path, Path]:
    """(the embedded model with INT4 routed experts, written by `quantize --int4` from its
    weights widened to bf16; the same weights dequantised to fp32, where q * scale is exact):
    the pair every INT4 path is held to."""
    from k2model import EMBEDDED_CHECKPOINT
    from k2model.checkpoint.fp8 import dequantize_block_fp8
    from k2model.checkpoint.int4 import dequantize_int4
    from k2model.checkpoint.quantize import quantize_checkpoint
    from k2model.checkpoint.random_init import write_checkpoint
    from k2model.checkpoint.shards import ShardedCheckpoint

    root = tmp_path_factory.mktemp("int4-embedded")
    config = json.loads((EMBEDDED_CHECKPOINT / "config.json").read_text())
    del config["quantization_config"]  # the embedded model is block-fp8, as K2-Instruct

    def write(name: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = write_checkpoint(root / name, config, tensors)
        for side in ("tiktoken.model", "tokenizer_config.json"):
            shutil.copy(EMBEDDED_CHECKPOINT / side, path / side)
        return path

    with ShardedCheckpoint.open(EMBEDDED_CHECKPOINT) as ckpt:
        fp8 = {n.removesuffix("_scale_inv") for n in ckpt.names() if n.endswith("_scale_inv")}
        bf16 = {
            n: dequantize_block_fp8(ckpt.get(n), ckpt.get(n + "_scale_inv"), torch.bfloat16)
            if n in fp8
            else ckpt.get(n)
            for n in ckpt.names()
            if not n.endswith("_scale_inv")
        }
    quantize_checkpoint(write("bf16", bf16), root / "int4", fmt="int4")
    dense = {}
    with ShardedCheckpoint.open(root / "int4") as ckpt:
        for name in ckpt.names():
            if name.endswith("_packed"):
                base = name.removesuffix("_packed")
                scale = ckpt.get(base + "_scale")
                dense[base] = dequantize_int4(ckpt.get(name), scale, torch.float32)
            elif not name.endswith(("_scale", "_shape")):
                dense[name] = ckpt.get(name)
    return root / "int4", write("dense", dense)
