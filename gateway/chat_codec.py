"""k2.v1 chat protos <-> the gateway's internal chat types (gateway/chat_types.py).

The conversation itself (messages, tools) converts with the tokenizer service's own converters
(services/tokenizer/convert.py), so the Chat API accepts exactly what Render accepts, with the
same field paths in its errors. tool_choice FUNCTION with a name that is also a mode keyword is
refused: the internal ChatRequest spells a tool name and a mode the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from gateway.chat_types import ChatEvent, ChatRequest, TokenLogprob, ToolCallDelta, ToolChoice
from gateway.tool_choice import MODES
from k2model.text.messages import ImagePart, Message, Tool
from services.common.errors import InvalidArgument
from services.common.sampling_codec import sampling_from_proto
from services.pb.k2.v1 import chat_pb2, chat_types_pb2, tokenizer_pb2
from services.tokenizer.convert import messages_from_proto, tools_from_proto

_MODE_NAMES = {
    chat_pb2.ToolChoice.AUTO: "auto",
    chat_pb2.ToolChoice.NONE: "none",
    chat_pb2.ToolChoice.REQUIRED: "required",
}


def message_to_proto(m: Message) -> chat_types_pb2.ChatMessage:
    msg = chat_types_pb2.ChatMessage(role=m.role, partial=m.partial)
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


def tool_to_proto(tool: Tool) -> chat_types_pb2.Tool:
    msg = chat_types_pb2.Tool(name=tool.name)
    if tool.description is not None:
        msg.description = tool.description
    if tool.parameters is not None:
        msg.parameters_json = json.dumps(tool.parameters, ensure_ascii=False)
    return msg


def _tool_choice(msg: chat_pb2.ToolChoice) -> ToolChoice:
    if msg.mode != chat_pb2.ToolChoice.FUNCTION:
        if msg.function:
            raise InvalidArgument("tool_choice.function: only with mode FUNCTION")
        return _MODE_NAMES[msg.mode]
    if not msg.function or msg.function in MODES:
        raise InvalidArgument(
            f"tool_choice.function: a tool name is required, got {msg.function!r}"
        )
    return msg.function


def request_from_proto(msg: chat_pb2.ChatRequest) -> ChatRequest:
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
    )


def tool_delta_from_proto(d: tokenizer_pb2.ToolCallDelta) -> ToolCallDelta:
    return ToolCallDelta(d.index, d.id, d.name, d.arguments, d.error)


def _logprobs_to_proto(logprobs: Sequence[TokenLogprob]) -> list[chat_pb2.ChatTokenLogprob]:
    return [
        chat_pb2.ChatTokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=bytes(lp.bytes),
            top=[chat_pb2.ChatTopLogprob(token=t, logprob=v, bytes=bytes(b)) for t, v, b in lp.top],
        )
        for lp in logprobs
    ]


def event_to_proto(event: ChatEvent) -> chat_pb2.ChatEvent:
    msg = chat_pb2.ChatEvent(
        choice=event.choice,
        content=event.content,
        reasoning=event.reasoning,
        tool_calls=[
            tokenizer_pb2.ToolCallDelta(
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
            chat_pb2.Usage(
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
            )
        )
    return msg
