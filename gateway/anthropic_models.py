"""Request bodies of Anthropic's /v1/messages and /v1/messages/count_tokens, converting
themselves to the internal `ChatRequest`.

Mapping onto the OpenAI-style conversation K2's chat format renders:
- `system` -> a system message; text blocks -> content parts; `thinking` blocks of an assistant
  turn -> its reasoning_content; `tool_use` -> a tool call (input as JSON text);
  `tool_result` -> a tool message answering that call (`is_error` prefixes the text "Error: ").
- A final assistant message is Anthropic's "prefill": the reply continues it, which is exactly
  Moonshot's partial mode, so it becomes a partial message.
- tool_choice auto/any/tool/none -> auto/required/<name>/none; disable_parallel_tool_use ->
  parallel_tool_calls=false; thinking enabled/disabled -> Thinking on/off (budget_tokens is
  advisory in Anthropic's API too: the reply is bounded by max_tokens).
- tools with `strict: true` and `output_format` json_schema (structured outputs) are constrained
  as on the OpenAI routes (k2model/constraint_grammar.py).
- temperature is scaled by 0.6, as Moonshot's Anthropic-compatible endpoint does (Anthropic's
  default 1.0 becomes K2's recommended 0.6).
Cache-control hints and metadata are accepted: they change nothing in the output.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import Field

from gateway import request_checks as checks
from gateway.config import Limits
from gateway.openai_models import MAX_STOP, MAX_TOOLS, TOOL_NAME, PositiveInt, Strict
from gateway.registry import Model
from k2model.text.messages import Message, TextPart, Tool, ToolCall
from services.chat.types import ChatRequest, ResponseFormat

TEMPERATURE_SCALE = 0.6


class TextBlock(Strict):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        body = (
            self.content
            if isinstance(self.content, str)
            else "".join(b.text for b in self.content or ())
        )
        return f"Error: {body}" if self.is_error else body


Block = Annotated[
    TextBlock | ThinkingBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")
]


class AnthropicMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block], Field(min_length=1)]

    def to_messages(self, last: bool) -> list[Message]:
        if isinstance(self.content, str):
            return [Message(self.role, self.content, partial=last and self.role == "assistant")]
        if self.role == "assistant":
            return [self._assistant(last)]
        tools = [
            Message("tool", b.text(), tool_call_id=b.tool_use_id)
            for b in self.content
            if isinstance(b, ToolResultBlock)
        ]
        texts = tuple(TextPart(b.text) for b in self.content if isinstance(b, TextBlock))
        return tools + ([Message("user", texts)] if texts else [])

    def _assistant(self, last: bool) -> Message:
        blocks = self.content if isinstance(self.content, list) else []
        texts = tuple(TextPart(b.text) for b in blocks if isinstance(b, TextBlock))
        reasoning = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
        calls = tuple(
            ToolCall(b.id, b.name, json.dumps(b.input, ensure_ascii=False))
            for b in blocks
            if isinstance(b, ToolUseBlock)
        )
        return Message(
            "assistant",
            texts or None,
            tool_calls=calls,
            reasoning_content=reasoning or None,
            partial=last and not calls,
        )


class AnthropicTool(Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None  # structured outputs: every call's input follows input_schema


class OutputFormat(Strict):
    """Anthropic's structured outputs: the answer is JSON valid for `schema`."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class AnthropicToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, pattern=TOOL_NAME)
    disable_parallel_tool_use: bool | None = None

    def internal(self) -> str:
        if self.type == "tool":
            return checks.named_choice(self.name or "", "tool_choice.name")
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


class ThinkingConfig(Strict):
    type: Literal["enabled", "disabled"]
    budget_tokens: PositiveInt | None = None


class Metadata(Strict):
    user_id: str | None = None


class CountTokensRequest(Strict):
    model: str | None = None  # None: the key's default model
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_format: OutputFormat | None = None

    def _messages(self) -> tuple[Message, ...]:
        out = []
        if self.system is not None:
            system = (
                self.system
                if isinstance(self.system, str)
                else tuple(TextPart(b.text) for b in self.system)
            )
            out.append(Message("system", system))
        for i, m in enumerate(self.messages):
            out += m.to_messages(last=i == len(self.messages) - 1)
        return checks.check_messages(tuple(out))

    def to_chat_request(
        self, model: Model, default_thinking: bool | None, limits: Limits
    ) -> ChatRequest:
        tools = checks.check_tools(
            [Tool(t.name, t.description, t.input_schema) for t in self.tools or ()], limits, "tools"
        )
        choice = self.tool_choice.internal() if self.tool_choice else "auto"
        thinking = default_thinking if self.thinking is None else self.thinking.type == "enabled"
        return ChatRequest(
            model=model.id,
            messages=self._messages(),
            tools=tools,
            tool_choice=checks.check_tool_choice(choice, tools, "tool_choice"),
            parallel_tool_calls=not (
                self.tool_choice and self.tool_choice.disable_parallel_tool_use
            ),
            thinking=thinking,
            strict_tools=frozenset(t.name for t in self.tools or () if t.strict),
            response_format=(
                None if self.output_format is None else ResponseFormat(self.output_format.schema_)
            ),
        )


class MessagesRequest(CountTokensRequest):
    max_tokens: PositiveInt
    stop_sequences: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stream: bool | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here
    cache_control: dict[str, Any] | None = None  # a caching hint

    def to_chat_request(
        self, model: Model, default_thinking: bool | None, limits: Limits
    ) -> ChatRequest:
        base = super().to_chat_request(model, default_thinking, limits)
        temperature = 1.0 if self.temperature is None else self.temperature
        return replace(
            base,
            stop=checks.check_stop(self.stop_sequences or [], limits, "stop_sequences"),
            max_tokens=checks.check_max_tokens(self.max_tokens, model, "max_tokens"),
            sampling=checks.sampling(
                temperature=temperature * TEMPERATURE_SCALE,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0,
            ),
        )
