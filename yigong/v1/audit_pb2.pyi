from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditCheckpoint(_message.Message):
    __slots__ = ("node_id", "seq", "time", "head_hash", "signature")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    seq: int
    time: str
    head_hash: str
    signature: bytes
    def __init__(self, node_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[str] = ..., head_hash: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class WitnessRequest(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[AuditCheckpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[AuditCheckpoint, _Mapping]]] = ...) -> None: ...

class WitnessResponse(_message.Message):
    __slots__ = ("accepted", "newest_seq")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEWEST_SEQ_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    newest_seq: int
    def __init__(self, accepted: _Optional[int] = ..., newest_seq: _Optional[int] = ...) -> None: ...

class GetWitnessedRequest(_message.Message):
    __slots__ = ("node_id", "after_seq", "limit")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    after_seq: int
    limit: int
    def __init__(self, node_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class WitnessedCheckpoint(_message.Message):
    __slots__ = ("checkpoint", "received_at", "signer_certificate")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    checkpoint: AuditCheckpoint
    received_at: str
    signer_certificate: bytes
    def __init__(self, checkpoint: _Optional[_Union[AuditCheckpoint, _Mapping]] = ..., received_at: _Optional[str] = ..., signer_certificate: _Optional[bytes] = ...) -> None: ...

class GetWitnessedResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[WitnessedCheckpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[WitnessedCheckpoint, _Mapping]]] = ...) -> None: ...
