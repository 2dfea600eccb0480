from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListHospitalStudiesRequest(_message.Message):
    __slots__ = ("status", "limit")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    status: str
    limit: int
    def __init__(self, status: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class HospitalStudySummary(_message.Message):
    __slots__ = ("study_uid", "status", "first_received_at", "last_received_at", "received_at", "instance_count", "series_count", "report_json", "report_sha256", "identity", "identity_withheld", "cases")
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FIRST_RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SERIES_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    REPORT_SHA256_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_WITHHELD_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    study_uid: str
    status: str
    first_received_at: str
    last_received_at: str
    received_at: str
    instance_count: int
    series_count: int
    report_json: str
    report_sha256: str
    identity: StudyIdentity
    identity_withheld: bool
    cases: _containers.RepeatedCompositeFieldContainer[StudyCase]
    def __init__(self, study_uid: _Optional[str] = ..., status: _Optional[str] = ..., first_received_at: _Optional[str] = ..., last_received_at: _Optional[str] = ..., received_at: _Optional[str] = ..., instance_count: _Optional[int] = ..., series_count: _Optional[int] = ..., report_json: _Optional[str] = ..., report_sha256: _Optional[str] = ..., identity: _Optional[_Union[StudyIdentity, _Mapping]] = ..., identity_withheld: _Optional[bool] = ..., cases: _Optional[_Iterable[_Union[StudyCase, _Mapping]]] = ...) -> None: ...

class StudyIdentity(_message.Message):
    __slots__ = ("patient_name", "patient_id", "birth_date", "sex", "age", "accession_number", "study_date", "study_time", "study_description", "modalities", "referring_physician", "recorded")
    PATIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PATIENT_ID_FIELD_NUMBER: _ClassVar[int]
    BIRTH_DATE_FIELD_NUMBER: _ClassVar[int]
    SEX_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    ACCESSION_NUMBER_FIELD_NUMBER: _ClassVar[int]
    STUDY_DATE_FIELD_NUMBER: _ClassVar[int]
    STUDY_TIME_FIELD_NUMBER: _ClassVar[int]
    STUDY_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    REFERRING_PHYSICIAN_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    modalities: _containers.RepeatedScalarFieldContainer[str]
    referring_physician: str
    recorded: bool
    def __init__(self, patient_name: _Optional[str] = ..., patient_id: _Optional[str] = ..., birth_date: _Optional[str] = ..., sex: _Optional[str] = ..., age: _Optional[str] = ..., accession_number: _Optional[str] = ..., study_date: _Optional[str] = ..., study_time: _Optional[str] = ..., study_description: _Optional[str] = ..., modalities: _Optional[_Iterable[str]] = ..., referring_physician: _Optional[str] = ..., recorded: _Optional[bool] = ...) -> None: ...

class StudyCase(_message.Message):
    __slots__ = ("case_id", "pseudonym", "destination", "confirmation_id", "deid_study_uid")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATION_ID_FIELD_NUMBER: _ClassVar[int]
    DEID_STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    pseudonym: str
    destination: str
    confirmation_id: str
    deid_study_uid: str
    def __init__(self, case_id: _Optional[str] = ..., pseudonym: _Optional[str] = ..., destination: _Optional[str] = ..., confirmation_id: _Optional[str] = ..., deid_study_uid: _Optional[str] = ...) -> None: ...

class ListHospitalStudiesResponse(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[HospitalStudySummary]
    def __init__(self, studies: _Optional[_Iterable[_Union[HospitalStudySummary, _Mapping]]] = ...) -> None: ...

class GetHospitalStudyRequest(_message.Message):
    __slots__ = ("study_uid",)
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    study_uid: str
    def __init__(self, study_uid: _Optional[str] = ...) -> None: ...

class DataConfirmation(_message.Message):
    __slots__ = ("confirmation_id", "record_json", "signature", "signer_certificate", "study_uid", "case_id", "destination", "confirmed_by", "certificate_serial", "certificate_fingerprint", "auto", "allow_burned_in", "created_at", "pseudonym", "deid_study_uid")
    CONFIRMATION_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SIGNER_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_BY_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_SERIAL_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BURNED_IN_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PSEUDONYM_FIELD_NUMBER: _ClassVar[int]
    DEID_STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    confirmation_id: str
    record_json: str
    signature: bytes
    signer_certificate: bytes
    study_uid: str
    case_id: str
    destination: str
    confirmed_by: str
    certificate_serial: str
    certificate_fingerprint: str
    auto: bool
    allow_burned_in: bool
    created_at: str
    pseudonym: str
    deid_study_uid: str
    def __init__(self, confirmation_id: _Optional[str] = ..., record_json: _Optional[str] = ..., signature: _Optional[bytes] = ..., signer_certificate: _Optional[bytes] = ..., study_uid: _Optional[str] = ..., case_id: _Optional[str] = ..., destination: _Optional[str] = ..., confirmed_by: _Optional[str] = ..., certificate_serial: _Optional[str] = ..., certificate_fingerprint: _Optional[str] = ..., auto: _Optional[bool] = ..., allow_burned_in: _Optional[bool] = ..., created_at: _Optional[str] = ..., pseudonym: _Optional[str] = ..., deid_study_uid: _Optional[str] = ...) -> None: ...

class InstanceRelease(_message.Message):
    __slots__ = ("confirmation_id", "destination", "status", "reason", "deid_object_id", "deid_sop_instance_uid", "transfer_id", "transfer_status", "transfer_error")
    CONFIRMATION_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEID_OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DEID_SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_STATUS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ERROR_FIELD_NUMBER: _ClassVar[int]
    confirmation_id: str
    destination: str
    status: str
    reason: str
    deid_object_id: str
    deid_sop_instance_uid: str
    transfer_id: str
    transfer_status: str
    transfer_error: str
    def __init__(self, confirmation_id: _Optional[str] = ..., destination: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., deid_object_id: _Optional[str] = ..., deid_sop_instance_uid: _Optional[str] = ..., transfer_id: _Optional[str] = ..., transfer_status: _Optional[str] = ..., transfer_error: _Optional[str] = ...) -> None: ...

class HospitalStudyInstance(_message.Message):
    __slots__ = ("sop_instance_uid", "series_uid", "instance_number", "modality", "object_id", "burned_in", "releases")
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_UID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    BURNED_IN_FIELD_NUMBER: _ClassVar[int]
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    sop_instance_uid: str
    series_uid: str
    instance_number: int
    modality: str
    object_id: str
    burned_in: str
    releases: _containers.RepeatedCompositeFieldContainer[InstanceRelease]
    def __init__(self, sop_instance_uid: _Optional[str] = ..., series_uid: _Optional[str] = ..., instance_number: _Optional[int] = ..., modality: _Optional[str] = ..., object_id: _Optional[str] = ..., burned_in: _Optional[str] = ..., releases: _Optional[_Iterable[_Union[InstanceRelease, _Mapping]]] = ...) -> None: ...

class HospitalStudy(_message.Message):
    __slots__ = ("study", "confirmations", "instances")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    CONFIRMATIONS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    study: HospitalStudySummary
    confirmations: _containers.RepeatedCompositeFieldContainer[DataConfirmation]
    instances: _containers.RepeatedCompositeFieldContainer[HospitalStudyInstance]
    def __init__(self, study: _Optional[_Union[HospitalStudySummary, _Mapping]] = ..., confirmations: _Optional[_Iterable[_Union[DataConfirmation, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[HospitalStudyInstance, _Mapping]]] = ...) -> None: ...

class ConfirmStudyRequest(_message.Message):
    __slots__ = ("study_uid", "case_id", "destination", "allow_burned_in")
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BURNED_IN_FIELD_NUMBER: _ClassVar[int]
    study_uid: str
    case_id: str
    destination: str
    allow_burned_in: bool
    def __init__(self, study_uid: _Optional[str] = ..., case_id: _Optional[str] = ..., destination: _Optional[str] = ..., allow_burned_in: _Optional[bool] = ...) -> None: ...

class ConfirmStudyResponse(_message.Message):
    __slots__ = ("confirmation", "transfer_ids", "instances")
    CONFIRMATION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_IDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    confirmation: DataConfirmation
    transfer_ids: _containers.RepeatedScalarFieldContainer[str]
    instances: _containers.RepeatedCompositeFieldContainer[HospitalStudyInstance]
    def __init__(self, confirmation: _Optional[_Union[DataConfirmation, _Mapping]] = ..., transfer_ids: _Optional[_Iterable[str]] = ..., instances: _Optional[_Iterable[_Union[HospitalStudyInstance, _Mapping]]] = ...) -> None: ...

class ExportDesignRequest(_message.Message):
    __slots__ = ("case_id", "object_id", "again", "dry_run")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    AGAIN_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    object_id: str
    again: bool
    dry_run: bool
    def __init__(self, case_id: _Optional[str] = ..., object_id: _Optional[str] = ..., again: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ExportDesignResponse(_message.Message):
    __slots__ = ("sop_instance_uid", "study_instance_uid", "series_instance_uid", "pacs", "status", "source_series_uid")
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    PACS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SERIES_UID_FIELD_NUMBER: _ClassVar[int]
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    pacs: str
    status: int
    source_series_uid: str
    def __init__(self, sop_instance_uid: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., pacs: _Optional[str] = ..., status: _Optional[int] = ..., source_series_uid: _Optional[str] = ...) -> None: ...
