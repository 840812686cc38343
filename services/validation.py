"""Checks every service applies to a prompt before spending anything on it."""

from __future__ import annotations

from collections.abc import Sequence

from k2model.config import K2Config
from k2model.sampling_params import SamplingParams
from services.common.errors import InvalidArgument, OutOfRange


def check_prompt(prompt: Sequence[int], cfg: K2Config, max_new_tokens: int = 0) -> None:
    """InvalidArgument for empty or out-of-vocabulary prompts; OutOfRange past the context."""
    if not prompt:
        raise InvalidArgument("prompt_ids is empty")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise InvalidArgument(f"prompt_ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    if max_new_tokens < 0:
        raise InvalidArgument("max_new_tokens must be >= 1")
    if len(prompt) + max_new_tokens > cfg.max_position_embeddings:
        raise OutOfRange(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context of {cfg.max_position_embeddings} tokens"
        )


def check_sampling(params: SamplingParams, cfg: K2Config) -> None:
    """InvalidArgument for logit_bias ids outside the vocabulary (SamplingParams cannot know the
    vocabulary; left to the sampler, one such request would fail every row of its batch step)."""
    bad = [t for t, _ in params.logit_bias if t >= cfg.vocab_size]
    if bad:
        raise InvalidArgument(
            f"sampling.logit_bias token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}"
        )
