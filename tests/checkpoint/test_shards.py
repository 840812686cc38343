"""Sharded safetensors directories: round trips, index validation and header parsing."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from k2model.checkpoint import shards
from k2model.checkpoint.shards import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointError,
    ShardedCheckpoint,
    ShardWriter,
    write_sharded,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(64, 16, generator=g).bfloat16(),  # 2048 B
        "model.layers.0.self_attn.q_a_proj.weight": torch.randn(32, 16, generator=g).to(
            torch.float8_e4m3fn
        ),  # 512 B
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv": torch.rand(1, 1, generator=g),
        "model.layers.1.mlp.gate.e_score_correction_bias": torch.randn(8, generator=g),
        "model.norm.weight": torch.ones(16, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(64, 16, generator=g).bfloat16(),  # 2048 B
        "step": torch.tensor(7, dtype=torch.int64),  # 0-d
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
    }


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """Bitwise view, so fp8 and bool compare exactly too."""
    return t.reshape(-1).view(torch.uint8)


def _write_raw_safetensors(file: Path, header: dict[str, object], data: bytes) -> None:
    """A safetensors file from hand-written header JSON (8-byte little-endian length prefix)."""
    encoded = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _write_index(directory: Path, weight_map: object) -> None:
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_round_trip(tmp_path: Path) -> None:
    tensors = _tensors()
    write_sharded(tmp_path, tensors, max_shard_bytes=2100, metadata={"origin": "test"})

    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) >= 3
    assert shard_files == [
        f"model-{i:05d}-of-{len(shard_files):05d}.safetensors"
        for i in range(1, len(shard_files) + 1)
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*shard_files, INDEX_NAME])
    assert index["metadata"] == {
        "origin": "test",
        "total_size": sum(map(_nbytes, tensors.values())),
    }
    for shard in shard_files:
        names = [n for n, s in index["weight_map"].items() if s == shard]
        assert len(names) == 1 or sum(_nbytes(tensors[n]) for n in names) <= 2100

    with ShardedCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == sorted(tensors)
        assert ckpt.total_bytes() == index["metadata"]["total_size"]
        for name, expected in tensors.items():
            assert ckpt.shard_of(name) == index["weight_map"][name]
            assert ckpt.shape(name) == tuple(expected.shape)
            assert ckpt.dtype(name) == expected.dtype
            got = ckpt.get(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert torch.equal(_bytes(got), _bytes(expected))


def test_shard_headers_carry_format_and_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    write_sharded(tmp_path, _tensors(), max_shard_bytes=2100, metadata={"origin": "test"})
    for shard in tmp_path.glob("model-*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt", "origin": "test"}


def test_single_file_when_everything_fits(tmp_path: Path) -> None:
    tensors = _tensors()
    write_sharded(tmp_path, tensors, max_shard_bytes=sum(map(_nbytes, tensors.values())))
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE_NAME]
    with ShardedCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == sorted(tensors)
        assert {ckpt.shard_of(n) for n in tensors} == {SINGLE_NAME}
        assert torch.equal(ckpt.get("lm_head.weight"), tensors["lm_head.weight"])


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    tensors = {"big": torch.zeros(100), "small": torch.zeros(2), "tiny": torch.zeros(1)}
    write_sharded(tmp_path, tensors, max_shard_bytes=16)
    weight_map = json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"]
    assert weight_map == {
        "big": "model-00001-of-00002.safetensors",
        "small": "model-00002-of-00002.safetensors",
        "tiny": "model-00002-of-00002.safetensors",
    }


def test_single_oversized_tensor_is_still_indexed(tmp_path: Path) -> None:
    write_sharded(tmp_path, {"big": torch.zeros(100)}, max_shard_bytes=16)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["weight_map"] == {"big": "model-00001-of-00001.safetensors"}
    assert not (tmp_path / SINGLE_NAME).exists()


def test_writing_is_deterministic(tmp_path: Path) -> None:
    tensors = _tensors()
    write_sharded(tmp_path / "a", tensors, max_shard_bytes=2100)
    write_sharded(tmp_path / "b", dict(reversed(tensors.items())), max_shard_bytes=2100)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_writer_refuses_existing_checkpoint_duplicates_and_empty(tmp_path: Path) -> None:
    write_sharded(tmp_path / "a", {"x": torch.ones(2)}, max_shard_bytes=100)
    with pytest.raises(CheckpointError, match="already holds checkpoint files"):
        write_sharded(tmp_path / "a", {"y": torch.ones(2)}, max_shard_bytes=100)
    writer = ShardWriter(tmp_path / "b", max_shard_bytes=100)
    writer.add("x", torch.ones(2))
    with pytest.raises(CheckpointError, match="added twice"):
        writer.add("x", torch.ones(2))
    with pytest.raises(CheckpointError, match="empty checkpoint"):
        write_sharded(tmp_path / "c", {}, max_shard_bytes=100)


def test_writer_removes_partial_shards_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, max_shard_bytes=8) as writer:
        writer.add("a", torch.zeros(2))
        writer.add("b", torch.zeros(2))  # flushes "a" to a partial shard
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_stray_safetensors_file_is_not_part_of_the_checkpoint(tmp_path: Path) -> None:
    write_sharded(tmp_path, _tensors(), max_shard_bytes=2100)
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    save_file({"stray": torch.ones(3)}, tmp_path / "consolidated.safetensors")
    with ShardedCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == sorted(_tensors())
        assert "stray" not in ckpt


def test_tensor_in_shard_but_not_in_index_is_ignored(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "extra": torch.zeros(3)}, tmp_path / "s.safetensors")
    _write_index(tmp_path, {"a": "s.safetensors"})
    with ShardedCheckpoint.open(tmp_path) as ckpt:
        assert ckpt.names() == ["a"]
        assert ckpt.total_bytes() == 8


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        ShardedCheckpoint.open(tmp_path / "nope")


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="neither"):
        ShardedCheckpoint.open(tmp_path)


def test_index_naming_missing_shards(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    _write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s3.safetensors"})
    with pytest.raises(CheckpointError, match=r"missing \(2\): s2.safetensors, s3.safetensors"):
        ShardedCheckpoint.open(tmp_path)


@pytest.mark.parametrize(
    "shard", ["../evil.safetensors", "/tmp/evil.safetensors", "sub/x.safetensors", "..", ""]
)
def test_index_shard_outside_the_directory(tmp_path: Path, shard: str) -> None:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "sub").mkdir()
    save_file({"a": torch.ones(2)}, tmp_path / "evil.safetensors")  # exists: must still fail
    save_file({"a": torch.ones(2)}, checkpoint / "sub" / "x.safetensors")
    _write_index(checkpoint, {"a": shard})
    with pytest.raises(CheckpointError, match="plain file names"):
        ShardedCheckpoint.open(checkpoint)


def test_tensors_listed_but_absent_are_all_named_in_one_error(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "s.safetensors")
    weight_map = {"a": "s.safetensors"} | {f"w{i:02d}": "s.safetensors" for i in range(30)}
    _write_index(tmp_path, weight_map)
    with pytest.raises(CheckpointError) as err:
        ShardedCheckpoint.open(tmp_path)
    message = str(err.value)
    assert "invalid tensors (30)" in message
    assert "w00 (listed in the index but absent from s.safetensors)" in message
    assert "w19" in message and "w20" not in message
    assert message.endswith("... and 10 more")


@pytest.mark.parametrize(
    "text", ["{not json", '["weight_map"]', '{"weight_map": []}', '{"metadata": {}}', "\xff"]
)
def test_malformed_index(tmp_path: Path, text: str) -> None:
    (tmp_path / INDEX_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match=INDEX_NAME):
        ShardedCheckpoint.open(tmp_path)


def test_index_with_non_string_shard(tmp_path: Path) -> None:
    _write_index(tmp_path, {"a": 3, "b": None})
    with pytest.raises(CheckpointError, match=r"must be strings \(2\): a, b"):
        ShardedCheckpoint.open(tmp_path)


def test_unknown_dtype_in_header_names_tensor_and_dtype(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "good": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "weird": {"dtype": "Q7", "shape": [2], "data_offsets": [8, 10]},
    }
    _write_raw_safetensors(tmp_path / SINGLE_NAME, header, bytes(10))
    with pytest.raises(CheckpointError, match=r"weird \(unknown dtype 'Q7' in model.safetensors\)"):
        ShardedCheckpoint.open(tmp_path)


def test_hand_written_header_is_read(tmp_path: Path) -> None:
    header = {"x": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}
    data = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.bfloat16)
    _write_raw_safetensors(tmp_path / SINGLE_NAME, header, data.view(torch.uint8).numpy().tobytes())
    with ShardedCheckpoint.open(tmp_path) as ckpt:
        assert torch.equal(ckpt.get("x"), data)


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "do not hold 16 bytes"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "do not hold 8 bytes"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
        ({"dtype": "F32", "shape": [2]}, "bad data_offsets"),
    ],
)
def test_inconsistent_header_entries(tmp_path: Path, entry: object, reason: str) -> None:
    _write_raw_safetensors(tmp_path / SINGLE_NAME, {"t": entry}, bytes(8))
    with pytest.raises(CheckpointError, match=reason):
        ShardedCheckpoint.open(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 10**9) + b"{}"])
def test_truncated_or_foreign_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / SINGLE_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        ShardedCheckpoint.open(tmp_path)


def test_shape_and_dtype_do_not_read_tensor_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_sharded(tmp_path, _tensors(), max_shard_bytes=2100)
    opened: list[Path] = []
    real_safe_open = shards.safe_open

    def spy(file: Path, framework: str) -> object:
        opened.append(Path(file))
        return real_safe_open(file, framework=framework)

    monkeypatch.setattr(shards, "safe_open", spy)
    with ShardedCheckpoint.open(tmp_path) as ckpt:
        for name in ckpt.names():
            ckpt.shape(name), ckpt.dtype(name), ckpt.shard_of(name)
        ckpt.total_bytes()
        assert opened == []
        ckpt.get("lm_head.weight")
        ckpt.get("lm_head.weight")
        assert opened == [tmp_path / ckpt.shard_of("lm_head.weight")]  # opened once, lazily


def test_get_is_a_memory_map_of_the_shard(tmp_path: Path) -> None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    write_sharded(tmp_path, {"w": torch.randn(512, 512)}, max_shard_bytes=2**30)
    with ShardedCheckpoint.open(tmp_path) as ckpt:
        ptr = ckpt.get("w").data_ptr()
        mapped = [
            line.split()[-1]
            for line in maps.read_text().splitlines()
            if int(line.split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)
        ]
    assert mapped == [str((tmp_path / SINGLE_NAME).resolve())]


def test_tensors_outlive_close(tmp_path: Path) -> None:
    tensors = _tensors()
    write_sharded(tmp_path, tensors, max_shard_bytes=2100)
    ckpt = ShardedCheckpoint.open(tmp_path)
    got = ckpt.get("lm_head.weight")
    ckpt.close()
    assert torch.equal(got, tensors["lm_head.weight"])


def test_unknown_name_is_a_key_error(tmp_path: Path) -> None:
    write_sharded(tmp_path, {"x": torch.ones(1)}, max_shard_bytes=100)
    with ShardedCheckpoint.open(tmp_path) as ckpt, pytest.raises(KeyError, match="'y'"):
        ckpt.shape("y")
