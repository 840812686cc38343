"""Request bodies of the OpenAI-compatible routes, mirroring OpenAI's chat/completions and
completions schemas, each converting itself to the internal `ChatRequest`.

Validation is strict (no "1" for 1, no NaN) and closed (an unknown field is a 400 naming it). A
field that changes the output is honoured or refused with its reason; a known field that cannot
change the output (billing, storage and cache hints, bookkeeping clients keep in history) is
declared `ignored` (field_policy.py): accepted, dropped and counted. Protocol bounds live here,
in the schema (so /openapi.json states them); deployment bounds are checked in `to_chat_request`
(request_checks.py). Extensions beyond OpenAI's schema, all honoured: `top_k`, `min_p`,
`repetition_penalty` (vLLM's), `thinking` and the `partial` assistant message (Moonshot's).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gateway import errors
from gateway import request_checks as checks
from gateway.config import Limits
from gateway.field_policy import ignored
from gateway.registry import LocalModel, Model
from k2model.sampling_params import SamplingParams
from k2model.text.messages import Message, TextPart, Tool, ToolCall
from services.chat.types import ChatRequest
from services.chat.types import ResponseFormat as AnswerFormat

MAX_N = 128
MAX_STOP = 4
MAX_TOOLS = 128
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"

Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Bias = Annotated[float, Field(ge=-100, le=100)]
PositiveInt = Annotated[int, Field(ge=1)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class ContentPart(Strict):
    type: Literal["text"]
    text: str
    cache_control: Any = ignored("a prompt-caching hint (Anthropic's, sent through LiteLLM)")

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(
                f"K2 is text-only: content parts of type {data.get('type')!r} are rejected"
            )
        return data


class FunctionCall(Strict):
    name: str = Field(min_length=1)
    arguments: str


class ToolCallIn(Strict):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall
    index: Any = ignored("a streamed delta's position, kept in history by streaming clients")


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    partial: bool = False
    # The OpenAI SDK sends these back when a response message is appended to the history; K2
    # renders none of them, so only their empty value is accepted.
    function_call: None = None
    audio: None = None
    refusal: str | None = None  # an earlier reply's refusal: rendered as that reply's text
    annotations: Any = ignored("URL citations of an earlier reply (web search results)")
    cache_control: Any = ignored("a prompt-caching hint (Anthropic's, sent through LiteLLM)")

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        return self

    @field_validator("refusal")
    @classmethod
    def _refusal_alone(cls, refusal: str | None, info: ValidationInfo) -> str | None:
        if refusal is not None and (
            info.data.get("role") != "assistant" or info.data.get("content") is not None
        ):
            raise ValueError("only an assistant message without content carries a refusal")
        return refusal

    def to_message(self) -> Message:
        content = (
            self.content if self.content is not None or self.role != "assistant" else self.refusal
        )
        if isinstance(content, list):
            content = tuple(TextPart(p.text) for p in content)
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()
        )
        return Message(
            role="system" if self.role == "developer" else self.role,
            content=content,
            name=self.name,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
            reasoning_content=self.reasoning_content,
            partial=self.partial,
        )


class FunctionDef(Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # strict=true: every call's arguments follow `parameters` (constrained decoding).
    strict: bool | None = None


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef
    cache_control: Any = ignored("a prompt-caching hint (Anthropic's, sent through LiteLLM)")


class NamedFunction(Strict):
    name: str = Field(pattern=TOOL_NAME)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far
    include_obfuscation: Any = ignored("random padding against side channels on OpenAI's wire")


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    # Constrained either way: the answer always follows the schema here.
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    def to_format(self) -> AnswerFormat | None:
        if self.type == "text":
            return None
        return AnswerFormat(None if self.json_schema is None else self.json_schema.schema_)


class Thinking(Strict):
    type: Literal["enabled", "disabled"]
    # Moonshot's Preserved Thinking: "all" renders every earlier reply's reasoning_content.
    keep: Literal["all"] | None = None


# OpenAI's reasoning_effort -> thinking on or off (K2 thinks or does not; it has no budget).
REASONING_EFFORT = {"none": False, "minimal": False, "low": True, "medium": True, "high": True}


class VendorHints(Strict):
    """Hints for a vendor's own machinery, on every OpenAI route: they change no output."""

    user: Any = ignored("an end-user id for the vendor's abuse monitoring")
    safety_identifier: Any = ignored("an end-user id for the vendor's abuse monitoring")
    service_tier: Any = ignored("a billing and latency tier of the vendor's; one tier here")
    prompt_cache_key: Any = ignored("a routing hint for the vendor's prompt cache")
    prompt_cache_retention: Any = ignored("how long the vendor keeps its prompt cache")


class SamplingFields(VendorHints):
    """Fields both chat-style routes share."""

    model: str | None = None  # None: the key's default model
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: Stop | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    seed: Seed | None = None
    store: Any = ignored("asks the vendor to keep the completion for its dashboard")
    metadata: Any = ignored("tags for the vendor's stored completions")
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    # vLLM's extensions that load generators send: a fixed output length.
    min_tokens: Annotated[int, Field(ge=0)] | None = None
    ignore_eos: bool | None = None

    def _continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def _min_tokens(self, max_tokens: int | None) -> int:
        if self.min_tokens and max_tokens is not None and self.min_tokens > max_tokens:
            raise errors.invalid_value(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({max_tokens})",
                "min_tokens",
            )
        return self.min_tokens or 0

    def _check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise errors.invalid_value(
                "stream_options is only allowed with stream=true", "stream_options"
            )

    def _sampling(
        self, model: Model, thinking: bool | None, logprobs: bool, top: int
    ) -> SamplingParams:
        # Moonshot's defaults: 0.6 for K2-Instruct, 1.0 for K2-Thinking.
        default_temperature = 1.0 if thinking else 0.6
        return checks.sampling(
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=checks.check_logit_bias(self.logit_bias or {}, model),
            seed=checks.seed_to_uint64(self.seed),
            logprobs=logprobs,
            top_logprobs=top,
        )

    def _stop(self, limits: Limits) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return checks.check_stop(stop, limits, "stop")


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    thinking: Thinking | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    modalities: list[str] | None = None  # ["text"]: all K2 produces
    audio: Any = None  # audio output parameters: refused when set
    verbosity: Any = ignored("a reply-length hint of OpenAI's models; K2 has no such control")
    prediction: Any = ignored("predicted output, which only speeds a reply up where supported")
    web_search_options: Any = None  # refused when set: no search tool here

    def to_chat_request(
        self, model: Model, default_thinking: bool | None, limits: Limits
    ) -> ChatRequest:
        self._check_stream_options()
        self._check_output_kinds()
        if self.top_logprobs and not self.logprobs:
            raise errors.invalid_value("top_logprobs requires logprobs=true", "top_logprobs")
        max_tokens = self._max_tokens(model)
        thinking = self._thinking(default_thinking)
        tools = checks.check_tools([_tool(t) for t in self.tools or ()], limits, "tools")
        choice = self.tool_choice or "auto"
        if isinstance(choice, NamedToolChoice):
            choice = checks.named_choice(choice.function.name, "tool_choice.function.name")
        return ChatRequest(
            model=model.id,
            messages=checks.check_messages(tuple(m.to_message() for m in self.messages)),
            tools=tools,
            tool_choice=checks.check_tool_choice(choice, tools, "tool_choice"),
            parallel_tool_calls=self.parallel_tool_calls is not False,
            n=checks.check_n(self.n or 1, limits),
            stop=self._stop(limits),
            max_tokens=max_tokens,
            sampling=self._sampling(model, thinking, bool(self.logprobs), self.top_logprobs or 0),
            thinking=thinking,
            strict_tools=frozenset(t.function.name for t in self.tools or () if t.function.strict),
            response_format=self.response_format and self.response_format.to_format(),
            keep_reasoning=self.thinking is not None and self.thinking.keep == "all",
            min_tokens=self._min_tokens(max_tokens),
            ignore_eos=bool(self.ignore_eos),
            continuous_usage=self._continuous_usage(),
        )

    def _check_output_kinds(self) -> None:
        """Fields asking for output K2 cannot produce."""
        if any(m != "text" for m in self.modalities or ()):
            raise errors.invalid_value(
                f"modalities: K2 produces text only, not {sorted(set(self.modalities or ()) - {'text'})}",
                "modalities",
            )
        if self.audio is not None:
            raise errors.invalid_value("audio: K2 produces text only", "audio")
        if self.web_search_options is not None:
            raise errors.invalid_value(
                "web_search_options: this server has no web search tool; declare your own as a "
                "function tool",
                "web_search_options",
            )

    def _thinking(self, default: bool | None) -> bool | None:
        """Moonshot's `thinking` and OpenAI's `reasoning_effort`, which must agree if both come."""
        asked = None if self.thinking is None else self.thinking.type == "enabled"
        if self.reasoning_effort is not None:
            effort = REASONING_EFFORT[self.reasoning_effort]
            if asked is not None and asked != effort:
                raise errors.invalid_value(
                    f"reasoning_effort {self.reasoning_effort!r} turns thinking "
                    f"{'on' if effort else 'off'}, thinking.type says {self.thinking.type!r}",
                    "reasoning_effort",
                )
            asked = effort
        if self.thinking is not None and self.thinking.keep and asked is False:
            raise errors.invalid_value(
                "thinking.keep keeps earlier reasoning for a thinking turn; thinking is off",
                "thinking.keep",
            )
        return default if asked is None else asked

    def _max_tokens(self, model: Model) -> int | None:
        # Both sent (clients that fill the old field and the new one): the newer one, as OpenAI
        # documents max_tokens as its deprecated alias.
        chosen = self.max_completion_tokens or self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
        return checks.check_max_tokens(chosen, model, param)


class CompletionRequest(SamplingFields):
    """Legacy completions. A text prompt is rendered as one user turn (K2 is a chat model; on
    local models with Thinking off, so the reply is plain text); a token-id prompt is the prompt
    exactly, no chat format (as vLLM's load generators send it). A list of prompts is one set of
    n choices per prompt, indexed prompt by prompt (OpenAI's order)."""

    prompt: str | Annotated[list[Any], Field(min_length=1)]
    max_tokens: PositiveInt | None = 16  # OpenAI's default for this route
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_forms(cls, prompt: str | list[Any]) -> str | list[Any]:
        if isinstance(prompt, str) or _token_ids(prompt):
            return prompt
        if all(isinstance(p, str) for p in prompt) or all(_token_ids(p) for p in prompt):
            return prompt
        raise ValueError(
            "a string, a list of strings, a list of token ids (integers >= 0), or a list of "
            "non-empty token-id lists"
        )

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if _token_ids(self.prompt):
            return [list(self.prompt)]  # one token-id prompt
        return list(self.prompt)

    def to_chat_requests(self, model: Model, limits: Limits) -> list[ChatRequest]:
        """One ChatRequest per prompt."""
        self._check_stream_options()
        prompts = self.prompts()
        n = checks.check_n(self.n or 1, limits)
        if len(prompts) * n > limits.max_n:
            raise errors.invalid_value(
                f"{len(prompts)} prompts x n={n} choices is more than the {limits.max_n} "
                "sequences one request may run on this server",
                "prompt",
            )
        max_tokens = checks.check_max_tokens(self.max_tokens, model, "max_tokens")
        if self.best_of is not None and self.best_of != n:
            raise errors.invalid_value("best_of other than n is not supported", "best_of")
        if self.echo and self.logprobs is not None:
            raise errors.invalid_value(
                "echo with logprobs asks for the prompt's logprobs, which are not computed here",
                "echo",
            )
        base = ChatRequest(
            model=model.id,
            messages=(),
            n=n,
            stop=self._stop(limits),
            max_tokens=max_tokens,
            sampling=self._sampling(model, False, self.logprobs is not None, self.logprobs or 0),
            thinking=False if isinstance(model, LocalModel) else None,  # upstream: its own way
            min_tokens=self._min_tokens(max_tokens),
            ignore_eos=bool(self.ignore_eos),
            echo=bool(self.echo),
            continuous_usage=self._continuous_usage(),
        )
        return [self._one(base, p, i) for i, p in enumerate(prompts)]

    @staticmethod
    def _one(base: ChatRequest, prompt: str | list[int], i: int) -> ChatRequest:
        if isinstance(prompt, list):
            return replace(base, prompt_ids=tuple(prompt), thinking=None)
        if not prompt:
            raise errors.invalid_value("prompt must not be empty", f"prompt[{i}]")
        return replace(base, messages=(Message("user", prompt),))


def _token_ids(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _tool(t: ToolDef) -> Tool:
    return Tool(t.function.name, t.function.description, t.function.parameters)
