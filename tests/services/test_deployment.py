"""The deployment description: defaults, the shipped file, and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from k2model import EMBEDDED_CHECKPOINT
from k2model.config import K2Config
from services.common import kv_sizing
from services.common.model_host import DECODE_NICE, cpu_threads, step_priority
from services.deployment import Deployment, DeploymentError

ROOT = Path(__file__).resolve().parents[2]


def load_config() -> K2Config:
    return K2Config.from_dir(EMBEDDED_CHECKPOINT)


def minimal(**extra) -> dict:
    return {
        "tokenizer": [{"port": 1}],
        "prefill": [{"port": 2}, {"port": 3}],
        "decode": [{"port": 4, "kv_blocks": 8}],
        **extra,
    }


def test_shipped_local_deployment() -> None:
    dep = Deployment.load(ROOT / "deploy" / "local.yaml")
    assert dep.checkpoint == EMBEDDED_CHECKPOINT
    assert [i.name for i in dep.of_kind("decode")] == ["decode-0"]
    assert all(i.address == "127.0.0.1" for i in dep.instances)


def test_defaults_and_names() -> None:
    dep = Deployment.from_dict(minimal())
    assert [i.name for i in dep.of_kind("prefill")] == ["prefill-0", "prefill-1"]
    assert (
        dep.instance("decode-0").kv_blocks == 8 and dep.instance("decode-0").target == "127.0.0.1:4"
    )
    assert dep.dtype == "auto" and dep.torch_dtype() is None and dep.chat_format is None


def test_cpu_threads_split_among_model_processes(monkeypatch) -> None:
    dep = Deployment.from_dict(minimal())
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cpu_threads(dep, dep.instance("decode-0")) == 8 // 3  # 2 prefill + 1 decode here
    assert cpu_threads(dep, dep.instance("prefill-0")) == 8 // 2  # the 2 prefill instances
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cpu_threads(dep, dep.instance("decode-0")) == 1  # never less than one
    pinned = Deployment.from_dict(minimal(model={"threads": 3}))
    assert cpu_threads(pinned, pinned.instance("prefill-0")) == 3
    own = Deployment.from_dict(minimal(model={"threads": 3}, decode=[{"port": 4, "threads": 2}]))
    assert cpu_threads(own, own.instance("decode-0")) == 2  # the instance's own setting wins
    assert cpu_threads(own, own.instance("prefill-0")) == 3


def test_decode_steps_yield_to_a_prefill_on_their_host() -> None:
    dep = Deployment.from_dict(
        minimal(
            hosts={"a": "10.0.0.1", "b": "10.0.0.2"},
            tokenizer=[{"port": 1, "host": "a"}],
            prefill=[{"port": 2, "host": "a"}],
            decode=[{"port": 4, "host": "a"}, {"port": 5, "host": "b"}],
        )
    )
    assert step_priority(dep, dep.instance("decode-0")) == DECODE_NICE  # beside prefill-0
    assert step_priority(dep, dep.instance("decode-1")) == 0  # a host of its own
    assert step_priority(dep, dep.instance("prefill-0")) == 0


def test_model_processes_choose_their_device_and_ops() -> None:
    dep = Deployment.from_dict(
        minimal(
            prefill=[{"port": 2, "device": "cuda:1", "ops": "triton"}],
            decode=[{"port": 3, "device": "cpu", "ops": "cpu"}],
        )
    )
    prefill, decode = dep.instance("prefill-0"), dep.instance("decode-0")
    assert (prefill.device, prefill.ops, decode.device, decode.ops) == (
        "cuda:1",
        "triton",
        "cpu",
        "cpu",
    )
    assert (dep.instance("tokenizer-0").device, dep.instance("tokenizer-0").ops) == ("auto", "auto")
    with pytest.raises(DeploymentError, match=r"decode\[0\]\.device: expected auto, cpu, cuda"):
        Deployment.from_dict(minimal(decode=[{"port": 3, "device": "gpu"}]))
    with pytest.raises(DeploymentError, match=r"prefill\[0\]\.ops: expected one of auto, torch"):
        Deployment.from_dict(minimal(prefill=[{"port": 2, "ops": "cuda"}]))
    with pytest.raises(DeploymentError, match=r"tokenizer\[0\]\.device: not a setting"):
        Deployment.from_dict(minimal(tokenizer=[{"port": 1, "device": "cpu"}]))


def test_prefill_and_decode_may_compute_in_their_own_dtype() -> None:
    dep = Deployment.from_dict(
        minimal(model={"dtype": "float32"}, prefill=[{"port": 2, "dtype": "bfloat16"}])
    )
    assert dep.torch_dtype(dep.instance("prefill-0")) == torch.bfloat16
    assert dep.torch_dtype(dep.instance("decode-0")) == torch.float32  # model.dtype
    assert dep.torch_kv_dtype() == torch.float32  # one cache dtype for both: the deployment's
    with pytest.raises(DeploymentError, match=r"prefill\[0\]\.dtype: expected one of auto"):
        Deployment.from_dict(minimal(prefill=[{"port": 2, "dtype": "fp16"}]))
    with pytest.raises(DeploymentError, match=r"tokenizer\[0\]\.dtype: not a setting"):
        Deployment.from_dict(minimal(tokenizer=[{"port": 1, "dtype": "bfloat16"}]))


def test_kv_pools_are_auto_unless_set_and_auto_sizes_from_memory() -> None:
    cfg = load_config()
    per_token = kv_sizing.bytes_per_token(cfg, torch.bfloat16)
    assert per_token == cfg.num_hidden_layers * cfg.kv_cache_dim * 2
    dep = Deployment.from_dict(
        minimal(decode=[{"port": 4}, {"port": 5, "kv_blocks": "auto", "kv_cache_gib": 0.001}])
    )
    auto, capped = dep.instance("decode-0"), dep.instance("decode-1")
    assert auto.kv_blocks is None and dep.kv_dtype == "auto"
    assert dep.torch_kv_dtype() == torch.float32  # the deployment's model dtype (CPU: fp32)
    narrow = Deployment.from_dict(minimal(model={"kv_dtype": "bfloat16"}))
    assert narrow.torch_kv_dtype() == torch.bfloat16
    # 4 KV holders on this host (2 prefill, 2 decode): each gets 0.4 / 4 of what is available.
    small = kv_sizing.kv_blocks(dep, auto, cfg, torch.bfloat16, available=64 * 2**20)
    assert small == int(64 * 2**20 * 0.4 / 4 // (per_token * 16))
    # Plenty of memory: capped at max_running sequences of the whole context.
    big = kv_sizing.kv_blocks(dep, auto, cfg, torch.bfloat16, available=2**40)
    assert big == 64 * cfg.max_position_embeddings // 16
    prefill = kv_sizing.kv_blocks(dep, dep.instance("prefill-0"), cfg, torch.bfloat16, 2**40)
    assert prefill == max(cfg.max_position_embeddings, 4 * 4096) // 16
    assert kv_sizing.kv_blocks(dep, capped, cfg, torch.bfloat16) == int(
        0.001 * 2**30 // (per_token * 16)
    )
    fixed = Deployment.from_dict(minimal())
    assert kv_sizing.kv_blocks(fixed, fixed.instance("decode-0"), cfg, torch.bfloat16) == 8


def test_relative_checkpoint_resolved_against_the_file(tmp_path: Path) -> None:
    file = tmp_path / "d.yaml"
    file.write_text(
        "checkpoint: ckpt\ntokenizer: [{port: 1}]\nprefill: [{port: 2}]\ndecode: [{port: 3}]\n"
    )
    assert Deployment.load(file).checkpoint == tmp_path / "ckpt"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "mapping"),
        (minimal(gateways=[]), "unknown deployment keys"),
        (minimal(decode=[]), "at least one decode"),
        (minimal(prefill=[{"port": 2, "host": "mars"}]), "host 'mars'"),
        (minimal(prefill=[{"name": "x"}]), "port is required"),
        (minimal(prefill=[{"port": 2, "colour": "red"}]), r"prefill\[0\]\.colour: not a setting"),
        (minimal(tokenizer=[{"port": 1, "kv_blocks": 8}]), r"tokenizer\[0\]\.kv_blocks: not a"),
        (minimal(tokenizer=[{"port": 1, "ranks": 2}]), r"tokenizer\[0\]\.ranks"),
        (minimal(prefill=[{"port": 2, "max_running": 9}]), r"prefill\[0\]\.max_running"),
        (minimal(decode=[{"port": 4, "chunk_tokens": 9}]), r"decode\[0\]\.chunk_tokens"),
        (minimal(decode=[{"port": 4, "config": "g.yaml"}]), r"decode\[0\]\.config"),
        (minimal(decode=[{"port": 4, "nodes": []}]), r"decode\[0\]\.nodes"),
        (minimal(decode=[{"port": 4, "kv_blocks": "lots"}]), r"decode\[0\]\.kv_blocks: expected"),
        (minimal(decode=[{"port": 4, "kv_blocks": 8, "kv_cache_gib": 1}]), "sizes an auto pool"),
        (minimal(decode=[{"port": 4, "kv_cache_gib": -1}]), "auto or positive"),
        (minimal(decode=[{"port": 4, "threads": -2}]), "threads >= 0"),
        (minimal(model={"kv_dtype": "int8"}), "model.kv_dtype"),
        (minimal(prefill=[{"port": 4}]), "share an address and port"),
        (minimal(prefill=[{"port": 2, "name": "decode-0"}]), "unique"),
        (minimal(model={"dtype": "int8"}), "model.dtype"),
        (minimal(model={"thread": 2}), "unknown model keys"),
        (minimal(model={"threads": -1}), "model.threads"),
        (minimal(decode=[{"port": 70000}]), "positive"),
    ],
)
def test_bad_deployments(raw, message: str) -> None:
    with pytest.raises(DeploymentError, match=message):
        Deployment.from_dict(raw)


def test_unknown_instance_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DeploymentError, match="no instance named"):
        Deployment.from_dict(minimal()).instance("nope")
    with pytest.raises(DeploymentError):
        Deployment.load(tmp_path / "missing.yaml")
