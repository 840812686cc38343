"""A whole INT4 model (the embedded one, quantised by `quantize --int4`) computes what its
dequantised twin computes, on every ops backend: prefill over ragged prompts, then paged decode
steps (fp32 compute, relative error < 1e-5), and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from k2model import generate_ids, load_model
from k2model.kernels import cpu_ext
from tests.model.helpers import Runner, rel_err

PROMPTS = {0: [5, 17, 99, 3, 250, 41], 1: list(range(300, 340)), 2: [7]}
BACKENDS = ["torch", "triton"] + (["cpu"] if cpu_ext.available() else [])


def _prefill_then_decode(model, steps: int = 3) -> list[torch.Tensor]:
    """All logits of a ragged prefill, then each decode step's (greedy, absorbed attention)."""
    runner = Runner(model)
    out = [runner.step(PROMPTS, "naive", all_logits=True)]
    last = out[0][torch.tensor([len(p) for p in PROMPTS.values()]).cumsum(0) - 1]
    for _ in range(steps):
        chunks = {seq: [int(t)] for seq, t in enumerate(last.argmax(-1))}
        last = runner.step(chunks, "absorbed")
        out.append(last)
    return out


@pytest.mark.parametrize("ops", BACKENDS)
def test_int4_logits_equal_the_dequantised_twin(int4_embedded, ops, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    int4_path, dense_path = int4_embedded
    int4 = load_model(int4_path, dtype=torch.float32, ops=ops)
    dense = load_model(dense_path, dtype=torch.float32, ops="torch")
    assert int4.ops.name == ops and all(m.experts.int4 for m in int4.moe_layers().values())
    for got, want in zip(_prefill_then_decode(int4), _prefill_then_decode(dense), strict=True):
        assert rel_err(got, want) < 1e-5
    prompts = list(PROMPTS.values())
    assert generate_ids(int4, prompts, 6) == generate_ids(dense, prompts, 6)
