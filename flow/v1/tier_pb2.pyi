from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_FP32: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_BF16: _ClassVar[Codec]
    CODEC_INT8: _ClassVar[Codec]

class Returns(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETURNS_UNSPECIFIED: _ClassVar[Returns]
    RETURNS_LAST: _ClassVar[Returns]
    RETURNS_ALL: _ClassVar[Returns]
CODEC_UNSPECIFIED: Codec
CODEC_FP32: Codec
CODEC_FP16: Codec
CODEC_BF16: Codec
CODEC_INT8: Codec
RETURNS_UNSPECIFIED: Returns
RETURNS_LAST: Returns
RETURNS_ALL: Returns

class Tensor(_message.Message):
    __slots__ = ("codec", "shape", "data", "scales")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    codec: Codec
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scales: bytes
    def __init__(self, codec: _Optional[_Union[Codec, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("family_hash", "from_exit", "codec")
    FAMILY_HASH_FIELD_NUMBER: _ClassVar[int]
    FROM_EXIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    family_hash: str
    from_exit: int
    codec: Codec
    def __init__(self, family_hash: _Optional[str] = ..., from_exit: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "frontier", "tier", "max_rows")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FRONTIER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    frontier: int
    tier: str
    max_rows: int
    def __init__(self, session_id: _Optional[str] = ..., frontier: _Optional[int] = ..., tier: _Optional[str] = ..., max_rows: _Optional[int] = ...) -> None: ...

class ContinueRequest(_message.Message):
    __slots__ = ("session_id", "start", "hidden", "returns", "top_k", "rollback")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    RETURNS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    hidden: Tensor
    returns: Returns
    top_k: int
    rollback: bool
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., returns: _Optional[_Union[Returns, str]] = ..., top_k: _Optional[int] = ..., rollback: _Optional[bool] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("ids", "logits")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    logits: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., logits: _Optional[_Iterable[float]] = ...) -> None: ...

class ContinueResponse(_message.Message):
    __slots__ = ("tokens", "frontier", "top_k", "tier")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FRONTIER_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    frontier: int
    top_k: _containers.RepeatedCompositeFieldContainer[TopK]
    tier: str
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., frontier: _Optional[int] = ..., top_k: _Optional[_Iterable[_Union[TopK, _Mapping]]] = ..., tier: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("session_id", "position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("frontier",)
    FRONTIER_FIELD_NUMBER: _ClassVar[int]
    frontier: int
    def __init__(self, frontier: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("family_hash", "token_ids", "max_new_tokens", "sampling", "stop_ids")
    FAMILY_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    family_hash: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    sampling: Sampling
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, family_hash: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., stop_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "index")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    token: int
    index: int
    def __init__(self, token: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...
