"""Convert a bf16/fp32 HF checkpoint directory into K2-Instruct's block-fp8 format, or (`--int4`)
into K2-Thinking's INT4 format.

    python -m k2model.checkpoint.quantize [--int4] SRC_DIR DST_DIR [--max-shard-bytes N]

fp8: every weight `is_quantized_weight_name` accepts becomes float8_e4m3fn plus an fp32
`.weight_scale_inv` sibling. INT4: every routed expert's projection becomes compressed-tensors
`weight_packed` / `weight_scale` / `weight_shape` (symmetric, group 32; checkpoint/int4.py), and
everything else stays as it is, as in K2-Thinking. Other tensors are copied unchanged. config.json
gains the format's `quantization_config`, and the other non-weight files (tokenizer, chat
templates) are copied. The source is checked in full from shard headers before anything is
written, then converted one tensor at a time: memory holds at most the shard being written.
"""

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from k2model.checkpoint import int4
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
# K2.5 / K2.6 add these to K2-Thinking's ignore list: the vision tower stays unquantised.
_VISION_IGNORE = ["re:vision_tower.*", "re:mm_projector.*"]
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


@dataclass(frozen=True)
class _Format:
    name: str
    targets: Callable[[str], bool]  # which weights it quantises
    fits: Callable[[tuple[int, ...]], bool]  # whether a target's shape can be quantised
    requirement: str  # what `fits` asks, for the error
    convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


def _fp8(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    w_fp8, scale_inv = quantize_block_fp8(w)
    return {name: w_fp8, f"{name}_scale_inv": scale_inv}


def _int4(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    packed, scale = int4.quantize_int4(w)
    shape = torch.tensor(list(w.shape), dtype=torch.int32)
    return {f"{name}_packed": packed, f"{name}_scale": scale, f"{name}_shape": shape}


FORMATS = {
    "fp8": _Format("fp8", is_quantized_weight_name, lambda s: len(s) == 2, "2-D", _fp8),
    "int4": _Format(
        "int4",
        int4.is_int4_weight_name,
        lambda s: len(s) == 2 and s[1] % int4.GROUP == 0,
        f"2-D with input columns a multiple of {int4.GROUP}",
        _int4,
    ),
}


def quantize_checkpoint(
    src: Path, dst: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, fmt: str = "fp8"
) -> None:
    src, dst, form = Path(src), Path(dst), FORMATS[fmt]
    with ShardedCheckpoint.open(src) as ckpt:
        config = _read_config(src)
        _check_source(ckpt, config, form)
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise CheckpointError(f"destination {dst} must be a new or empty directory")
        with ShardWriter(dst, max_shard_bytes) as writer:
            for name in tqdm(ckpt.names(), desc=f"quantize {fmt}", unit="tensor"):
                tensor = ckpt.get(name)
                converted = form.convert(name, tensor) if form.targets(name) else {name: tensor}
                for out_name, out in converted.items():
                    writer.add(out_name, out)
    for file in sorted(src.iterdir()):
        weights = file.name in _REWRITTEN_FILES or file.suffix in _WEIGHT_SUFFIXES
        if file.is_file() and not weights:
            shutil.copy2(file, dst / file.name)
    config["quantization_config"] = _quantization_config(config, fmt)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _quantization_config(config: dict[str, Any], fmt: str) -> dict[str, Any]:
    if fmt == "fp8":
        return dict(QUANTIZATION_CONFIG)
    quant = json.loads(json.dumps(int4.K2_THINKING_QUANTIZATION))
    if "text_config" in config:  # a multimodal K2.5-style checkpoint
        quant["ignore"] += _VISION_IGNORE
    return quant


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


def _check_source(ckpt: ShardedCheckpoint, config: dict[str, Any], form: _Format) -> None:
    """Refuses an already-quantised source, and weights the format cannot quantise."""
    if "quantization_config" in config or "quantization_config" in config.get("text_config", {}):
        raise CheckpointError(
            f"{ckpt.path} is already quantised: config.json has a quantization_config"
        )
    names = ckpt.names()
    quantized = [
        n
        for n in names
        if ckpt.dtype(n) in _FP8_DTYPES or n.endswith(("_scale_inv", "_packed", "weight_scale"))
    ]
    if quantized:
        raise problem_list(f"{ckpt.path} is already quantised: quantised tensors", quantized)
    bad = [
        f"{n} ({ckpt.dtype(n)}, shape {list(ckpt.shape(n))})"
        for n in names
        if form.targets(n)
        and (ckpt.dtype(n) not in _QUANTIZABLE_DTYPES or not form.fits(tuple(ckpt.shape(n))))
    ]
    if bad:
        raise problem_list(
            f"{ckpt.path}: {form.name} weights that are not {form.requirement} bf16/fp16/fp32", bad
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m k2model.checkpoint.quantize",
        description="Quantise a bf16/fp32 HF checkpoint to K2-Instruct's block-fp8 (128x128 "
        "blocks), or with --int4 to K2-Thinking's INT4 routed experts (compressed-tensors "
        "pack-quantized, symmetric, group 32).",
    )
    parser.add_argument("src", type=Path, help="source checkpoint directory")
    parser.add_argument("dst", type=Path, help="new or empty output directory")
    parser.add_argument(
        "--int4",
        action="store_const",
        const="int4",
        default="fp8",
        dest="fmt",
        help="write INT4 routed experts (K2-Thinking, K2.5, K2.6) instead of block-fp8",
    )
    parser.add_argument(
        "--max-shard-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="largest output shard in bytes (default 5 GiB)",
    )
    args = parser.parse_args(argv)
    try:
        quantize_checkpoint(args.src, args.dst, args.max_shard_bytes, args.fmt)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
