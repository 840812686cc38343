"""OpenAI response bodies and SSE chunks, built from settled ChatEvents / collected Choices.

Shapes follow OpenAI's API reference: `chat.completion` / `chat.completion.chunk` (the first
chunk of a choice carries `role`, its finish arrives in a chunk with an empty delta; with
`stream_options.include_usage` every chunk has `usage: null` and one last chunk has no choices
and the usage) and `text_completion` (legacy logprobs: tokens, token_logprobs, top_logprobs,
text_offset). `reasoning_content` is Moonshot's field for K2-Thinking's reasoning. A failure
mid-stream is one `data: {"error": ...}` frame, then `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gateway import errors
from gateway.events import Choice
from gateway.sse import DONE, data_frame
from services.chat.types import ChatEvent, TokenLogprob, ToolCallDelta, Usage


@dataclass(frozen=True)
class Envelope:
    """The fields every object of one response repeats."""

    object: str
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, object: str, model: str, prefix: str) -> Envelope:
        return cls(object, model, f"{prefix}-{uuid.uuid4().hex}")

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _token_logprob(t: TokenLogprob) -> dict[str, Any]:
    top = [{"token": s, "logprob": lp, "bytes": list(b)} for s, lp, b in t.top]
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes), "top_logprobs": top}


def chat_logprobs(tokens: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {"content": [_token_logprob(t) for t in tokens], "refusal": None}


def _tool_call(call: ToolCallDelta, with_index: bool) -> dict[str, Any]:
    out = {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return {"index": call.index, **out} if with_index else out


def chat_completion(
    env: Envelope, choices: list[Choice], usage: Usage, logprobs: bool
) -> dict[str, Any]:
    return env.body([_chat_choice(c, logprobs) for c in choices], usage=usage_body(usage))


def _chat_choice(c: Choice, logprobs: bool) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": c.content if c.content or not c.tool_calls else None,
    }
    if c.reasoning:
        message["reasoning_content"] = c.reasoning
    if c.tool_calls:
        message["tool_calls"] = [_tool_call(t, with_index=False) for t in c.tool_calls]
    return {
        "index": c.index,
        "message": message,
        "logprobs": chat_logprobs(c.logprobs) if logprobs else None,
        "finish_reason": c.finish_reason,
    }


def _chunk_usage(include_usage: bool, continuous: bool, usage: Usage | None) -> dict[str, Any]:
    """The usage field of a chunk with choices: the usage so far with vLLM's
    continuous_usage_stats, null with include_usage alone (OpenAI), else absent."""
    if continuous:
        return {"usage": usage_body(usage or Usage(0, 0))}
    return {"usage": None} if include_usage else {}


async def chat_chunks(
    env: Envelope,
    events: AsyncIterator[ChatEvent],
    include_usage: bool,
    logprobs: bool,
    continuous: bool = False,
) -> AsyncIterator[bytes]:
    usage = Usage(0, 0)

    def chunk(
        index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None
    ) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return data_frame(env.body([choice], **_chunk_usage(include_usage, continuous, usage)))

    started: set[int] = set()
    try:
        async for e in events:
            usage = e.usage or usage
            if e.choice not in started:
                started.add(e.choice)
                yield chunk(e.choice, {"role": "assistant", "content": ""})
            delta: dict[str, Any] = {}
            if e.reasoning:
                delta["reasoning_content"] = e.reasoning
            if e.content:
                delta["content"] = e.content
            if e.tool_calls:
                delta["tool_calls"] = [_tool_call(t, with_index=True) for t in e.tool_calls]
            if delta or (logprobs and e.logprobs):
                yield chunk(e.choice, delta, lp=chat_logprobs(e.logprobs) if logprobs else None)
            if e.finish_reason is not None:
                yield chunk(e.choice, {}, e.finish_reason)
        if include_usage:
            yield data_frame(env.body([], usage=usage_body(usage)))
    except Exception as exc:
        yield data_frame(errors.from_exception(exc).openai_body())
    yield DONE


def completion_logprobs(
    tokens: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int
) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{s: lp for s, lp, _ in t.top} for t in tokens],
        "text_offset": offsets,
    }


def completion(
    env: Envelope, choices: list[Choice], usage: Usage, logprobs: bool
) -> dict[str, Any]:
    body = [
        {
            "text": c.content,
            "index": c.index,
            "logprobs": completion_logprobs(c.logprobs, 0) if logprobs else None,
            "finish_reason": c.finish_reason,
        }
        for c in choices
    ]
    return env.body(body, usage=usage_body(usage))


async def completion_chunks(
    env: Envelope,
    events: AsyncIterator[ChatEvent],
    include_usage: bool,
    logprobs: bool,
    continuous: bool = False,
) -> AsyncIterator[bytes]:
    offsets: dict[int, int] = {}
    usage = Usage(0, 0)
    try:
        async for e in events:
            usage = e.usage or usage
            # An event may carry only logprobs: tokens whose text is held back (an incomplete
            # UTF-8 character, a possible stop string) still get their entries now.
            if e.content or e.finish_reason is not None or (logprobs and e.logprobs):
                offset = offsets.get(e.choice, 0)
                lp = completion_logprobs(e.logprobs, offset) if logprobs else None
                offsets[e.choice] = offset + len(e.content)
                choice = {
                    "text": e.content,
                    "index": e.choice,
                    "logprobs": lp,
                    "finish_reason": e.finish_reason,
                }
                yield data_frame(
                    env.body([choice], **_chunk_usage(include_usage, continuous, usage))
                )
        if include_usage:
            yield data_frame(env.body([], usage=usage_body(usage)))
    except Exception as exc:
        yield data_frame(errors.from_exception(exc).openai_body())
    yield DONE
