"""Batched sampling: a pure function from logits [B, V] and per-row parameters to tokens.

Pipeline per row (all in fp32): constraint mask (disallowed ids to -inf, before anything else)
-> logit_bias -> repetition penalty -> presence/frequency penalties -> (greedy rows: argmax here)
-> temperature -> top-k -> top-p -> min-p -> random draw. Every later stage keeps -inf at -inf,
so the mask is hard for greedy and sampled rows alike.

Randomness is per request, not per batch: a sampled row's draw is the exponential race
argmax(p / E) with E ~ Exp(1)^V from a generator seeded with `noise_seed(seed, step)`, so the
token depends only on (row logits, params, seed, step) - never on the other rows, the row's
position, or which process samples (prefill samples step 0, decode workers the later steps, and no
RNG state travels between them). Caveat: torch's CPU and CUDA generators give different streams,
so workers that must agree must sample on the same device type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from k2model.sampled import Sampled
from k2model.sampling_params import SamplingParams, SamplingRow

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def noise_seed(seed: int, step: int) -> int:
    """The `step`-th output (0-based) of a SplitMix64 stream started at `seed` (mod 2**64).

    SplitMix64 (Steele, Lea, Flood 2014; Vigna's reference C) adds the golden gamma to its state
    and runs the state through a 64-bit finaliser; indexing the stream by step makes it stateless.
    """
    z = (seed + (step + 1) * _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(frozen=True)
class SampleResult:
    """Sampled tokens and (when any row asked) logprobs of the RAW model logits, as vLLM reports
    by default: penalties, bias and temperature change what is drawn, not the reported logprob.

    top_ids / top_logprobs are [B, K] with K = the largest top_logprobs among rows that asked for
    logprobs (0 when none), sorted by descending logprob; a row that asked for n < K uses the
    first n columns. `logprobs` is None when no row in the batch asked for logprobs.
    """

    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] fp32
    top_ids: Tensor  # [B, K] int64
    top_logprobs: Tensor  # [B, K] fp32
    wants_logprobs: tuple[bool, ...]  # per row: did it ask for logprobs
    top_counts: tuple[int, ...]  # per row: how many top entries it asked for

    def row(self, i: int) -> Sampled:
        token = int(self.token_ids[i])
        if not self.wants_logprobs[i] or self.logprobs is None:
            return Sampled(token)
        n = self.top_counts[i]
        top = tuple(
            zip(self.top_ids[i, :n].tolist(), self.top_logprobs[i, :n].tolist(), strict=True)
        )
        return Sampled(token, float(self.logprobs[i]), top)

    def cpu(self) -> SampleResult:
        """A copy on the host: call once before reading many rows, to sync once."""
        return SampleResult(
            token_ids=self.token_ids.cpu(),
            logprobs=None if self.logprobs is None else self.logprobs.cpu(),
            top_ids=self.top_ids.cpu(),
            top_logprobs=self.top_logprobs.cpu(),
            wants_logprobs=self.wants_logprobs,
            top_counts=self.top_counts,
        )


def sample(logits: Tensor, rows: Sequence[SamplingRow]) -> SampleResult:
    """Sample one token per row of `logits` [B, V] (bf16 or fp32; computed in fp32)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
    params = [r.params for r in rows]
    allowed = _apply_masks(logits, rows)
    if all(p.is_greedy and not p.adjusts_logits for p in params):
        # Fast path: no [B, V] penalty/count tensors; argmax is exact on bf16 as well.
        token_ids = allowed.argmax(dim=-1)
    else:
        x = adjust_logits(allowed, rows)
        token_ids = x.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            token_ids[index] = _draw(x[index], [rows[i] for i in sampled])
    return _with_logprobs(logits, token_ids, params)


def _apply_masks(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """`logits` with each masked row's disallowed ids at -inf (a copy; `logits` itself when no row
    has a mask). Logprobs are still reported from the raw logits."""
    masked = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not masked:
        return logits
    x = logits.clone()
    for i in masked:
        mask = rows[i].allowed
        assert mask is not None
        if mask.shape != (logits.shape[-1],):
            raise ValueError(f"row {i}: mask shape {tuple(mask.shape)} != ({logits.shape[-1]},)")
        x[i].masked_fill_(~mask.to(x.device), float("-inf"))
    return x


def adjust_logits(logits: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """fp32 copy of `logits` with logit_bias, then repetition, presence and frequency penalties."""
    x = logits.to(torch.float32, copy=True)
    _add_logit_bias(x, rows)
    _apply_repetition_penalty(x, rows)
    _apply_presence_frequency_penalties(x, rows)
    return x


def filter_logits(x: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Temperature-scaled logits [N, V] with tokens outside top-k, then outside the top-p nucleus,
    then below min-p set to -inf. Top-k keeps ties with the k-th value; top-p keeps the minimal
    prefix (stable descending order) whose probability mass reaches top_p."""
    vocab = x.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if any(k < vocab for k in ks) or any(p < 1.0 for p in top_ps):
        x = _top_k_top_p(x, ks, top_ps)
    if any(p.min_p > 0.0 for p in params):
        x = _min_p(x, [p.min_p for p in params])
    return x


def _top_k_top_p(x: Tensor, ks: list[int], top_ps: list[float]) -> Tensor:
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)  # [N, V]
    k = torch.tensor(ks, device=x.device).unsqueeze(1)  # [N, 1]
    kth_value = sorted_x.gather(1, k - 1)  # [N, 1]
    sorted_x = sorted_x.masked_fill(sorted_x < kth_value, float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly higher-ranked tokens
    top_p = torch.tensor(top_ps, device=x.device).unsqueeze(1)  # [N, 1]
    outside = (mass_before >= top_p) & (top_p < 1.0)  # top_p == 1 keeps all despite rounding
    sorted_x = sorted_x.masked_fill(outside, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _min_p(x: Tensor, min_ps: list[float]) -> Tensor:
    # p_i >= min_p * p_max  <=>  x_i - x_max >= log(min_p): ratios survive renormalisation.
    probs = x.softmax(dim=-1)
    threshold = torch.tensor(min_ps, device=x.device).unsqueeze(1) * probs.amax(-1, keepdim=True)
    return x.masked_fill(probs < threshold, float("-inf"))


def _draw(x: Tensor, rows: Sequence[SamplingRow]) -> Tensor:
    """Exponential race on the filtered distribution: argmax(p / E) ~ Categorical(p)."""
    params = [r.params for r in rows]
    temperature = torch.tensor([p.temperature for p in params], device=x.device).unsqueeze(1)
    probs = filter_logits(x / temperature, params).softmax(dim=-1)
    return (probs / _exponential_noise(rows, x.shape[-1], x.device)).argmax(dim=-1)


def _exponential_noise(rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> Tensor:
    noise = torch.empty(len(rows), vocab, device=device)
    for i, r in enumerate(rows):  # the only per-row loop: each row owns its generator
        generator = torch.Generator(device=device)
        generator.manual_seed(noise_seed(r.seed, r.step))
        noise[i].exponential_(generator=generator)
    # E == 0 would turn filtered tokens (p == 0) into 0/0 = NaN, which argmax would pick.
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def _row_token_index(
    ids_per_row: Sequence[Sequence[int]], device: torch.device
) -> tuple[Tensor, Tensor]:
    """(row index, token id) pairs for every listed token, for indexing into [B, V]."""
    lengths = [len(ids) for ids in ids_per_row]
    # np.fromiter is ~3x faster than torch.tensor(list) for the long prompt histories.
    flat = np.fromiter(chain.from_iterable(ids_per_row), dtype=np.int64, count=sum(lengths))
    row_index = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return row_index.to(device), torch.from_numpy(flat).to(device)


def _per_row(values: list[float], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # [B, 1]


def _add_logit_bias(x: Tensor, rows: Sequence[SamplingRow]) -> None:
    triples = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
    if not triples:
        return
    row_index, token_ids, bias = zip(*triples, strict=True)
    if max(token_ids) >= x.shape[-1]:
        raise ValueError(f"logit_bias token id {max(token_ids)} >= vocab size {x.shape[-1]}")
    index = (torch.tensor(row_index, device=x.device), torch.tensor(token_ids, device=x.device))
    x.index_put_(index, torch.tensor(bias, dtype=torch.float32, device=x.device), accumulate=True)


def _apply_repetition_penalty(x: Tensor, rows: Sequence[SamplingRow]) -> None:
    penalised = [r.params.repetition_penalty != 1.0 for r in rows]
    if not any(penalised):
        return
    seen = torch.zeros_like(x, dtype=torch.bool)
    prompts = [r.prompt_ids if p else () for r, p in zip(rows, penalised, strict=True)]
    outputs = [r.output_ids if p else () for r, p in zip(rows, penalised, strict=True)]
    for ids in (prompts, outputs):
        seen[_row_token_index(ids, x.device)] = True
    penalty = _per_row([r.params.repetition_penalty for r in rows], x.device)
    x.copy_(torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x))


def _apply_presence_frequency_penalties(x: Tensor, rows: Sequence[SamplingRow]) -> None:
    penalised = [
        r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0 for r in rows
    ]
    if not any(penalised):
        return
    output_ids = [r.output_ids if p else () for r, p in zip(rows, penalised, strict=True)]
    index = _row_token_index(output_ids, x.device)
    counts = torch.zeros_like(x)
    counts.index_put_(index, torch.ones(index[0].numel(), device=x.device), accumulate=True)
    frequency = _per_row([r.params.frequency_penalty for r in rows], x.device)
    presence = _per_row([r.params.presence_penalty for r in rows], x.device)
    x.sub_(frequency * counts + presence * (counts > 0))


def _with_logprobs(
    logits: Tensor, token_ids: Tensor, params: Sequence[SamplingParams]
) -> SampleResult:
    wants = tuple(p.logprobs for p in params)
    counts = tuple(p.top_logprobs if p.logprobs else 0 for p in params)
    k = max(counts, default=0)
    batch, device = logits.shape[0], logits.device
    chosen: Tensor | None = None
    top_logprobs = torch.empty(batch, 0, dtype=torch.float32, device=device)
    top_ids = torch.empty(batch, 0, dtype=torch.int64, device=device)
    if any(wants):
        logp = logits.float().log_softmax(dim=-1)  # [B, V] of the raw logits
        chosen = logp.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        if k > 0:
            top_logprobs, top_ids = logp.topk(k, dim=-1)
    return SampleResult(token_ids, chosen, top_ids, top_logprobs, wants, counts)
