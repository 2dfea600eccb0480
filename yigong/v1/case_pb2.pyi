from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateCaseRequest(_message.Message):
    __slots__ = ("case_id", "manufacturer")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    manufacturer: str
    def __init__(self, case_id: _Optional[str] = ..., manufacturer: _Optional[str] = ...) -> None: ...

class SubmitRecordRequest(_message.Message):
    __slots__ = ("record", "author_signature")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    record: bytes
    author_signature: bytes
    def __init__(self, record: _Optional[bytes] = ..., author_signature: _Optional[bytes] = ...) -> None: ...

class GetCaseRequest(_message.Message):
    __slots__ = ("case_id",)
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    def __init__(self, case_id: _Optional[str] = ...) -> None: ...

class ListCasesRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class NextAction(_message.Message):
    __slots__ = ("role", "node", "record_types", "description")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RECORD_TYPES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    role: str
    node: str
    record_types: _containers.RepeatedScalarFieldContainer[str]
    description: str
    def __init__(self, role: _Optional[str] = ..., node: _Optional[str] = ..., record_types: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ...) -> None: ...

class CaseRecord(_message.Message):
    __slots__ = ("seq", "type", "author", "node_id", "time", "record_hash", "prev_hash", "verified", "problem", "origin", "exchange", "envelope", "record_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    type: str
    author: str
    node_id: str
    time: str
    record_hash: str
    prev_hash: str
    verified: bool
    problem: str
    origin: str
    exchange: str
    envelope: bytes
    record_json: str
    def __init__(self, seq: _Optional[int] = ..., type: _Optional[str] = ..., author: _Optional[str] = ..., node_id: _Optional[str] = ..., time: _Optional[str] = ..., record_hash: _Optional[str] = ..., prev_hash: _Optional[str] = ..., verified: _Optional[bool] = ..., problem: _Optional[str] = ..., origin: _Optional[str] = ..., exchange: _Optional[str] = ..., envelope: _Optional[bytes] = ..., record_json: _Optional[str] = ...) -> None: ...

class RejectedRecord(_message.Message):
    __slots__ = ("seq", "record_hash", "kind", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    record_hash: str
    kind: str
    reason: str
    def __init__(self, seq: _Optional[int] = ..., record_hash: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CaseView(_message.Message):
    __slots__ = ("case_id", "hospital", "manufacturer", "created_at", "created_by", "stage", "next", "verified", "problem", "head_hash", "next_seq", "records", "pending", "rejected")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSPITAL_FIELD_NUMBER: _ClassVar[int]
    MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    NEXT_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    hospital: str
    manufacturer: str
    created_at: str
    created_by: str
    stage: str
    next: _containers.RepeatedCompositeFieldContainer[NextAction]
    verified: bool
    problem: str
    head_hash: str
    next_seq: int
    records: _containers.RepeatedCompositeFieldContainer[CaseRecord]
    pending: int
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedRecord]
    def __init__(self, case_id: _Optional[str] = ..., hospital: _Optional[str] = ..., manufacturer: _Optional[str] = ..., created_at: _Optional[str] = ..., created_by: _Optional[str] = ..., stage: _Optional[str] = ..., next: _Optional[_Iterable[_Union[NextAction, _Mapping]]] = ..., verified: _Optional[bool] = ..., problem: _Optional[str] = ..., head_hash: _Optional[str] = ..., next_seq: _Optional[int] = ..., records: _Optional[_Iterable[_Union[CaseRecord, _Mapping]]] = ..., pending: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[RejectedRecord, _Mapping]]] = ...) -> None: ...

class ListCasesResponse(_message.Message):
    __slots__ = ("cases",)
    CASES_FIELD_NUMBER: _ClassVar[int]
    cases: _containers.RepeatedCompositeFieldContainer[CaseView]
    def __init__(self, cases: _Optional[_Iterable[_Union[CaseView, _Mapping]]] = ...) -> None: ...
