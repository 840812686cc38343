"""The OpenAI Responses API request (`POST /v1/responses`) and its translation into a ChatRequest.

Validation is as strict as the chat route's (closed schemas, a 400 naming the field), and the
field policy is the same: harmless fields are accepted and counted, output-changing ones are
honoured or refused by name. Input items become the chat conversation:
- `instructions` -> a system message first (never carried to a follow-up response, as OpenAI);
- message items (`input_text` / `output_text` parts, or a string) -> messages, `developer` as
  system;
- `reasoning` items -> the reasoning_content of the assistant turn that follows them;
- `function_call` items -> that assistant turn's tool calls (consecutive calls, and an assistant
  message just before them, form one turn);
- `function_call_output` items -> tool messages.
Function tools are strict unless they say `strict: false` (the Responses API's default);
`text.format` json_object / json_schema constrain the answer; `reasoning.effort` maps to thinking
as on the chat route.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from gateway import errors
from gateway import request_checks as checks
from gateway.config import Limits
from gateway.field_policy import ignored
from gateway.openai_models import (
    MAX_TOOLS,
    REASONING_EFFORT,
    TOOL_NAME,
    PositiveInt,
    Strict,
    Temperature,
    TopP,
    VendorHints,
)
from gateway.registry import Model
from k2model.text.messages import Message, Tool, ToolCall
from services.chat.types import ChatRequest, ResponseFormat


class InputText(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: Any = ignored("URL citations of an earlier reply")
    logprobs: Any = ignored("an earlier reply's logprobs")


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        for part in data.get("content") if isinstance(data.get("content"), list) else ():
            if isinstance(part, dict) and part.get("type") not in ("input_text", "output_text"):
                raise ValueError(
                    f"K2 is text-only: content parts of type {part.get('type')!r} are rejected"
                )
        return data

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.text for p in self.output)


class ReasoningText(Strict):
    type: Literal["summary_text", "reasoning_text"]
    text: str


class ReasoningItem(Strict):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: Any = ignored("another vendor's encrypted reasoning; K2's is plain text")
    status: str | None = None

    def text(self) -> str:
        return "".join(p.text for p in self.content or self.summary)


Item = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem,
    Field(discriminator="type"),
]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # absent: true, the Responses API's default


class FunctionChoice(Strict):
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME)


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None  # the answer follows the schema either way

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormat:
        if (self.type == "json_schema") != (self.schema_ is not None):
            raise ValueError("schema is required with type json_schema, and only then")
        return self


class TextOptions(Strict):
    format: TextFormat | None = None
    verbosity: Any = ignored("a reply-length hint of OpenAI's models; K2 has no such control")


class ReasoningOptions(Strict):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Any = ignored("K2 returns its whole reasoning, never a summary")
    generate_summary: Any = ignored("K2 returns its whole reasoning, never a summary")


class StreamOptions(Strict):
    include_obfuscation: Any = ignored("random padding against side channels on OpenAI's wire")


class ResponsesRequest(VendorHints):
    model: str | None = None
    input: str | list[Item]
    instructions: str | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    store: bool | None = None  # absent: true; stored responses serve previous_response_id
    previous_response_id: str | None = None
    text: TextOptions | None = None
    reasoning: ReasoningOptions | None = None
    metadata: dict[str, str] | None = None  # returned on the response, as OpenAI does
    include: list[str] | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (dropping old items) is not done
    max_tool_calls: Any = ignored("a cap on the vendor's hosted tool calls; none here")
    background: Literal[False] | None = None  # background runs are not offered
    conversation: None = None  # the Conversations API is not offered; use previous_response_id
    prompt: None = None  # stored prompt templates are not offered

    @model_validator(mode="before")
    @classmethod
    def _typed_messages(cls, data: Any) -> Any:
        """An item with a role and no type is a message (OpenAI's EasyInputMessage)."""
        items = data.get("input") if isinstance(data, dict) else None
        if isinstance(items, list):
            data = {
                **data,
                "input": [
                    {"type": "message", **i} if isinstance(i, dict) and "type" not in i else i
                    for i in items
                ],
            }
        return data

    def function_tools(self) -> list[FunctionTool]:
        tools = []
        for i, raw in enumerate(self.tools or ()):
            if raw.get("type") != "function":
                raise errors.invalid_value(
                    f"tools[{i}]: only function tools are served (K2 runs no hosted "
                    f"{raw.get('type')!r} tool); declare it as a function",
                    f"tools[{i}].type",
                )
            try:
                tools.append(FunctionTool.model_validate(raw))
            except ValueError as e:
                raise errors.invalid_value(f"tools[{i}]: {e}", f"tools[{i}]") from None
        return tools

    def to_chat_request(
        self, model: Model, default_thinking: bool | None, limits: Limits, history: tuple
    ) -> ChatRequest:
        """history: the stored conversation previous_response_id continues (messages)."""
        if self.stream_options is not None and not self.stream:
            raise errors.invalid_value(
                "stream_options is only allowed with stream=true", "stream_options"
            )
        declared = self.function_tools()
        tools = checks.check_tools(
            [Tool(t.name, t.description, t.parameters) for t in declared], limits, "tools"
        )
        choice = self.tool_choice or "auto"
        if isinstance(choice, FunctionChoice):
            choice = checks.named_choice(choice.name, "tool_choice.name")
        thinking = default_thinking
        if self.reasoning is not None and self.reasoning.effort is not None:
            thinking = REASONING_EFFORT[self.reasoning.effort]
        messages = checks.check_messages((*self._instructions(), *history, *self.messages()))
        logprobs = bool(self.top_logprobs) or "message.output_text.logprobs" in (self.include or ())
        default_temperature = 1.0 if thinking else 0.6
        sampling = checks.sampling(
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
            logit_bias={},
            seed=None,
            logprobs=logprobs,
            top_logprobs=self.top_logprobs or 0,
        )
        return ChatRequest(
            model=model.id,
            messages=messages,
            tools=tools,
            tool_choice=checks.check_tool_choice(choice, tools, "tool_choice"),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            max_tokens=checks.check_max_tokens(self.max_output_tokens, model, "max_output_tokens"),
            sampling=sampling,
            thinking=thinking,
            strict_tools=frozenset(t.name for t in declared if t.strict is not False),
            response_format=self._format(),
        )

    def _instructions(self) -> tuple[Message, ...]:
        return () if self.instructions is None else (Message("system", self.instructions),)

    def _format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        return ResponseFormat(fmt.schema_)

    def messages(self) -> tuple[Message, ...]:
        """This request's input items as chat messages."""
        if isinstance(self.input, str):
            return (Message("user", self.input),)
        out: list[Message] = []
        reasoning: str | None = None
        for item in self.input:
            if isinstance(item, ReasoningItem):
                reasoning = (reasoning or "") + item.text()
            elif isinstance(item, MessageItem):
                role = "system" if item.role == "developer" else item.role
                if role == "assistant":
                    out.append(Message("assistant", item.text(), reasoning_content=reasoning))
                    reasoning = None
                else:
                    out.append(Message(role, item.text()))
            elif isinstance(item, FunctionCallItem):
                call = ToolCall(item.call_id, item.name, item.arguments)
                last = out[-1] if out else None
                if last is not None and last.role == "assistant" and reasoning is None:
                    out[-1] = Message(
                        "assistant",
                        last.content,
                        tool_calls=(*last.tool_calls, call),
                        reasoning_content=last.reasoning_content,
                    )
                else:
                    out.append(
                        Message("assistant", None, tool_calls=(call,), reasoning_content=reasoning)
                    )
                    reasoning = None
            else:
                out.append(Message("tool", item.text(), tool_call_id=item.call_id))
        return tuple(out)
