"""Where a served model computes, and with which kernels, is the deployment's choice
(`device`, `ops`), checked at start, and reported in Stats.

The Triton backend is served here on CPU tensors under TRITON_INTERPRET=1: the same dispatch,
buffers and cache code a GPU runs, to the same tokens as in-process generate()."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import torch
import yaml

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from tests.e2e.client import decode_stats, generate, prefill_stats
from tests.e2e.suite_fixtures import start_suite, write_deployment

PROMPTS = [[5, 17, 99, 3, 250, 41], list(range(300, 330)), [7]]


def test_triton_ops_served_equal_generate(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    runtime = {"ops": "triton", "device": "cpu"}
    path = write_deployment(tmp_path / "triton.yaml", prefill=runtime, decode=runtime)
    reference = generate_ids(load_model(EMBEDDED_CHECKPOINT, ops="torch"), PROMPTS, 6)
    suite = start_suite(path, names=["prefill-0", "decode-0"])
    try:
        decode = suite.deployment.of_kind("decode")[0].target
        prefill = suite.deployment.of_kind("prefill")[0].target

        async def run():
            return await asyncio.gather(*(generate(decode, p, 6) for p in PROMPTS))

        assert [tokens for tokens, _ in asyncio.run(run())] == reference
        for stats in (asyncio.run(decode_stats(decode)), asyncio.run(prefill_stats(prefill))):
            backend = stats.backend
            assert (backend.device, backend.ops, backend.dtype) == ("cpu", "triton", "float32")
    finally:
        suite.stop()


def _start_alone(tmp_path, runtime: dict, env: dict) -> subprocess.CompletedProcess:
    path = write_deployment(tmp_path / "bad.yaml", decode=runtime)
    name = yaml.safe_load(path.read_text())["decode"][0]["name"]
    return subprocess.run(
        [sys.executable, "-m", "services.decode", "--deployment", str(path), "--name", name],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ({"ops": "triton", "device": "cpu"}, "ops: triton needs a CUDA device"),
        ({"device": "cuda"}, "device 'cuda': this machine has 0 CUDA device(s)"),
    ],
)
def test_a_runtime_that_cannot_be_had_fails_the_start_in_one_line(
    tmp_path, runtime, message
) -> None:
    if runtime.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = _start_alone(tmp_path, runtime, env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot start: decode-0: {message}" in done.stderr
    assert "Traceback" not in done.stderr
