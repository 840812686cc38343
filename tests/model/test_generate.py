"""generate(): batched streaming equals token-by-token full recompute, and stops where it should."""

from __future__ import annotations

import pytest
import torch

from k2model.generation import GenerationRequest, generate, generate_ids
from k2model.model import K2Model
from k2model.sampling_params import SamplingParams
from tests.model.helpers import Runner

PROMPTS = [[3, 4, 5], [100, 200, 300, 400, 7, 8], [9]]


def greedy_by_recompute(model: K2Model, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        logits = Runner(model).step({0: seq}, "naive")
        seq.append(int(logits[0].argmax()))
    return seq[len(prompt) :]


def test_greedy_batch_equals_full_recompute(tiny_fp32: K2Model) -> None:
    out = generate_ids(tiny_fp32, PROMPTS, max_new_tokens=6)
    for prompt, got in zip(PROMPTS, out, strict=True):
        assert got == greedy_by_recompute(tiny_fp32, prompt, 6)


def test_streaming_events_and_finish_reasons(tiny_fp32: K2Model) -> None:
    first = generate_ids(tiny_fp32, [PROMPTS[1]], max_new_tokens=5)[0]
    stop = first[2]
    reqs = [
        GenerationRequest(PROMPTS[1], 5, stop_ids=frozenset({stop})),
        GenerationRequest(PROMPTS[0], 4),
    ]
    steps = list(generate(tiny_fp32, reqs))
    assert [len(s) for s in steps] == [2, 2, 2, 1]  # request 0 stops after 3 tokens
    ended = {e.request: e for s in steps for e in s if e.finish_reason}
    assert ended[0].finish_reason == "stop" and ended[0].token_id == stop
    assert ended[1].finish_reason == "length"
    assert [e.token_id for s in steps for e in s if e.request == 0] == first[:3]


def test_seeded_sampling_reproducible_and_batch_independent(tiny_fp32: K2Model) -> None:
    params = SamplingParams(temperature=1.0, seed=1234, logprobs=True, top_logprobs=3)
    alone = generate_ids(tiny_fp32, [PROMPTS[1]], 8, params)[0]
    mixed = generate_ids(tiny_fp32, [PROMPTS[0], PROMPTS[1]], 8, params)[1]
    assert alone == mixed
    other = generate_ids(tiny_fp32, [PROMPTS[1]], 8, SamplingParams(temperature=1.0, seed=99))[0]
    assert other != alone


def test_logprobs_reported(tiny_fp32: K2Model) -> None:
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2)
    events = [e for s in generate(tiny_fp32, [GenerationRequest(PROMPTS[0], 3, params)]) for e in s]
    for e in events:
        assert e.logprob is not None and e.logprob <= 0
        assert e.top_logprobs[0][0] == e.token_id and len(e.top_logprobs) == 2


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (GenerationRequest([], 3), "empty"),
        (GenerationRequest([1, 10**6], 3), "outside the vocabulary"),
        (GenerationRequest([-1], 3), "outside the vocabulary"),
        (GenerationRequest([1], 0), "max_new_tokens"),
        (GenerationRequest([1], 10**9), "exceeds the context"),
    ],
)
def test_bad_requests(tiny_fp32: K2Model, req: GenerationRequest, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        next(generate(tiny_fp32, [req]))


def test_bf16_model_generates(tiny_ckpt) -> None:
    from k2model.checkpoint.loader import load_model

    model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    out = generate_ids(model, PROMPTS, 4)
    assert all(len(o) == 4 for o in out)
