from yigong.v1 import common_pb2 as _common_pb2
from yigong.v1 import transfer_pb2 as _transfer_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TimeRange(_message.Message):
    __slots__ = ("since", "until")
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    since: str
    until: str
    def __init__(self, since: _Optional[str] = ..., until: _Optional[str] = ...) -> None: ...

class ListObjectsRequest(_message.Message):
    __slots__ = ("case_id", "peer", "time", "limit")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    peer: str
    time: TimeRange
    limit: int
    def __init__(self, case_id: _Optional[str] = ..., peer: _Optional[str] = ..., time: _Optional[_Union[TimeRange, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListObjectsResponse(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[_common_pb2.ObjectInfo]
    def __init__(self, objects: _Optional[_Iterable[_Union[_common_pb2.ObjectInfo, _Mapping]]] = ...) -> None: ...

class GetObjectRequest(_message.Message):
    __slots__ = ("object_id",)
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    def __init__(self, object_id: _Optional[str] = ...) -> None: ...

class ObjectDetail(_message.Message):
    __slots__ = ("object", "transfers")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    object: _common_pb2.ObjectInfo
    transfers: _containers.RepeatedCompositeFieldContainer[_common_pb2.TransferInfo]
    def __init__(self, object: _Optional[_Union[_common_pb2.ObjectInfo, _Mapping]] = ..., transfers: _Optional[_Iterable[_Union[_common_pb2.TransferInfo, _Mapping]]] = ...) -> None: ...

class ListTransfersRequest(_message.Message):
    __slots__ = ("case_id", "peer", "status", "direction", "object_id", "time", "limit")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    peer: str
    status: str
    direction: str
    object_id: str
    time: TimeRange
    limit: int
    def __init__(self, case_id: _Optional[str] = ..., peer: _Optional[str] = ..., status: _Optional[str] = ..., direction: _Optional[str] = ..., object_id: _Optional[str] = ..., time: _Optional[_Union[TimeRange, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTransfersResponse(_message.Message):
    __slots__ = ("transfers",)
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    transfers: _containers.RepeatedCompositeFieldContainer[_common_pb2.TransferInfo]
    def __init__(self, transfers: _Optional[_Iterable[_Union[_common_pb2.TransferInfo, _Mapping]]] = ...) -> None: ...

class ReadObjectRequest(_message.Message):
    __slots__ = ("object_id", "offset")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    offset: int
    def __init__(self, object_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ReadObjectResponse(_message.Message):
    __slots__ = ("chunk", "object_size", "object_sha256")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OBJECT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_SHA256_FIELD_NUMBER: _ClassVar[int]
    chunk: _common_pb2.Chunk
    object_size: int
    object_sha256: str
    def __init__(self, chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ..., object_size: _Optional[int] = ..., object_sha256: _Optional[str] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("case_id", "peer", "status", "direction", "time", "limit")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    peer: str
    status: str
    direction: str
    time: TimeRange
    limit: int
    def __init__(self, case_id: _Optional[str] = ..., peer: _Optional[str] = ..., status: _Optional[str] = ..., direction: _Optional[str] = ..., time: _Optional[_Union[TimeRange, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class BatchInfo(_message.Message):
    __slots__ = ("batch_id", "direction", "peer_node", "case_id", "kind", "ref", "status", "sealed", "expected", "attempts", "last_error", "merkle_root", "created_at", "updated_at", "completed_at", "objects_by_status", "receipt")
    class ObjectsByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PEER_NODE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    MERKLE_ROOT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    direction: str
    peer_node: str
    case_id: str
    kind: str
    ref: str
    status: str
    sealed: bool
    expected: int
    attempts: int
    last_error: str
    merkle_root: str
    created_at: str
    updated_at: str
    completed_at: str
    objects_by_status: _containers.ScalarMap[str, int]
    receipt: _transfer_pb2.SignedManifest
    def __init__(self, batch_id: _Optional[str] = ..., direction: _Optional[str] = ..., peer_node: _Optional[str] = ..., case_id: _Optional[str] = ..., kind: _Optional[str] = ..., ref: _Optional[str] = ..., status: _Optional[str] = ..., sealed: _Optional[bool] = ..., expected: _Optional[int] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., merkle_root: _Optional[str] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., completed_at: _Optional[str] = ..., objects_by_status: _Optional[_Mapping[str, int]] = ..., receipt: _Optional[_Union[_transfer_pb2.SignedManifest, _Mapping]] = ...) -> None: ...

class ListBatchesResponse(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: _containers.RepeatedCompositeFieldContainer[BatchInfo]
    def __init__(self, batches: _Optional[_Iterable[_Union[BatchInfo, _Mapping]]] = ...) -> None: ...
