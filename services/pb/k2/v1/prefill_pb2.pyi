from services.pb.k2.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_ids", "sampling", "constraint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    constraint: _common_pb2.Constraint
    def __init__(self, request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., constraint: _Optional[_Union[_common_pb2.Constraint, _Mapping]] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("layer", "token_start", "latent")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    token_start: int
    latent: _common_pb2.Tensor
    def __init__(self, layer: _Optional[int] = ..., token_start: _Optional[int] = ..., latent: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PrefillChunk(_message.Message):
    __slots__ = ("kv", "first_token")
    KV_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kv: KvChunk
    first_token: _common_pb2.SampledToken
    def __init__(self, kv: _Optional[_Union[KvChunk, _Mapping]] = ..., first_token: _Optional[_Union[_common_pb2.SampledToken, _Mapping]] = ...) -> None: ...

class PrefillStats(_message.Message):
    __slots__ = ("queued", "running", "kv_blocks_total", "kv_blocks_free", "prompts_served", "kv_bytes_sent", "backend")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_SERVED_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    queued: int
    running: int
    kv_blocks_total: int
    kv_blocks_free: int
    prompts_served: int
    kv_bytes_sent: int
    backend: _common_pb2.Backend
    def __init__(self, queued: _Optional[int] = ..., running: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., prompts_served: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., backend: _Optional[_Union[_common_pb2.Backend, _Mapping]] = ...) -> None: ...
