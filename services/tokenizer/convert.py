"""Proto <-> k2model.text dataclasses for the tokenizer service.

Every problem with a request is an InvalidArgument whose message starts with the path of the bad
field in the request ("messages[2].tool_calls[0].name: required"), in the proto's field names.
The conversation-level rules are messages.validate_messages', the same checks as the JSON path.
"""

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
from services.common.errors import InvalidArgument
from services.pb.k2.v1 import chat_types_pb2, tokenizer_pb2
from services.tokenizer.detokenize_session import DetokenizeOptions, Output


def messages_from_proto(messages: Sequence[chat_types_pb2.ChatMessage]) -> tuple[Message, ...]:
    converted = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(messages))
    try:
        validate_messages(converted)
    except ChatFormatError as e:
        raise InvalidArgument(str(e)) from None
    return converted


def _message(m: chat_types_pb2.ChatMessage, path: str) -> Message:
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


def _content(m: chat_types_pb2.ChatMessage, path: str) -> Content:
    kind = m.WhichOneof("content")
    if kind == "text":
        return m.text
    if kind == "parts":
        return tuple(_part(p, f"{path}.parts.parts[{j}]") for j, p in enumerate(m.parts.parts))
    if m.role != "assistant":
        raise InvalidArgument(f"{path}.content: required for a {m.role} message")
    return None


def _part(part: chat_types_pb2.ContentPart, path: str) -> ContentPart:
    kind = part.WhichOneof("part")
    if kind == "text":
        return TextPart(part.text)
    if kind == "image_url":
        return ImagePart(part.image_url)
    raise InvalidArgument(f"{path}: a content part needs text or image_url")


def _tool_call(call: chat_types_pb2.ToolCall, path: str) -> ToolCall:
    if not call.id:
        raise InvalidArgument(f"{path}.id: required")
    if not call.name:
        raise InvalidArgument(f"{path}.name: required")
    return ToolCall(call.id, call.name, call.arguments)


def tools_from_proto(tools: Sequence[chat_types_pb2.Tool]) -> tuple[Tool, ...]:
    converted = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(tools))
    seen: set[str] = set()
    for i, tool in enumerate(converted):
        if tool.name in seen:
            raise InvalidArgument(f"tools[{i}].name: duplicate tool name {tool.name!r}")
        seen.add(tool.name)
    return converted


def _tool(tool: chat_types_pb2.Tool, path: str) -> Tool:
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


def options_from_proto(start: tokenizer_pb2.DetokenizeStart) -> DetokenizeOptions:
    return DetokenizeOptions(
        stop=tuple(start.stop),
        parse_tool_calls=start.parse_tool_calls,
        parse_reasoning=start.parse_reasoning,
        tool_names=tuple(start.tool_names),
        skip_special_tokens=start.skip_special_tokens,
    )


def output_to_proto(output: Output) -> tokenizer_pb2.DetokenizeOutput:
    return tokenizer_pb2.DetokenizeOutput(
        content=output.content,
        reasoning=output.reasoning,
        tool_calls=[
            tokenizer_pb2.ToolCallDelta(
                index=d.index, id=d.id, name=d.name, arguments=d.arguments, error=d.error
            )
            for d in output.tool_calls
        ],
        stopped=output.stopped,
    )
