from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ObjectHeader(_message.Message):
    __slots__ = ("object_id", "size", "name", "media_type", "case_id", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    size: int
    name: str
    media_type: str
    case_id: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, object_id: _Optional[str] = ..., size: _Optional[int] = ..., name: _Optional[str] = ..., media_type: _Optional[str] = ..., case_id: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    sha256: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class ReceiptBody(_message.Message):
    __slots__ = ("transfer_id", "object_id", "size", "sha256", "sender_node", "receiver_node", "started_at", "completed_at", "name", "case_id", "facts")
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
    SENDER_NODE_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_NODE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    object_id: str
    size: int
    sha256: str
    sender_node: str
    receiver_node: str
    started_at: str
    completed_at: str
    name: str
    case_id: str
    facts: _containers.ScalarMap[str, str]
    def __init__(self, transfer_id: _Optional[str] = ..., object_id: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., sender_node: _Optional[str] = ..., receiver_node: _Optional[str] = ..., started_at: _Optional[str] = ..., completed_at: _Optional[str] = ..., name: _Optional[str] = ..., case_id: _Optional[str] = ..., facts: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SignedReceipt(_message.Message):
    __slots__ = ("body", "signature", "signer_certificate")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    signer_certificate: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., signer_certificate: _Optional[bytes] = ...) -> None: ...

class ObjectInfo(_message.Message):
    __slots__ = ("object_id", "size", "name", "media_type", "case_id", "origin_node", "created_at", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_NODE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    size: int
    name: str
    media_type: str
    case_id: str
    origin_node: str
    created_at: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, object_id: _Optional[str] = ..., size: _Optional[int] = ..., name: _Optional[str] = ..., media_type: _Optional[str] = ..., case_id: _Optional[str] = ..., origin_node: _Optional[str] = ..., created_at: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TransferInfo(_message.Message):
    __slots__ = ("transfer_id", "object_id", "direction", "peer_node", "status", "attempts", "last_error", "bytes_done", "size", "case_id", "created_at", "updated_at", "completed_at", "receipt", "name", "batch_id")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    PEER_NODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    object_id: str
    direction: str
    peer_node: str
    status: str
    attempts: int
    last_error: str
    bytes_done: int
    size: int
    case_id: str
    created_at: str
    updated_at: str
    completed_at: str
    receipt: SignedReceipt
    name: str
    batch_id: str
    def __init__(self, transfer_id: _Optional[str] = ..., object_id: _Optional[str] = ..., direction: _Optional[str] = ..., peer_node: _Optional[str] = ..., status: _Optional[str] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., bytes_done: _Optional[int] = ..., size: _Optional[int] = ..., case_id: _Optional[str] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., completed_at: _Optional[str] = ..., receipt: _Optional[_Union[SignedReceipt, _Mapping]] = ..., name: _Optional[str] = ..., batch_id: _Optional[str] = ...) -> None: ...
