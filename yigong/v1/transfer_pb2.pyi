from yigong.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OfferRequest(_message.Message):
    __slots__ = ("transfer_id", "object")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    object: _common_pb2.ObjectHeader
    def __init__(self, transfer_id: _Optional[str] = ..., object: _Optional[_Union[_common_pb2.ObjectHeader, _Mapping]] = ...) -> None: ...

class OfferResponse(_message.Message):
    __slots__ = ("resume_offset", "complete", "receipt", "max_chunk_bytes")
    RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    resume_offset: int
    complete: bool
    receipt: _common_pb2.SignedReceipt
    max_chunk_bytes: int
    def __init__(self, resume_offset: _Optional[int] = ..., complete: _Optional[bool] = ..., receipt: _Optional[_Union[_common_pb2.SignedReceipt, _Mapping]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("node_certificate",)
    NODE_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    node_certificate: bytes
    def __init__(self, node_certificate: _Optional[bytes] = ...) -> None: ...

class PushStart(_message.Message):
    __slots__ = ("transfer_id", "object", "offset")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    object: _common_pb2.ObjectHeader
    offset: int
    def __init__(self, transfer_id: _Optional[str] = ..., object: _Optional[_Union[_common_pb2.ObjectHeader, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class PushEnd(_message.Message):
    __slots__ = ("sha256", "size")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class PushMessage(_message.Message):
    __slots__ = ("start", "chunk", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: PushStart
    chunk: _common_pb2.Chunk
    end: PushEnd
    def __init__(self, start: _Optional[_Union[PushStart, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., end: _Optional[_Union[PushEnd, _Mapping]] = ...) -> None: ...
