"""A scripted ChatService and a gateway config for unit tests of the REST layer.

`ScriptedChat` is a fake of the pipeline (gateway/pipeline.py): it records each ChatRequest and
answers from a script, so a test states the events the pipeline produced and checks what the
gateway made of them. By default it echoes the last user text, one word per event, on every
choice, and counts tokens as whitespace-separated words.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from gateway.config import GatewayConfig
from gateway.registry import ModelShape
from k2model.text.messages import Message
from services.chat.types import ChatEvent, ChatRequest, Usage

ORDINARY_KEY = "sk-test-ordinary-0001"
ENTERPRISE_KEY = "sk-test-enterprise-0002"
SHAPE = ModelShape(context_length=8192, vocab_size=4096)

Script = Callable[[ChatRequest], Sequence[ChatEvent]]


def text_of(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(getattr(p, "text", "") for p in message.content or ())


def words(request: ChatRequest) -> int:
    return sum(len(text_of(m).split()) for m in request.messages)


def echo(request: ChatRequest) -> list[ChatEvent]:
    last_user = next((m for m in reversed(request.messages) if m.role == "user"), None)
    parts = text_of(last_user).split() if last_user else []
    events = []
    for choice in range(request.n):
        events += [
            ChatEvent(choice=choice, content=(" " if i else "") + w) for i, w in enumerate(parts)
        ]
        events.append(ChatEvent(choice=choice, finish_reason="stop"))
    last = events[-1]
    usage = Usage(words(request), len(parts) * request.n)
    return [*events[:-1], ChatEvent(choice=last.choice, finish_reason="stop", usage=usage)]


@dataclass
class ScriptedChat:
    script: Script = echo
    delay_s: float = 0.0  # before each event
    fail_before: Exception | None = None  # raised before the first event
    fail_after: int | None = None  # raise RuntimeError after this many events
    requests: list[ChatRequest] = field(default_factory=list)
    closed_early: list[str] = field(default_factory=list)  # request ids abandoned mid-stream
    finished: list[str] = field(default_factory=list)

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        self.requests.append(request)
        if self.fail_before is not None:
            raise self.fail_before
        done = False
        try:
            for i, event in enumerate(self.script(request)):
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("decode-7 at 10.0.0.7:50071 crashed: /srv/k2/secret.py")
                await asyncio.sleep(self.delay_s)
                yield event
            done = True
        finally:
            (self.finished if done else self.closed_early).append(request.request_id)

    async def count_tokens(self, request: ChatRequest) -> int:
        self.requests.append(request)
        return words(request)


@dataclass
class Switch:
    """Forwards to `target`, so that one server (started once per test module) serves each
    test's own fake."""

    target: ScriptedChat = field(default_factory=ScriptedChat)

    def chat(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        return self.target.chat(request)

    async def count_tokens(self, request: ChatRequest) -> int:
        return await self.target.count_tokens(request)


def config_dict(**limits: int) -> dict:
    return {
        "keys": [
            {"name": "ordinary", "key": ORDINARY_KEY, "profile": "ordinary"},
            {"name": "enterprise", "key": ENTERPRISE_KEY, "profile": "enterprise"},
        ],
        "profiles": {
            "ordinary": {"models": ["kimi-k2-instruct"], "default_model": "kimi-k2-instruct"},
            "enterprise": {"models": ["*"], "default_model": "kimi-k2-thinking"},
        },
        "registry": {
            "models": [
                {"id": "kimi-k2-instruct", "local": {"thinking": False}},
                {"id": "kimi-k2-thinking", "local": {"thinking": True}},
            ]
        },
        "limits": limits,
    }


def make_config(**limits: int) -> GatewayConfig:
    return GatewayConfig.from_dict(config_dict(**limits), SHAPE)
