"""Convert a bf16/fp32 HF checkpoint directory into K2's block-fp8 format.

    python -m k2model.checkpoint.quantize SRC_DIR DST_DIR [--max-shard-bytes N]

Every weight `is_quantized_weight_name` accepts becomes float8_e4m3fn plus an fp32
`.weight_scale_inv` sibling; every other tensor is copied unchanged. config.json gains K2's
`quantization_config`, and the other non-weight files (tokenizer, chat templates) are copied.
The source is checked in full from shard headers before anything is written, then converted one
tensor at a time: memory holds at most the shard being written.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from k2model.checkpoint.fp8 import is_quantized_weight_name, quantize_block_fp8
from k2model.checkpoint.shards import (
    INDEX_NAME,
    CheckpointError,
    ShardedCheckpoint,
    ShardWriter,
    problem_list,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
_QUANTIZABLE_DTYPES = {torch.bfloat16, torch.float16, torch.float32}
_FP8_DTYPES = {
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
}
# Weight files of any format describe the source precision, never the converted checkpoint.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}
_REWRITTEN_FILES = {"config.json", INDEX_NAME}


def quantize_checkpoint(
    src: Path, dst: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    src, dst = Path(src), Path(dst)
    with ShardedCheckpoint.open(src) as ckpt:
        config = _read_config(src)
        _check_source(ckpt, config)
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise CheckpointError(f"destination {dst} must be a new or empty directory")
        with ShardWriter(dst, max_shard_bytes) as writer:
            for name in tqdm(ckpt.names(), desc="quantize", unit="tensor"):
                tensor = ckpt.get(name)
                if is_quantized_weight_name(name):
                    w_fp8, scale_inv = quantize_block_fp8(tensor)
                    writer.add(name, w_fp8)
                    writer.add(f"{name}_scale_inv", scale_inv)
                else:
                    writer.add(name, tensor)
    for file in sorted(src.iterdir()):
        weights = file.name in _REWRITTEN_FILES or file.suffix in _WEIGHT_SUFFIXES
        if file.is_file() and not weights:
            shutil.copy2(file, dst / file.name)
    config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _read_config(src: Path) -> dict[str, Any]:
    file = src / "config.json"
    try:
        config = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{src} has no config.json") from None
    except ValueError as err:
        raise CheckpointError(f"{file}: malformed JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return config


def _check_source(ckpt: ShardedCheckpoint, config: dict[str, Any]) -> None:
    """Refuses an already-quantised source, and weights that cannot be block-quantised."""
    if "quantization_config" in config:
        raise CheckpointError(
            f"{ckpt.path} is already quantised: config.json has a quantization_config"
        )
    names = ckpt.names()
    quantized = [n for n in names if ckpt.dtype(n) in _FP8_DTYPES or n.endswith("_scale_inv")]
    if quantized:
        raise problem_list(f"{ckpt.path} is already quantised: fp8 tensors or scales", quantized)
    bad = [
        f"{n} ({ckpt.dtype(n)}, shape {list(ckpt.shape(n))})"
        for n in names
        if is_quantized_weight_name(n)
        and (ckpt.dtype(n) not in _QUANTIZABLE_DTYPES or len(ckpt.shape(n)) != 2)
    ]
    if bad:
        raise problem_list(f"{ckpt.path}: weights that are not 2-D bf16/fp16/fp32", bad)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m k2model.checkpoint.quantize",
        description="Quantise a bf16/fp32 HF checkpoint to K2 block-fp8 (128x128 blocks).",
    )
    parser.add_argument("src", type=Path, help="source checkpoint directory")
    parser.add_argument("dst", type=Path, help="new or empty output directory")
    parser.add_argument("--max-shard-bytes", type=_positive_int, default=DEFAULT_MAX_SHARD_BYTES)
    args = parser.parse_args(argv)
    try:
        quantize_checkpoint(args.src, args.dst, args.max_shard_bytes)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
