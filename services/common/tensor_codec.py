"""torch.Tensor <-> k2.v1.Tensor: raw row-major little-endian bytes plus dtype name and shape.

The wire carries only bytes, a dtype name from a closed list and a shape; nothing is ever
unpickled or evaluated. The receiver states the dtype and shape it expects (from its own model
config) and `tensor_from_proto` refuses anything else with InvalidArgument before a tensor exists.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence

import torch

from services.common.errors import InvalidArgument
from services.pb.k2.v1 import common_pb2

if sys.byteorder != "little":
    raise ImportError("tensor_codec sends native bytes and assumes a little-endian host")

# The names in common.proto's Tensor.dtype comment; they equal str(dtype) without "torch.".
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    """Encode (one copy, into the message's bytes). TypeError for a dtype the contract lacks:
    that is a bug on the sending side, not a bad request."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"dtype {t.dtype} cannot travel as a k2.v1.Tensor")
    # A uint8 view of the flat contiguous tensor: no numpy dtype exists for bf16 or fp8.
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return common_pb2.Tensor(dtype=name, shape=t.shape, data=raw.numpy().tobytes())


def tensor_from_proto(
    msg: common_pb2.Tensor,
    *,
    dtype: torch.dtype,
    shape: Sequence[int | None],
    name: str = "tensor",
) -> torch.Tensor:
    """Decode without copying. `shape` is what the receiver expects: None marks a free dim (e.g.
    the token count), an int a dim fixed by its config. The result shares memory with msg.data and
    must be treated as read-only (copy it into the KV cache; never modify it in place)."""
    _check_dtype(msg.dtype, dtype, name)
    got = list(msg.shape)
    if len(got) != len(shape) or any(
        n < 0 or (want is not None and n != want) for n, want in zip(got, shape, strict=True)
    ):
        expected = ", ".join("*" if d is None else str(d) for d in shape)
        raise InvalidArgument(f"{name}: expected shape [{expected}], got {got}")
    data = msg.data  # read once: each access of a bytes field builds a new object
    nbytes = math.prod(got) * dtype.itemsize
    if len(data) != nbytes:
        raise InvalidArgument(
            f"{name}: shape {got} of {msg.dtype} needs {nbytes} bytes, got {len(data)}"
        )
    if nbytes == 0:
        return torch.empty(got, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns that `bytes` is read-only; the docstring above already says so.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype).reshape(got)


def _check_dtype(sent: str, expected: torch.dtype, name: str) -> None:
    if sent not in DTYPES:
        raise InvalidArgument(f"{name}: unknown dtype {sent!r}, expected one of {sorted(DTYPES)}")
    if DTYPES[sent] != expected:
        raise InvalidArgument(
            f"{name}: expected dtype {_NAMES.get(expected, expected)}, got {sent}"
        )
