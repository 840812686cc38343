"""A ChatService for an upstream OpenAI-compatible provider (Moonshot's API, OpenRouter, another
k2serve gateway), proxied with httpx.

Every front door (chat completions, completions, /v1/messages) works with an upstream model the
same way as with a local one: the ChatRequest goes out as an OpenAI chat request, always
streamed (with usage), and the provider's chunks come back as ChatEvents. Its errors map to the
service errors the gateway already renders: a 4xx about the request stays a 400, rate limits a
429, anything about the provider itself (down, bad credentials, 5xx) a 503. Closing the event
iterator closes the upstream connection.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway.registry import UpstreamModel
from k2model.text.messages import message_to_dict
from services.chat.types import ChatEvent, ChatRequest, TokenLogprob, ToolCallDelta, Usage
from services.common import errors as svc


def chat_body(request: ChatRequest, upstream_model: str) -> dict[str, Any]:
    """The OpenAI chat request for a ChatRequest (only fields the OpenAI schema has)."""
    s = request.sampling
    if s.top_k or s.min_p or s.repetition_penalty != 1.0 or request.thinking is not None:
        raise svc.InvalidArgument(
            "top_k, min_p, repetition_penalty and thinking are not offered by upstream models"
        )
    if request.min_tokens or request.ignore_eos or request.keep_reasoning:
        raise svc.InvalidArgument(
            "min_tokens, ignore_eos and thinking.keep are not offered by upstream models"
        )
    if request.prompt_ids or request.echo:
        raise svc.InvalidArgument("token-id prompts and echo are not offered by upstream models")
    messages = [
        {**message_to_dict(m), **({"partial": True} if m.partial else {})} for m in request.messages
    ]
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": request.n,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
    optional = {
        "stop": list(request.stop) or None,
        "max_tokens": request.max_tokens,
        "logit_bias": {str(t): b for t, b in s.logit_bias} or None,
        "seed": None if s.seed is None else _int64(s.seed),
        "logprobs": s.logprobs or None,
        "top_logprobs": s.top_logprobs or None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if request.tools:
        body["tools"] = [_tool(t.to_dict(), t.name in request.strict_tools) for t in request.tools]
        body["parallel_tool_calls"] = request.parallel_tool_calls
        choice = request.tool_choice
        named = choice not in ("none", "auto", "required")
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice}} if named else choice
        )
    if request.response_format is not None:
        schema = request.response_format.schema
        body["response_format"] = (
            {"type": "json_object"}
            if schema is None
            else {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        )
    return body


def _tool(declared: dict[str, Any], strict: bool) -> dict[str, Any]:
    if strict:
        declared["function"]["strict"] = True
    return declared


def _int64(seed: int) -> int:
    """Back from the engine's uint64 to OpenAI's int64 (inverse of request_checks.seed_to_uint64)."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _error(status: int, body: bytes) -> svc.ServiceError:
    try:
        detail = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = body[:200].decode("utf-8", "replace")
    message = f"upstream provider: {detail}"
    if status == 429:
        return svc.ResourceExhausted(message)
    if status in (400, 413, 422):
        return svc.InvalidArgument(message)
    return svc.Unavailable(f"upstream provider answered {status}")


def _logprobs(raw: Any) -> tuple[TokenLogprob, ...]:
    content = (raw or {}).get("content") or []
    return tuple(
        TokenLogprob(
            t["token"],
            t["logprob"],
            tuple(t.get("bytes") or ()),
            tuple(
                (x["token"], x["logprob"], tuple(x.get("bytes") or ()))
                for x in t.get("top_logprobs") or ()
            ),
        )
        for t in content
    )


def _events(chunk: dict[str, Any]) -> list[ChatEvent]:
    if "error" in chunk:
        raise _error(502, json.dumps(chunk).encode())
    out = []
    for c in chunk.get("choices") or ():
        d = c.get("delta") or {}
        calls = tuple(
            ToolCallDelta(
                index=t.get("index", 0),
                id=t.get("id") or "",
                name=(t.get("function") or {}).get("name") or "",
                arguments=(t.get("function") or {}).get("arguments") or "",
            )
            for t in d.get("tool_calls") or ()
        )
        out.append(
            ChatEvent(
                choice=c.get("index", 0),
                content=d.get("content") or "",
                reasoning=d.get("reasoning_content") or d.get("reasoning") or "",
                tool_calls=calls,
                logprobs=_logprobs(c.get("logprobs")),
                finish_reason=c.get("finish_reason"),
            )
        )
    # OpenAI sends usage in a last chunk of its own; Moonshot inside the finishing choice.
    usage = chunk.get("usage") or next(
        (c["usage"] for c in chunk.get("choices") or () if c.get("usage")), None
    )
    if usage:
        out.append(ChatEvent(usage=Usage(usage["prompt_tokens"], usage["completion_tokens"])))
    return out


def _json(payload: str) -> dict[str, Any]:
    try:
        chunk = json.loads(payload)
    except ValueError as e:
        raise svc.Unavailable("upstream provider sent a malformed stream") from e
    if not isinstance(chunk, dict):
        raise svc.Unavailable("upstream provider sent a malformed stream")
    return chunk


class UpstreamChatService:
    def __init__(self, model: UpstreamModel, client: httpx.AsyncClient) -> None:
        self.model = model
        self.client = client

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.model.api_key_env, "")
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        body = chat_body(request, self.model.model)
        url = f"{self.model.base_url}/chat/completions"
        try:
            async with self.client.stream(
                "POST", url, json=body, headers=self._headers()
            ) as response:
                if response.status_code != 200:
                    raise _error(response.status_code, await response.aread())
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    for event in _events(_json(payload)):
                        yield event
        except httpx.HTTPError as e:
            raise svc.Unavailable(f"upstream provider unreachable ({type(e).__name__})") from e

    async def count_tokens(self, request: ChatRequest) -> int:
        """Moonshot's estimate-token-count; providers without it answer 503."""
        body = chat_body(request, self.model.model)
        url = f"{self.model.base_url}/tokenizers/estimate-token-count"
        try:
            response = await self.client.post(url, json=body, headers=self._headers())
        except httpx.HTTPError as e:
            raise svc.Unavailable(f"upstream provider unreachable ({type(e).__name__})") from e
        if response.status_code != 200:
            raise _error(response.status_code, response.content)
        return int(response.json()["data"]["total_tokens"])
