from yigong.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
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

class BatchStart(_message.Message):
    __slots__ = ("batch_id", "case_id", "ref", "kind")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    case_id: str
    ref: str
    kind: str
    def __init__(self, batch_id: _Optional[str] = ..., case_id: _Optional[str] = ..., ref: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class ObjectStart(_message.Message):
    __slots__ = ("transfer_id", "object", "offset")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    object: _common_pb2.ObjectHeader
    offset: int
    def __init__(self, transfer_id: _Optional[str] = ..., object: _Optional[_Union[_common_pb2.ObjectHeader, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class BatchEnd(_message.Message):
    __slots__ = ("transfer_ids",)
    TRANSFER_IDS_FIELD_NUMBER: _ClassVar[int]
    transfer_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, transfer_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchMessage(_message.Message):
    __slots__ = ("start", "object", "chunk", "object_end", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OBJECT_END_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: BatchStart
    object: ObjectStart
    chunk: _common_pb2.Chunk
    object_end: PushEnd
    end: BatchEnd
    def __init__(self, start: _Optional[_Union[BatchStart, _Mapping]] = ..., object: _Optional[_Union[ObjectStart, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., object_end: _Optional[_Union[PushEnd, _Mapping]] = ..., end: _Optional[_Union[BatchEnd, _Mapping]] = ...) -> None: ...

class ObjectStored(_message.Message):
    __slots__ = ("transfer_id", "sha256")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    sha256: str
    def __init__(self, transfer_id: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("stored", "receipt")
    STORED_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    stored: ObjectStored
    receipt: SignedManifest
    def __init__(self, stored: _Optional[_Union[ObjectStored, _Mapping]] = ..., receipt: _Optional[_Union[SignedManifest, _Mapping]] = ...) -> None: ...

class BatchStatusRequest(_message.Message):
    __slots__ = ("batch_id",)
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    def __init__(self, batch_id: _Optional[str] = ...) -> None: ...

class BatchObjectState(_message.Message):
    __slots__ = ("transfer_id", "object_id", "held", "resume_offset")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    RESUME_OFFSET_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    object_id: str
    held: bool
    resume_offset: int
    def __init__(self, transfer_id: _Optional[str] = ..., object_id: _Optional[str] = ..., held: _Optional[bool] = ..., resume_offset: _Optional[int] = ...) -> None: ...

class BatchStatusResponse(_message.Message):
    __slots__ = ("objects", "receipt", "max_chunk_bytes")
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[BatchObjectState]
    receipt: SignedManifest
    max_chunk_bytes: int
    def __init__(self, objects: _Optional[_Iterable[_Union[BatchObjectState, _Mapping]]] = ..., receipt: _Optional[_Union[SignedManifest, _Mapping]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class ManifestEntry(_message.Message):
    __slots__ = ("transfer_id", "object_id", "size", "sha256", "facts")
    class FactsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    object_id: str
    size: int
    sha256: str
    facts: _containers.ScalarMap[str, str]
    def __init__(self, transfer_id: _Optional[str] = ..., object_id: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., facts: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BatchManifest(_message.Message):
    __slots__ = ("batch_id", "sender_node", "receiver_node", "case_id", "ref", "count", "total_bytes", "merkle_root", "completed_at", "entries")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_NODE_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_NODE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    sender_node: str
    receiver_node: str
    case_id: str
    ref: str
    count: int
    total_bytes: int
    merkle_root: str
    completed_at: str
    entries: _containers.RepeatedCompositeFieldContainer[ManifestEntry]
    def __init__(self, batch_id: _Optional[str] = ..., sender_node: _Optional[str] = ..., receiver_node: _Optional[str] = ..., case_id: _Optional[str] = ..., ref: _Optional[str] = ..., count: _Optional[int] = ..., total_bytes: _Optional[int] = ..., merkle_root: _Optional[str] = ..., completed_at: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[ManifestEntry, _Mapping]]] = ...) -> None: ...

class SignedManifest(_message.Message):
    __slots__ = ("body", "signature", "signer_certificate")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    signer_certificate: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer_certificate: _Optional[bytes] = ...) -> None: ...
