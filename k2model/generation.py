"""In-process batched generation: the reference every served path is checked against.

All prompts are prefilled in one batch (naive MLA), then every unfinished sequence decodes one token
per step in one batch (absorbed MLA over the paged cache). Tokens stream out step by step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from k2model.block_allocator import BlockAllocator, blocks_needed
from k2model.mla import AttentionForm
from k2model.model import K2Model
from k2model.runner import ModelRunner, StepInput
from k2model.sampling_params import SamplingParams, SamplingRow

GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_new_tokens: int
    params: SamplingParams = GREEDY
    stop_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class TokenEvent:
    request: int  # index into the requests given to generate()
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop id), "length", or None while running


def check_request(req: GenerationRequest, vocab_size: int, max_positions: int) -> None:
    """ValueError for an empty prompt, out-of-vocabulary ids or a context overflow."""
    if not req.prompt_ids:
        raise ValueError("prompt is empty")
    bad = [t for t in req.prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if req.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if len(req.prompt_ids) + req.max_new_tokens > max_positions:
        raise ValueError(
            f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) "
            f"exceeds the context of {max_positions}"
        )


@dataclass
class _Seq:
    prompt: list[int]
    req: GenerationRequest
    seed: int
    blocks: list[int]
    out: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)

    def row(self) -> SamplingRow:
        return SamplingRow(self.req.params, self.seed, len(self.out), self.prompt, self.out)


def generate(
    model: K2Model,
    requests: Sequence[GenerationRequest],
    block_size: int = 16,
    kv_dtype: torch.dtype | None = None,
) -> Iterator[list[TokenEvent]]:
    """Yield, per step, one TokenEvent for every sequence still running. kv_dtype: the cache's
    storage dtype (None: the model's)."""
    cfg = model.cfg
    for req in requests:
        check_request(req, cfg.vocab_size, cfg.max_position_embeddings)
    need = [blocks_needed(len(r.prompt_ids) + r.max_new_tokens, block_size) for r in requests]
    alloc = BlockAllocator(sum(need))
    runner = ModelRunner(model, alloc.num_blocks, block_size, kv_dtype)
    seqs = [
        _Seq(list(r.prompt_ids), r, r.params.seeded()[1], alloc.allocate(n))
        for r, n in zip(requests, need, strict=True)
    ]
    running = list(range(len(seqs)))
    inputs = [StepInput(s.prompt, 0, s.blocks, s.row()) for s in seqs]
    form: AttentionForm = "naive"
    while running:
        sampled = runner.step(inputs, form)
        events, still = [], []
        for i, result in zip(running, sampled, strict=True):
            assert result is not None  # every input has a row
            s = seqs[i]
            s.out.append(result.token_id)
            reason = _finish_reason(s, result.token_id)
            events.append(TokenEvent(i, result.token_id, result.logprob, list(result.top), reason))
            if reason is None:
                still.append(i)
        yield events
        running, form = still, "absorbed"
        inputs = [
            StepInput([seqs[i].out[-1]], seqs[i].length - 1, seqs[i].blocks, seqs[i].row())
            for i in running
        ]


def _finish_reason(s: _Seq, token: int) -> str | None:
    if token in s.req.stop_ids:
        return "stop"
    if len(s.out) >= s.req.max_new_tokens:
        return "length"
    return None


def generate_ids(
    model: K2Model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams = GREEDY,
    stop_ids: frozenset[int] = frozenset(),
) -> list[list[int]]:
    """Convenience: run generate() to the end and return each prompt's new token ids."""
    reqs = [GenerationRequest(p, max_new_tokens, params, stop_ids) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for events in generate(model, reqs):
        for e in events:
            out[e.request].append(e.token_id)
    return out
