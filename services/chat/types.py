"""The chat request and its streamed events: what every front door translates into.

The REST handlers (OpenAI chat completions, Anthropic messages, completions) and the gRPC Chat API
all build one `ChatRequest` and consume `ChatEvent`s from the same `ChatService.chat()`, as a
grpc-gateway would; the gateway's ChatService sends it to the tokenizer service
(services.chat.codec on the wire), whose pipeline is the other ChatService. Validation of field
ranges happens before this point (at the edge); this layer assumes a well-formed request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from k2model.sampling_params import SamplingParams
from k2model.text.messages import Message, Tool

ToolChoice = Literal["none", "auto", "required"] | str  # a str other than those = a tool name
TOOL_CHOICE_MODES = ("auto", "none", "required")


@dataclass(frozen=True)
class ResponseFormat:
    """The answer is one JSON value: an object (schema None, OpenAI's json_object) or one valid
    for `schema` (json_schema)."""

    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    n: int = 1
    stop: tuple[str, ...] = ()
    max_tokens: int | None = None  # None: up to the context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    thinking: bool | None = None  # None: the model's default (K2-Thinking reasons, Instruct not)
    request_id: str = ""
    strict_tools: frozenset[str] = frozenset()  # tools whose every call follows its schema
    response_format: ResponseFormat | None = None  # None: text
    keep_reasoning: bool = False  # earlier turns keep their reasoning_content in the prompt
    min_tokens: int = 0  # the turn cannot end before this many tokens
    ignore_eos: bool = False  # the end-of-turn id does not stop generation
    prompt_ids: tuple[int, ...] = ()  # a raw prompt (no chat format; messages then empty)
    echo: bool = False  # each choice's output starts with the prompt's text
    continuous_usage: bool = False  # every event carries the usage so far (vLLM's stream option)


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str = ""  # set on the first delta of a call
    name: str = ""  # set on the first delta of a call
    arguments: str = ""  # a fragment
    error: str = ""  # set when the finished call is invalid


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[tuple[str, float, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ChatEvent:
    """One delta of one choice. The last event of a choice has finish_reason set; the very last
    event of the whole response carries usage (summed over choices), and with continuous_usage
    every event carries the usage so far."""

    choice: int = 0
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls"
    usage: Usage | None = None


class ChatService(Protocol):
    def chat(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        """Stream the response. Raises services.common.errors.ServiceError subclasses
        (InvalidArgument, OutOfRange, ResourceExhausted, Unavailable, NotFound, ...) before the
        first event or mid-stream; cancelling the iteration cancels the work down the pipeline."""
        ...

    async def count_tokens(self, request: ChatRequest) -> int:
        """Prompt tokens the request would use (rendered with its tools)."""
        ...
