"""A chat conversation as frozen dataclasses, parsed from OpenAI-style JSON.

`parse_messages` / `parse_tools` turn request JSON into `Message` / `Tool`; every problem is a
`ChatFormatError` whose message starts with the JSON path of the bad field
("messages[2].tool_calls[0].function.name: ..."). Keys this layer does not use are ignored: the
gateway's request schema decides which fields a client may send. `validate_messages` checks the
conversation-level rules and is run again by every renderer, so hand-built `Message`s get the
same checks as parsed ones.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A conversation, tool list or chat template input the chat format cannot represent."""


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image reference; text-only K2 renders a fixed placeholder for it."""

    url: str | None = None


ContentPart = TextPart | ImagePart
Content = str | tuple[ContentPart, ...] | None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, rendered verbatim


@dataclass(frozen=True)
class Message:
    role: Role
    content: Content = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    # Moonshot partial mode: a trailing assistant message the model continues (left open).
    partial: bool = False


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema; treated as read-only

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI `tools[i]` form, keys in the order clients send them."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


def content_to_json(content: Content) -> str | list[dict[str, Any]] | None:
    if content is None or isinstance(content, str):
        return content
    return [_part_to_json(p) for p in content]


def _part_to_json(part: ContentPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if part.url is None:
        return {"type": "image"}
    return {"type": "image_url", "image_url": {"url": part.url}}


def message_to_dict(message: Message) -> dict[str, Any]:
    """The OpenAI message form a Jinja chat template reads. Unset optional fields are left out,
    never written as None: templates do `message.get('reasoning_content', '')`."""
    out: dict[str, Any] = {"role": message.role, "content": content_to_json(message.content)}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.reasoning_content is not None:
        out["reasoning_content"] = message.reasoning_content
    return out


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise ChatFormatError(f"{path}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _parse_part(part: Any, path: str) -> ContentPart:
    if not isinstance(part, dict):
        raise ChatFormatError(f"{path}: expected an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        text = _field(part, "text", str, path)
        if text is None:
            raise ChatFormatError(f"{path}.text: required for a text part")
        return TextPart(text)
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise ChatFormatError(f"{path}.image_url: expected a URL string or {{'url': ...}}")
        return ImagePart(url)
    if kind == "image":
        return ImagePart(None)
    raise ChatFormatError(f"{path}.type: unsupported content part type {kind!r}")


def _parse_content(raw: dict[str, Any], role: Role, path: str) -> Content:
    content = raw.get("content")
    if content is None:
        if role != "assistant":
            raise ChatFormatError(f"{path}.content: required for a {role} message")
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return tuple(_parse_part(p, f"{path}.content[{i}]") for i, p in enumerate(content))
    raise ChatFormatError(
        f"{path}.content: expected a string or a list of parts, got {type(content).__name__}"
    )


def _parse_tool_call(raw: Any, path: str) -> ToolCall:
    if not isinstance(raw, dict):
        raise ChatFormatError(f"{path}: expected an object, got {type(raw).__name__}")
    call_id = _field(raw, "id", str, path)
    if not call_id:
        raise ChatFormatError(f"{path}.id: required")
    if raw.get("type", "function") != "function":
        raise ChatFormatError(f"{path}.type: only 'function' tool calls are supported")
    function = raw.get("function")
    if not isinstance(function, dict):
        raise ChatFormatError(f"{path}.function: expected an object")
    name = _field(function, "name", str, f"{path}.function")
    if not name:
        raise ChatFormatError(f"{path}.function.name: required")
    arguments = function.get("arguments", "")
    if isinstance(arguments, dict):
        # Same text as the templates' `arguments | tojson` for a non-string value.
        arguments = json.dumps(arguments, ensure_ascii=False)
    elif not isinstance(arguments, str):
        raise ChatFormatError(f"{path}.function.arguments: expected a JSON string or an object")
    return ToolCall(call_id, name, arguments)


def _parse_message(raw: Any, path: str) -> Message:
    if not isinstance(raw, dict):
        raise ChatFormatError(f"{path}: expected an object, got {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"{path}.role: expected one of {', '.join(ROLES)}, got {role!r}")
    tool_calls = _field(raw, "tool_calls", list, path) or []
    partial = _field(raw, "partial", bool, path) or False
    return Message(
        role=role,
        content=_parse_content(raw, role, path),
        name=_field(raw, "name", str, path),
        tool_calls=tuple(
            _parse_tool_call(c, f"{path}.tool_calls[{i}]") for i, c in enumerate(tool_calls)
        ),
        tool_call_id=_field(raw, "tool_call_id", str, path),
        reasoning_content=_field(raw, "reasoning_content", str, path),
        partial=partial,
    )


def validate_messages(messages: Sequence[Message]) -> None:
    """Conversation rules: which fields each role may carry, and partial mode's placement."""
    for i, m in enumerate(messages):
        path = f"messages[{i}]"
        if m.role not in ROLES:
            raise ChatFormatError(f"{path}.role: expected one of {', '.join(ROLES)}")
        if m.role == "tool" and not m.tool_call_id:
            raise ChatFormatError(f"{path}.tool_call_id: required for a tool message")
        if m.role != "tool" and m.tool_call_id is not None:
            raise ChatFormatError(f"{path}.tool_call_id: only tool messages answer a call")
        if m.role != "assistant" and m.tool_calls:
            raise ChatFormatError(f"{path}.tool_calls: only assistant messages make calls")
        if m.role != "assistant" and m.reasoning_content is not None:
            raise ChatFormatError(f"{path}.reasoning_content: only for assistant messages")
        if m.partial:
            if m.role != "assistant" or i != len(messages) - 1:
                raise ChatFormatError(
                    f"{path}.partial: only the last message may be partial, and only an "
                    "assistant message"
                )
            if m.tool_calls:
                raise ChatFormatError(f"{path}.partial: a partial message cannot carry tool_calls")


def parse_messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list):
        raise ChatFormatError(f"messages: expected a list, got {type(raw).__name__}")
    messages = tuple(_parse_message(m, f"messages[{i}]") for i, m in enumerate(raw))
    validate_messages(messages)
    return messages


def _parse_tool(raw: Any, path: str) -> Tool:
    if not isinstance(raw, dict):
        raise ChatFormatError(f"{path}: expected an object, got {type(raw).__name__}")
    if raw.get("type") != "function":
        raise ChatFormatError(f"{path}.type: only 'function' tools are supported")
    function = raw.get("function")
    if not isinstance(function, dict):
        raise ChatFormatError(f"{path}.function: expected an object")
    fpath = f"{path}.function"
    name = _field(function, "name", str, fpath)
    if not name:
        raise ChatFormatError(f"{fpath}.name: required")
    return Tool(
        name=name,
        description=_field(function, "description", str, fpath),
        parameters=_field(function, "parameters", dict, fpath),
    )


def parse_tools(raw: Any) -> tuple[Tool, ...]:
    if not isinstance(raw, list):
        raise ChatFormatError(f"tools: expected a list, got {type(raw).__name__}")
    tools = tuple(_parse_tool(t, f"tools[{i}]") for i, t in enumerate(raw))
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.name in seen:
            raise ChatFormatError(f"tools[{i}].function.name: duplicate tool name {tool.name!r}")
        seen.add(tool.name)
    return tools
