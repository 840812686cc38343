"""Checks shared by the OpenAI and Anthropic request models: the limits that depend on the
deployment (Limits, the model's context and vocabulary) rather than on the protocol.

Every failure is a 400 naming the offending parameter by its JSON path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gateway import errors
from gateway.config import Limits
from gateway.registry import LocalModel, Model
from k2model.sampling_params import SamplingParams
from k2model.text.messages import ChatFormatError, Message, Tool, validate_messages

UINT64_MASK = (1 << 64) - 1


def check_stop(stop: Sequence[str], limits: Limits, param: str) -> tuple[str, ...]:
    for i, s in enumerate(stop):
        if not s or len(s) > limits.max_stop_chars:
            raise errors.invalid_value(
                f"stop strings must be 1 to {limits.max_stop_chars} characters", f"{param}[{i}]"
            )
    return tuple(stop)


def check_n(n: int, limits: Limits) -> int:
    if n > limits.max_n:
        raise errors.invalid_value(f"n must be at most {limits.max_n} on this server", "n")
    return n


def check_max_tokens(max_tokens: int | None, model: Model, param: str) -> int | None:
    """The prompt takes at least one token, so max_tokens >= context can never fit."""
    if max_tokens is not None and isinstance(model, LocalModel):
        context = model.shape.context_length
        if max_tokens >= context:
            raise errors.context_length_exceeded(
                f"{param} ({max_tokens}) leaves no room for a prompt in this model's "
                f"context of {context} tokens"
            )
    return max_tokens


def check_logit_bias(raw: Mapping[str, float], model: Model) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings); each must be an id of the model."""
    vocab = model.shape.vocab_size if isinstance(model, LocalModel) else None
    out = {}
    for key, value in raw.items():
        if not key.isascii() or not key.isdigit():
            raise errors.invalid_value(
                f"logit_bias keys must be token ids (non-negative integers), got {key!r}",
                "logit_bias",
            )
        token = int(key)
        if vocab is not None and token >= vocab:
            raise errors.invalid_value(
                f"logit_bias token id {token} is outside the vocabulary (size {vocab})",
                "logit_bias",
            )
        out[token] = value
    return out


def seed_to_uint64(seed: int | None) -> int | None:
    """OpenAI seeds are int64; the engine's are uint64. Two's complement keeps it one-to-one."""
    return None if seed is None else seed & UINT64_MASK


def sampling(**kwargs: Any) -> SamplingParams:
    """SamplingParams, with its own range checks turned into 400s naming the field."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise errors.invalid_value(str(e), name if name in kwargs else None) from e


def _depth(schema: Any) -> int:
    if isinstance(schema, dict):
        return 1 + max((_depth(v) for v in schema.values()), default=0)
    if isinstance(schema, list):
        return 1 + max((_depth(v) for v in schema), default=0)
    return 0


def check_tools(tools: Sequence[Tool], limits: Limits, param: str) -> tuple[Tool, ...]:
    """Unique names; parameter schemas bounded in total size and in nesting depth."""
    seen: set[str] = set()
    total = 0
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise errors.invalid_value(f"duplicate tool name {tool.name!r}", f"{param}[{i}]")
        seen.add(tool.name)
        if tool.parameters is None:
            continue
        if _depth(tool.parameters) > limits.max_tool_schema_depth:
            raise errors.invalid_value(
                f"a tool schema may nest at most {limits.max_tool_schema_depth} levels",
                f"{param}[{i}]",
            )
        total += len(json.dumps(tool.parameters, separators=(",", ":")).encode())
        if total > limits.max_tool_schema_bytes:
            raise errors.invalid_value(
                f"tool schemas may total at most {limits.max_tool_schema_bytes} bytes",
                f"{param}[{i}]",
            )
    return tuple(tools)


MODES = ("none", "auto", "required")


def named_choice(name: str, param: str) -> str:
    """The internal tool_choice spells a tool's name and a mode alike, so a tool named like a
    mode cannot be forced by name."""
    if name in MODES:
        raise errors.invalid_value(f"a tool named {name!r} cannot be chosen by name", param)
    return name


def check_tool_choice(choice: str, tools: Sequence[Tool], param: str) -> str:
    """required / a named tool need tools to choose from; a name must be one of them."""
    if choice in ("none", "auto"):
        return choice
    if not tools:
        raise errors.invalid_value(f"tool_choice {choice!r} needs tools", param)
    if choice != "required" and choice not in {t.name for t in tools}:
        raise errors.invalid_value(f"tool_choice names {choice!r}, which is not in tools", param)
    return choice


def check_messages(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    try:
        validate_messages(messages)
    except ChatFormatError as e:
        raise errors.invalid_value(str(e), errors.param_of(str(e))) from e
    return messages
