from services.pb.k2.v1 import chat_types_pb2 as _chat_types_pb2
from services.pb.k2.v1 import decode_pb2 as _decode_pb2
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

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("context_length", "vocab_size", "reasoning")
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    context_length: int
    vocab_size: int
    reasoning: bool
    def __init__(self, context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., reasoning: _Optional[bool] = ...) -> None: ...

class PlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerLoad(_message.Message):
    __slots__ = ("name", "stats")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    name: str
    stats: _decode_pb2.DecodeStats
    def __init__(self, name: _Optional[str] = ..., stats: _Optional[_Union[_decode_pb2.DecodeStats, _Mapping]] = ...) -> None: ...

class PlacementReply(_message.Message):
    __slots__ = ("decodes",)
    DECODES_FIELD_NUMBER: _ClassVar[int]
    decodes: _containers.RepeatedCompositeFieldContainer[PeerLoad]
    def __init__(self, decodes: _Optional[_Iterable[_Union[PeerLoad, _Mapping]]] = ...) -> None: ...
