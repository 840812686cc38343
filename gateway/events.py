"""What every REST front door does with a ChatService's event stream before framing it.

`settle` holds each tool call back until it is complete and passes only valid ones on, whole:
a call the parser later finds invalid (ToolCallDelta.error) must not be presented as a call, and
a delta already sent cannot be taken back. A call is complete when another call of its choice
begins or the choice finishes. A choice whose calls were all invalid finishes "stop", not
"tool_calls" (there is nothing to call). `collect` folds a settled stream into whole choices
for the non-streaming responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from services.chat.types import ChatEvent, TokenLogprob, ToolCallDelta, Usage


@dataclass
class _PendingCall:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""
    error: str = ""

    def add(self, delta: ToolCallDelta) -> None:
        self.id = self.id or delta.id
        self.name = self.name or delta.name
        self.arguments += delta.arguments
        self.error = self.error or delta.error

    def settled(self, index: int) -> ToolCallDelta | None:
        if self.error or not self.name:
            return None
        return ToolCallDelta(index=index, id=self.id, name=self.name, arguments=self.arguments)


@dataclass
class _ChoiceCalls:
    pending: _PendingCall | None = None
    emitted: int = 0  # valid calls passed on; also the next output index

    def push(self, delta: ToolCallDelta) -> ToolCallDelta | None:
        """Adds a delta; returns the previous call, settled, when this one starts another."""
        flushed = None
        if self.pending is not None and self.pending.index != delta.index:
            flushed = self.flush()
        if self.pending is None:
            self.pending = _PendingCall(delta.index)
        self.pending.add(delta)
        return flushed

    def flush(self) -> ToolCallDelta | None:
        call = self.pending.settled(self.emitted) if self.pending else None
        self.pending = None
        if call is not None:
            self.emitted += 1
        return call


async def settle(events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
    calls: dict[int, _ChoiceCalls] = {}
    async for event in events:
        state = calls.setdefault(event.choice, _ChoiceCalls())
        ready = [c for c in map(state.push, event.tool_calls) if c is not None]
        finish = event.finish_reason
        if finish is not None:
            last = state.flush()
            ready += [last] if last is not None else []
            if finish == "tool_calls" and state.emitted == 0:
                finish = "stop"
        if event.content or event.reasoning or event.logprobs or ready or finish or event.usage:
            yield replace(event, tool_calls=tuple(ready), finish_reason=finish)


@dataclass
class Choice:
    index: int
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"


async def collect(events: AsyncIterator[ChatEvent], n: int) -> tuple[list[Choice], Usage]:
    """Whole choices (index order) and the usage, from a settled event stream."""
    choices = [Choice(i) for i in range(n)]
    usage = Usage(0, 0)
    async for event in events:
        choice = choices[event.choice]
        choice.content += event.content
        choice.reasoning += event.reasoning
        choice.tool_calls += event.tool_calls
        choice.logprobs += event.logprobs
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
        if event.usage is not None:
            usage = event.usage
    return choices, usage
