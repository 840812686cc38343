from services.pb.k2.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("ranks", "experts_per_rank", "calls", "rows", "rounds")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_RANK_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ranks: int
    experts_per_rank: int
    calls: int
    rows: int
    rounds: int
    def __init__(self, ranks: _Optional[int] = ..., experts_per_rank: _Optional[int] = ..., calls: _Optional[int] = ..., rows: _Optional[int] = ..., rounds: _Optional[int] = ...) -> None: ...
