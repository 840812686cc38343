"""The deployment description: defaults, the shipped file, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from k2model import EMBEDDED_CHECKPOINT
from services.common.model_host import cpu_threads
from services.deployment import Deployment, DeploymentError

ROOT = Path(__file__).resolve().parents[2]


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


def test_cpu_threads_split_among_model_processes() -> None:
    dep = Deployment.from_dict(minimal())
    assert cpu_threads(dep, dep.instance("decode-0")) >= 1
    pinned = Deployment.from_dict(minimal(model={"threads": 3}))
    assert cpu_threads(pinned, pinned.instance("prefill-0")) == 3


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
        (minimal(prefill=[{"port": 2, "colour": "red"}]), "unknown keys"),
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
