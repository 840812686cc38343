from services.pb.k2.v1 import chat_types_pb2 as _chat_types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RenderRequest(_message.Message):
    __slots__ = ("messages", "tools", "add_generation_prompt")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_chat_types_pb2.ChatMessage]
    tools: _containers.RepeatedCompositeFieldContainer[_chat_types_pb2.Tool]
    add_generation_prompt: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[_chat_types_pb2.ChatMessage, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[_chat_types_pb2.Tool, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ...) -> None: ...

class RenderReply(_message.Message):
    __slots__ = ("prompt_ids", "prompt_text", "stop_ids")
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_text: str
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_ids: _Optional[_Iterable[int]] = ..., prompt_text: _Optional[str] = ..., stop_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class EncodeReply(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeStart(_message.Message):
    __slots__ = ("stop", "parse_tool_calls", "parse_reasoning", "tool_names", "skip_special_tokens")
    STOP_FIELD_NUMBER: _ClassVar[int]
    PARSE_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    PARSE_REASONING_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAMES_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    parse_tool_calls: bool
    parse_reasoning: bool
    tool_names: _containers.RepeatedScalarFieldContainer[str]
    skip_special_tokens: bool
    def __init__(self, stop: _Optional[_Iterable[str]] = ..., parse_tool_calls: _Optional[bool] = ..., parse_reasoning: _Optional[bool] = ..., tool_names: _Optional[_Iterable[str]] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class DetokenizeInput(_message.Message):
    __slots__ = ("start", "ids")
    START_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    start: DetokenizeStart
    ids: TokenIds
    def __init__(self, start: _Optional[_Union[DetokenizeStart, _Mapping]] = ..., ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("index", "id", "name", "arguments", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    name: str
    arguments: str
    error: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., name: _Optional[str] = ..., arguments: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class DetokenizeOutput(_message.Message):
    __slots__ = ("content", "reasoning", "tool_calls", "stopped")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    content: str
    reasoning: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallDelta]
    stopped: bool
    def __init__(self, content: _Optional[str] = ..., reasoning: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallDelta, _Mapping]]] = ..., stopped: _Optional[bool] = ...) -> None: ...
