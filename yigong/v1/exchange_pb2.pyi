from yigong.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitStart(_message.Message):
    __slots__ = ("name", "media_type", "case_id", "destinations", "sha256", "size", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    media_type: str
    case_id: str
    destinations: _containers.RepeatedScalarFieldContainer[str]
    sha256: str
    size: int
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., media_type: _Optional[str] = ..., case_id: _Optional[str] = ..., destinations: _Optional[_Iterable[str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SubmitMessage(_message.Message):
    __slots__ = ("start", "chunk")
    START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    start: SubmitStart
    chunk: _common_pb2.Chunk
    def __init__(self, start: _Optional[_Union[SubmitStart, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.Chunk, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("object", "queued")
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    object: _common_pb2.ObjectInfo
    queued: _containers.RepeatedCompositeFieldContainer[_common_pb2.TransferInfo]
    def __init__(self, object: _Optional[_Union[_common_pb2.ObjectInfo, _Mapping]] = ..., queued: _Optional[_Iterable[_Union[_common_pb2.TransferInfo, _Mapping]]] = ...) -> None: ...
