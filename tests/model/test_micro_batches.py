"""Ping-pong micro-batches (K2Model.forward_interleaved, ModelRunner's split): two halves of a
step in lockstep at the expert hop give the logits and tokens of the unsplit step, and the hops
really interleave (the second half's rows are sent before the first half's are collected)."""

from __future__ import annotations

import torch

from k2model import EMBEDDED_CHECKPOINT, generate_ids, load_model
from k2model.batch import SeqSlice, build_batch
from k2model.moe import LocalExperts
from k2model.runner import ModelRunner


class DeferredExperts:
    """A remote stand-in: `submit` records the hop and computes only when collected."""

    def __init__(self, experts: LocalExperts, layer: int, log: list[str]) -> None:
        self.experts, self.layer, self.log = experts, layer, log

    def __call__(self, x, ids, weights):
        return self.experts(x, ids, weights)

    def submit(self, x, ids, weights):
        tag = f"{self.layer}:{x.shape[0]}"
        self.log.append(f"send {tag}")
        outer = self

        class Pending:
            def result(self):
                outer.log.append(f"collect {tag}")
                return outer.experts(x, ids, weights)

        return Pending()


def flat(prompts: list[list[int]]) -> torch.Tensor:
    return torch.tensor([t for p in prompts for t in p])


def remote_model(log: list[str]):
    model = load_model(EMBEDDED_CHECKPOINT, torch.float32)
    for layer, moe in model.moe_layers().items():
        moe.remote = DeferredExperts(moe.experts, layer, log)
    return model


def test_interleaved_halves_equal_the_whole_step() -> None:
    log: list[str] = []
    model = remote_model(log)
    local = load_model(EMBEDDED_CHECKPOINT, torch.float32)
    assert model.submits_experts and not local.submits_experts
    prompts = [[5, 17, 99, 3], list(range(40, 52)), [7, 8], list(range(300, 309)), [1000, 3]]
    slices, start = [], 0
    for p in prompts:
        slices.append(SeqSlice(0, len(p), list(range(start, start + 4))))
        start += 4
    whole_cache, split_cache = local.new_cache(64, 4), model.new_cache(64, 4)
    meta = build_batch(slices, 4)
    want = local(flat(prompts), meta, whole_cache, "naive")
    parts = [
        (flat(prompts[:2]), build_batch(slices[:2], 4)),
        (flat(prompts[2:]), build_batch(slices[2:], 4)),
    ]
    got = torch.cat(model.forward_interleaved(parts, split_cache, "naive"))
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    kv_err = (split_cache.data - whole_cache.data).abs().max() / whole_cache.data.abs().max()
    assert kv_err.item() < 1e-5  # every layer's latents written to the same slots
    # layer 1's hop: half A sent, half B sent (A's rows still out), then A collected
    rows_a, rows_b = sum(map(len, prompts[:2])), sum(map(len, prompts[2:]))
    assert log[:3] == [f"send 1:{rows_a}", f"send 1:{rows_b}", f"collect 1:{rows_a}"]
    assert len(log) == 2 * 2 * len(model.moe_layers())


def test_a_large_decode_step_is_split_and_tokens_are_unchanged(monkeypatch) -> None:
    log: list[str] = []
    model = remote_model(log)
    local = load_model(EMBEDDED_CHECKPOINT, torch.float32)
    prompts = [[11 + k, 200 + 3 * k, 7] for k in range(18)]
    calls = []
    real = type(model).forward_interleaved
    monkeypatch.setattr(
        type(model),
        "forward_interleaved",
        lambda self, *a, **kw: calls.append(len(a[0])) or real(self, *a, **kw),
    )
    assert generate_ids(model, prompts, 5) == generate_ids(local, prompts, 5)
    assert calls  # 18 sequences >= 2 x MICRO_BATCH_MIN: the decode steps were split
    runner = ModelRunner(model, 64, 4, micro_batch_min=0)
    assert runner.micro_batch_min == 0  # the switch that turns it off
