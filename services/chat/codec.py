"""k2.v1 chat protos <-> the chat types (services/chat/types.py), in both directions.

The gateway writes requests and reads events; the tokenizer service reads requests and writes
events; the gRPC Chat API reads requests with the same code, so it accepts exactly what the
tokenizer accepts. Every problem with a request is an InvalidArgument whose message starts with
the path of the bad field, in the proto's field names ("messages[2].tool_calls[0].name:
required"); the conversation-level rules are messages.validate_messages', the same checks as the
JSON path. tool_choice FUNCTION with a name that is also a mode keyword is refused: ChatRequest
spells a tool name and a mode the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import cast

from k2model.text.messages import (
    ROLES,
    ChatFormatError,
    Content,
    ContentPart,
    ImagePart,
    Message,
    Role,
    TextPart,
    Tool,
    ToolCall,
    validate_messages,
)
from services.chat.types import (
    TOOL_CHOICE_MODES,
    ChatEvent,
    ChatRequest,
    ResponseFormat,
    TokenLogprob,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from services.common.errors import InvalidArgument
from services.common.sampling_codec import sampling_from_proto, sampling_to_proto
from services.pb.k2.v1 import chat_types_pb2 as pb


def messages_from_proto(messages: Sequence[pb.ChatMessage]) -> tuple[Message, ...]:
    converted = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    try:
        validate_messages(converted)
    except ChatFormatError as e:
        raise InvalidArgument(str(e)) from None
    return converted


def _message(m: pb.ChatMessage, path: str) -> Message:
    if m.role not in ROLES:
        raise InvalidArgument(f"{path}.role: expected one of {', '.join(ROLES)}, got {m.role!r}")
    return Message(
        role=cast(Role, m.role),  # checked against ROLES above
        content=_content(m, path),
        name=m.name if m.HasField("name") else None,
        tool_calls=tuple(
            _tool_call(c, f"{path}.tool_calls[{j}]") for j, c in enumerate(m.tool_calls)
        ),
        tool_call_id=m.tool_call_id if m.HasField("tool_call_id") else None,
        reasoning_content=m.reasoning_content if m.HasField("reasoning_content") else None,
        partial=m.partial,
    )


def _content(m: pb.ChatMessage, path: str) -> Content:
    kind = m.WhichOneof("content")
    if kind == "text":
        return m.text
    if kind == "parts":
        return tuple(_part(p, f"{path}.parts.parts[{j}]") for j, p in enumerate(m.parts.parts))
    if m.role != "assistant":
        raise InvalidArgument(f"{path}.content: required for a {m.role} message")
    return None


def _part(part: pb.ContentPart, path: str) -> ContentPart:
    kind = part.WhichOneof("part")
    if kind == "text":
        return TextPart(part.text)
    if kind == "image_url":
        return ImagePart(part.image_url)
    raise InvalidArgument(f"{path}: a content part needs text or image_url")


def _tool_call(call: pb.ToolCall, path: str) -> ToolCall:
    if not call.id:
        raise InvalidArgument(f"{path}.id: required")
    if not call.name:
        raise InvalidArgument(f"{path}.name: required")
    return ToolCall(call.id, call.name, call.arguments)


def tools_from_proto(tools: Sequence[pb.Tool]) -> tuple[Tool, ...]:
    converted = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(tools))
    seen: set[str] = set()
    for i, tool in enumerate(converted):
        if tool.name in seen:
            raise InvalidArgument(f"tools[{i}].name: duplicate tool name {tool.name!r}")
        seen.add(tool.name)
    return converted


def _tool(tool: pb.Tool, path: str) -> Tool:
    if not tool.name:
        raise InvalidArgument(f"{path}.name: required")
    parameters = None
    if tool.HasField("parameters_json"):
        try:
            parameters = json.loads(tool.parameters_json)
        except ValueError as e:
            raise InvalidArgument(f"{path}.parameters_json: not valid JSON: {e}") from None
        if not isinstance(parameters, dict):
            raise InvalidArgument(f"{path}.parameters_json: expected a JSON object schema")
    description = tool.description if tool.HasField("description") else None
    return Tool(tool.name, description, parameters)


_MODE_NAMES = {
    pb.ToolChoice.AUTO: "auto",
    pb.ToolChoice.NONE: "none",
    pb.ToolChoice.REQUIRED: "required",
}
_MODE_OF = {name: mode for mode, name in _MODE_NAMES.items()}


def message_to_proto(m: Message) -> pb.ChatMessage:
    msg = pb.ChatMessage(role=m.role, partial=m.partial)
    if isinstance(m.content, str):
        msg.text = m.content
    elif m.content is not None:
        msg.parts.SetInParent()
        for part in m.content:
            if isinstance(part, ImagePart):
                msg.parts.parts.add(image_url=part.url or "")
            else:
                msg.parts.parts.add(text=part.text)
    for field in ("name", "tool_call_id", "reasoning_content"):
        value = getattr(m, field)
        if value is not None:
            setattr(msg, field, value)
    for call in m.tool_calls:
        msg.tool_calls.add(id=call.id, name=call.name, arguments=call.arguments)
    return msg


def tool_to_proto(tool: Tool, strict: bool = False) -> pb.Tool:
    msg = pb.Tool(name=tool.name, strict=strict)
    if tool.description is not None:
        msg.description = tool.description
    if tool.parameters is not None:
        msg.parameters_json = json.dumps(tool.parameters, ensure_ascii=False)
    return msg


def _tool_choice(msg: pb.ToolChoice) -> ToolChoice:
    if msg.mode != pb.ToolChoice.FUNCTION:
        if msg.function:
            raise InvalidArgument("tool_choice.function: only with mode FUNCTION")
        return _MODE_NAMES[msg.mode]
    if not msg.function or msg.function in TOOL_CHOICE_MODES:
        raise InvalidArgument(
            f"tool_choice.function: a tool name is required, got {msg.function!r}"
        )
    return msg.function


def _tool_choice_to_proto(choice: ToolChoice) -> pb.ToolChoice:
    if choice in _MODE_OF:
        return pb.ToolChoice(mode=_MODE_OF[choice])
    return pb.ToolChoice(mode=pb.ToolChoice.FUNCTION, function=choice)


def request_from_proto(msg: pb.ChatRequest) -> ChatRequest:
    return ChatRequest(
        model=msg.model,
        messages=messages_from_proto(msg.messages),
        tools=tools_from_proto(msg.tools),
        tool_choice=_tool_choice(msg.tool_choice),
        parallel_tool_calls=msg.parallel_tool_calls
        if msg.HasField("parallel_tool_calls")
        else True,
        n=msg.n or 1,
        stop=tuple(msg.stop),
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        sampling=sampling_from_proto(msg.sampling),
        thinking=msg.thinking if msg.HasField("thinking") else None,
        request_id=msg.request_id,
        strict_tools=frozenset(t.name for t in msg.tools if t.strict),
        response_format=_response_format(msg),
        keep_reasoning=msg.keep_reasoning,
        min_tokens=msg.min_tokens,
        ignore_eos=msg.ignore_eos,
        prompt_ids=tuple(msg.prompt_ids),
        echo=msg.echo,
        continuous_usage=msg.continuous_usage,
    )


def _response_format(msg: pb.ChatRequest) -> ResponseFormat | None:
    if not msg.HasField("response_format"):
        return None
    if not msg.response_format.schema_json:
        return ResponseFormat()
    try:
        schema = json.loads(msg.response_format.schema_json)
    except ValueError as e:
        raise InvalidArgument(f"response_format.schema_json: not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument("response_format.schema_json: expected a JSON object schema")
    return ResponseFormat(schema)


def request_to_proto(request: ChatRequest) -> pb.ChatRequest:
    msg = pb.ChatRequest(
        model=request.model,
        messages=[message_to_proto(m) for m in request.messages],
        tools=[tool_to_proto(t, t.name in request.strict_tools) for t in request.tools],
        tool_choice=_tool_choice_to_proto(request.tool_choice),
        parallel_tool_calls=request.parallel_tool_calls,
        n=request.n,
        stop=request.stop,
        sampling=sampling_to_proto(request.sampling),
        request_id=request.request_id,
        keep_reasoning=request.keep_reasoning,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        prompt_ids=request.prompt_ids,
        echo=request.echo,
        continuous_usage=request.continuous_usage,
    )
    if request.response_format is not None:
        schema = request.response_format.schema
        text = "" if schema is None else json.dumps(schema, ensure_ascii=False)
        msg.response_format.schema_json = text
    if request.max_tokens is not None:
        msg.max_tokens = request.max_tokens
    if request.thinking is not None:
        msg.thinking = request.thinking
    return msg


def _logprobs_to_proto(logprobs: Sequence[TokenLogprob]) -> list[pb.ChatTokenLogprob]:
    return [
        pb.ChatTokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=bytes(lp.bytes),
            top=[pb.ChatTopLogprob(token=t, logprob=v, bytes=bytes(b)) for t, v, b in lp.top],
        )
        for lp in logprobs
    ]


def event_to_proto(event: ChatEvent) -> pb.ChatEvent:
    msg = pb.ChatEvent(
        choice=event.choice,
        content=event.content,
        reasoning=event.reasoning,
        tool_calls=[
            pb.ToolCallDelta(
                index=d.index, id=d.id, name=d.name, arguments=d.arguments, error=d.error
            )
            for d in event.tool_calls
        ],
        logprobs=_logprobs_to_proto(event.logprobs),
        finish_reason=event.finish_reason or "",
    )
    if event.usage is not None:
        u = event.usage
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
            )
        )
    return msg


def event_from_proto(msg: pb.ChatEvent) -> ChatEvent:
    return ChatEvent(
        choice=msg.choice,
        content=msg.content,
        reasoning=msg.reasoning,
        tool_calls=tuple(
            ToolCallDelta(d.index, d.id, d.name, d.arguments, d.error) for d in msg.tool_calls
        ),
        logprobs=tuple(
            TokenLogprob(
                lp.token,
                lp.logprob,
                tuple(lp.bytes),
                tuple((t.token, t.logprob, tuple(t.bytes)) for t in lp.top),
            )
            for lp in msg.logprobs
        ),
        finish_reason=msg.finish_reason or None,
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens)
        if msg.HasField("usage")
        else None,
    )
