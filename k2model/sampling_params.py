"""Per-request sampling parameters (validated, frozen) and the per-row view the sampler consumes.

`SamplingParams` is what a request asks for; `SamplingRow` is one row of a batch at one decode
step: the params plus the resolved seed, the step counter, the token history the penalties read
and, for constrained generation (k2model/constraints.py), the mask of ids it may produce.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

MAX_TOP_LOGPROBS = 20
MAX_ABS_PENALTY = 2.0
MAX_ABS_LOGIT_BIAS = 100.0

LogitBias = tuple[tuple[int, float], ...]


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    # Written as `if not ok` around range tests so that NaN (every comparison False) is rejected.
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _freeze_logit_bias(bias: Mapping[int, float] | LogitBias) -> LogitBias:
    items = bias.items() if isinstance(bias, Mapping) else bias
    pairs: dict[int, float] = {}
    for token_id, value in items:
        _check(
            isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0,
            "logit_bias token id",
            "a non-negative int",
            token_id,
        )
        _check(
            -MAX_ABS_LOGIT_BIAS <= value <= MAX_ABS_LOGIT_BIAS,
            f"logit_bias[{token_id}]",
            f"in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]",
            value,
        )
        _check(token_id not in pairs, "logit_bias token id", "unique", token_id)
        pairs[token_id] = float(value)
    return tuple(sorted(pairs.items()))


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler.

    Semantics (the order `sample` applies them in): logit_bias is added to the raw logits;
    repetition_penalty (HF/CTRL) divides positive and multiplies negative logits of every token
    seen in the prompt or the output; presence/frequency penalties (OpenAI) subtract
    `presence * [count > 0] + frequency * count` over OUTPUT tokens only; then temperature, top-k,
    top-p (minimal nucleus with mass >= top_p) and min-p (keep p >= min_p * p_max).
    temperature == 0 means greedy: argmax of the biased/penalised logits, no filtering.

    seed None means "the caller assigns one at admission": the sampler itself only ever sees a
    resolved seed (`SamplingRow.seed`), so a request's draws are reproducible across processes.
    top_logprobs > 0 requires logprobs (as in the OpenAI API).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Accepts a Mapping; always stored as sorted (token_id, bias) pairs so the params stay hashable.
    logit_bias: Mapping[int, float] | LogitBias = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        _check(0.0 <= self.temperature < math.inf, "temperature", ">= 0", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(self.top_k >= 0, "top_k", ">= 0 (0 = off)", self.top_k)
        _check(0.0 <= self.min_p < 1.0, "min_p", "in [0, 1)", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY, name, "in [-2, 2]", value)
        _check(
            0.0 < self.repetition_penalty < math.inf,
            "repetition_penalty",
            "> 0",
            self.repetition_penalty,
        )
        _check(
            0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"in [0, {MAX_TOP_LOGPROBS}]",
            self.top_logprobs,
        )
        _check(
            self.logprobs or self.top_logprobs == 0,
            "top_logprobs",
            "0 unless logprobs is true",
            self.top_logprobs,
        )
        object.__setattr__(self, "logit_bias", _freeze_logit_bias(self.logit_bias))

    def seeded(self) -> tuple[SamplingParams, int]:
        """(these params with the seed resolved, that seed). Resolved once, where a request is
        admitted (generate(), decode, prefill): its own seed, or a fresh draw of 63 bits (an
        int64 on every wire)."""
        if self.seed is not None:
            return self, self.seed
        seed = random.getrandbits(63)
        return replace(self, seed=seed), seed

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """True when bias or a penalty changes the logits before temperature/filtering."""
        return (
            bool(self.logit_bias)
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


@dataclass
class SamplingRow:
    """One batch row at one step. `step` = tokens generated so far for this request, so prefill
    samples step 0; the random draw depends only on (seed, step), never on the batch around it.
    `allowed` (bool [V], None = every id) is a hard mask: disallowed ids are never drawn,
    whatever the other parameters say; it must allow at least one id."""

    params: SamplingParams
    seed: int
    step: int
    prompt_ids: Sequence[int] = field(default_factory=tuple)
    output_ids: Sequence[int] = field(default_factory=tuple)
    allowed: Tensor | None = None
