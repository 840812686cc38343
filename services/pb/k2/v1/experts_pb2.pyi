from services.pb.k2.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertEndpoint(_message.Message):
    __slots__ = ("rank", "tcp")
    RANK_FIELD_NUMBER: _ClassVar[int]
    TCP_FIELD_NUMBER: _ClassVar[int]
    rank: int
    tcp: str
    def __init__(self, rank: _Optional[int] = ..., tcp: _Optional[str] = ...) -> None: ...

class ExpertsEndpoints(_message.Message):
    __slots__ = ("ranks", "token", "experts_per_rank", "hidden_size")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedCompositeFieldContainer[ExpertEndpoint]
    token: bytes
    experts_per_rank: int
    hidden_size: int
    def __init__(self, ranks: _Optional[_Iterable[_Union[ExpertEndpoint, _Mapping]]] = ..., token: _Optional[bytes] = ..., experts_per_rank: _Optional[int] = ..., hidden_size: _Optional[int] = ...) -> None: ...

class ExpertsRequest(_message.Message):
    __slots__ = ("layer", "hidden", "expert_ids", "weights")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: _common_pb2.Tensor
    expert_ids: _common_pb2.Tensor
    weights: _common_pb2.Tensor
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ExpertsReply(_message.Message):
    __slots__ = ("out",)
    OUT_FIELD_NUMBER: _ClassVar[int]
    out: _common_pb2.Tensor
    def __init__(self, out: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ExpertsStats(_message.Message):
    __slots__ = ("ranks", "experts_per_rank", "calls", "rows", "rounds", "dataplane_requests", "dataplane_shared_requests")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    DATAPLANE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DATAPLANE_SHARED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ranks: int
    experts_per_rank: int
    calls: int
    rows: int
    rounds: int
    dataplane_requests: int
    dataplane_shared_requests: int
    def __init__(self, ranks: _Optional[int] = ..., experts_per_rank: _Optional[int] = ..., calls: _Optional[int] = ..., rows: _Optional[int] = ..., rounds: _Optional[int] = ..., dataplane_requests: _Optional[int] = ..., dataplane_shared_requests: _Optional[int] = ...) -> None: ...
