"""Sharded safetensors checkpoint directories: validated, memory-mapped reading and writing.

An HF checkpoint directory holds either `model.safetensors.index.json` plus the shard files its
`weight_map` names, or a single `model.safetensors` (docs/checkpoint.md, shards). The index is authoritative:
only the shards it names are read, and a tensor present in a shard but absent from the index is
not part of the checkpoint. Shard headers are parsed here (not by safetensors) so that shape and
dtype are known without touching tensor data and every defect names the tensor it concerns.
"""

import contextlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Self

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces
_LIST_LIMIT = 20  # names shown in one error message before "... and N more"

# Every safetensors dtype string that safetensors can load into torch with an unchanged shape.
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used as it is."""


def problem_list(summary: str, items: Iterable[str]) -> CheckpointError:
    """One error naming every offending item, sorted, truncated with a count when long."""
    items = sorted(items)
    shown = ", ".join(items[:_LIST_LIMIT])
    more = f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return CheckpointError(f"{summary} ({len(items)}): {shown}{more}")


@dataclass(frozen=True)
class TensorInfo:
    """What a shard header says about one tensor; `nbytes` is the size of its data."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class ShardedCheckpoint:
    """Read-only view of a validated checkpoint directory; shards are opened lazily on `get`.

    `close()` (or leaving the `with` block) closes the open shards; tensors already returned stay
    valid (each is its own mapping), and a later `get` reopens its shard.
    """

    def __init__(
        self, path: Path, tensors: Mapping[str, TensorInfo], stored: Mapping[str, str] | None = None
    ) -> None:
        """stored: a name -> the name its shard stores it under, where they differ."""
        self.path = path
        self._tensors = dict(sorted(tensors.items()))
        self._stored = dict(stored or {})
        self._handles: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def text_model(self) -> tuple[Self, list[str]]:
        """The language model of a multimodal checkpoint (K2.5, K2.6: its tensors under
        `language_model.`) as if it were a text checkpoint, and the names left out (the vision
        tower and projector); itself, and nothing left out, for a text checkpoint."""
        prefix = "language_model."
        if not any(n.startswith(prefix) for n in self._tensors):
            return self, []
        kept = {n.removeprefix(prefix): n for n in self._tensors if n.startswith(prefix)}
        view = type(self)(self.path, {k: self._tensors[n] for k, n in kept.items()}, kept)
        return view, sorted(set(self._tensors) - set(kept.values()))

    @classmethod
    def open(cls, path: Path) -> Self:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        return cls(path, _read_tensors(path, _weight_map(path)))

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def shard_of(self, name: str) -> str:
        return self.info(name).shard

    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self._tensors.values())

    def get(self, name: str) -> torch.Tensor:
        """The tensor as a copy-on-write memory map of its shard (no read until touched)."""
        shard = self.info(name).shard
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = self._stack.enter_context(safe_open(self.path / shard, framework="pt"))
            except SafetensorError as err:
                raise CheckpointError(f"{self.path / shard}: {err}") from err
            self._handles[shard] = handle
        return handle.get_tensor(self._stored.get(name, name))

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_NAME
    if index.is_file():
        return _read_index(index)
    single = path / SINGLE_NAME
    if single.is_file():
        return dict.fromkeys(_read_header(single)[0], SINGLE_NAME)
    raise CheckpointError(f"{path} has neither {INDEX_NAME} nor {SINGLE_NAME}")


def _read_index(index: Path) -> dict[str, str]:
    try:
        doc = json.loads(index.read_bytes())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise CheckpointError(f"{index}: malformed JSON: {err}") from err
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: expected an object with a non-empty 'weight_map' object")
    not_str = [name for name, shard in weight_map.items() if not isinstance(shard, str)]
    if not_str:
        raise problem_list(f"{index}: shard names must be strings", not_str)
    outside = {shard for shard in weight_map.values() if not _is_plain_file_name(shard)}
    if outside:
        raise problem_list(f"{index}: shards must be plain file names in the directory", outside)
    return weight_map


def _is_plain_file_name(name: str) -> bool:
    # Rejects "", ".", "..", "../x", "a/b", "/abs", "C:\\x" and "a\\b" on every platform.
    return (
        name not in ("", ".", "..")
        and PurePosixPath(name).name == PureWindowsPath(name).name == name
    )


def _read_tensors(path: Path, weight_map: Mapping[str, str]) -> dict[str, TensorInfo]:
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    missing = [shard for shard in by_shard if not (path / shard).is_file()]
    if missing:
        raise problem_list(f"{path}: shard files named in the index are missing", missing)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for shard, names in by_shard.items():
        entries, data_bytes = _read_header(path / shard)
        for entry_name, entry in entries.items():
            try:
                info = _tensor_info(shard, entry, data_bytes)
            except CheckpointError as err:
                problems.append(f"{entry_name} ({err} in {shard})")
                continue
            if weight_map.get(entry_name) == shard:
                tensors[entry_name] = info
        problems += [
            f"{name} (listed in the index but absent from {shard})"
            for name in names
            if name not in entries
        ]
    if problems:
        raise problem_list(f"{path}: invalid tensors", problems)
    return tensors


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The raw tensor entries of a safetensors header (`__metadata__` dropped) and data size."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except ValueError as err:
            raise CheckpointError(f"{file}: malformed safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, size - 8 - length


def _tensor_info(shard: str, raw: Any, data_bytes: int) -> TensorInfo:
    if not isinstance(raw, dict):
        raise CheckpointError("header entry is not an object")
    dtype_name = raw.get("dtype")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CheckpointError(f"unknown dtype {dtype_name!r}")
    shape, offsets = raw.get("shape"), raw.get("data_offsets")
    if not _is_int_list(shape) or min(shape, default=0) < 0:
        raise CheckpointError(f"bad shape {shape!r}")
    nbytes = math.prod(shape) * dtype.itemsize
    if not _is_int_list(offsets) or len(offsets) != 2:
        raise CheckpointError(f"bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
        raise CheckpointError(f"data_offsets {offsets} do not hold {nbytes} bytes in the file")
    return TensorInfo(shard, dtype, tuple(shape), nbytes)


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(item) is int for item in value)


class ShardWriter:
    """Streams tensors, in the order added, into shards of at most `max_shard_bytes` tensor bytes.

    Only the shard being filled is held in memory. Full shards go to hidden `.partial` files and
    get their HF names (`model-00001-of-00003.safetensors`) and the index once the total is known
    at `finish()`; if everything fits one shard the result is a single `model.safetensors`. A
    tensor larger than `max_shard_bytes` gets a shard of its own. Leaving a `with` block finishes
    the checkpoint, or on an exception deletes the partial shards.
    """

    def __init__(
        self, path: Path, max_shard_bytes: int, metadata: Mapping[str, str] | None = None
    ) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        path = Path(path)
        existing = [p.name for p in path.glob("*.safetensors")]
        if (path / INDEX_NAME).exists():
            existing.append(INDEX_NAME)
        if existing:
            raise problem_list(f"{path} already holds checkpoint files", existing)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._max = max_shard_bytes
        self._metadata = dict(metadata or {})  # in the index and in every shard header
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name!r} added twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self._max:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total += nbytes

    def finish(self) -> None:
        if not self._pending and not self._written:
            raise CheckpointError(f"refusing to write an empty checkpoint to {self.path}")
        if not self._written and self._pending_bytes <= self._max:
            self._save(self.path / SINGLE_NAME)
            return
        if self._pending:
            self._flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for number, (partial, names) in enumerate(self._written, start=1):
            shard = f"model-{number:05d}-of-{count:05d}.safetensors"
            partial.rename(self.path / shard)
            weight_map.update(dict.fromkeys(names, shard))
        index = {
            "metadata": {**self._metadata, "total_size": self._total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        self._written = []

    def _flush(self) -> None:
        partial = self.path / f".shard-{len(self._written) + 1:05d}.safetensors.partial"
        self._written.append((partial, list(self._pending)))
        self._save(partial)

    def _save(self, file: Path) -> None:
        save_file(self._pending, file, metadata={"format": "pt", **self._metadata})
        self._pending, self._pending_bytes = {}, 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.finish()
            return
        for partial, _ in self._written:
            partial.unlink(missing_ok=True)


def write_sharded(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes `tensors` in sorted-name order, so equal inputs give byte-identical directories."""
    with ShardWriter(path, max_shard_bytes, metadata) as writer:
        for name in sorted(tensors):
            writer.add(name, tensors[name])
