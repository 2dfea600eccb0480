from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListFactoryStudiesRequest(_message.Message):
    __slots__ = ("case_id", "limit")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    limit: int
    def __init__(self, case_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListFactoryStudiesResponse(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[FactoryStudy]
    def __init__(self, studies: _Optional[_Iterable[_Union[FactoryStudy, _Mapping]]] = ...) -> None: ...

class GetFactoryStudyRequest(_message.Message):
    __slots__ = ("study_uid", "case_id")
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    study_uid: str
    case_id: str
    def __init__(self, study_uid: _Optional[str] = ..., case_id: _Optional[str] = ...) -> None: ...

class SuitabilityThresholds(_message.Message):
    __slots__ = ("max_slice_thickness_mm", "allow_missing_slices", "spacing_tolerance_mm", "allow_gantry_tilt", "require_single_orientation", "min_slices", "gantry_tilt_tolerance_deg")
    MAX_SLICE_THICKNESS_MM_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_SLICES_FIELD_NUMBER: _ClassVar[int]
    SPACING_TOLERANCE_MM_FIELD_NUMBER: _ClassVar[int]
    ALLOW_GANTRY_TILT_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_SINGLE_ORIENTATION_FIELD_NUMBER: _ClassVar[int]
    MIN_SLICES_FIELD_NUMBER: _ClassVar[int]
    GANTRY_TILT_TOLERANCE_DEG_FIELD_NUMBER: _ClassVar[int]
    max_slice_thickness_mm: float
    allow_missing_slices: bool
    spacing_tolerance_mm: float
    allow_gantry_tilt: bool
    require_single_orientation: bool
    min_slices: int
    gantry_tilt_tolerance_deg: float
    def __init__(self, max_slice_thickness_mm: _Optional[float] = ..., allow_missing_slices: _Optional[bool] = ..., spacing_tolerance_mm: _Optional[float] = ..., allow_gantry_tilt: _Optional[bool] = ..., require_single_orientation: _Optional[bool] = ..., min_slices: _Optional[int] = ..., gantry_tilt_tolerance_deg: _Optional[float] = ...) -> None: ...

class SuitabilityResult(_message.Message):
    __slots__ = ("passed", "findings", "thresholds", "checked_at", "instance_count", "current", "thresholds_json")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_JSON_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    findings: _containers.RepeatedScalarFieldContainer[str]
    thresholds: SuitabilityThresholds
    checked_at: str
    instance_count: int
    current: bool
    thresholds_json: str
    def __init__(self, passed: _Optional[bool] = ..., findings: _Optional[_Iterable[str]] = ..., thresholds: _Optional[_Union[SuitabilityThresholds, _Mapping]] = ..., checked_at: _Optional[str] = ..., instance_count: _Optional[int] = ..., current: _Optional[bool] = ..., thresholds_json: _Optional[str] = ...) -> None: ...

class SeriesAnalysis(_message.Message):
    __slots__ = ("series_uid", "instance_count", "orientation_consistent", "slice_thickness_mm", "spacing_min_mm", "spacing_max_mm", "spacing_median_mm", "spacing_uniform", "missing_slices_estimate", "duplicate_positions", "gantry_tilt_deg", "passed", "findings", "report")
    SERIES_UID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    ORIENTATION_CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    SLICE_THICKNESS_MM_FIELD_NUMBER: _ClassVar[int]
    SPACING_MIN_MM_FIELD_NUMBER: _ClassVar[int]
    SPACING_MAX_MM_FIELD_NUMBER: _ClassVar[int]
    SPACING_MEDIAN_MM_FIELD_NUMBER: _ClassVar[int]
    SPACING_UNIFORM_FIELD_NUMBER: _ClassVar[int]
    MISSING_SLICES_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    GANTRY_TILT_DEG_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    series_uid: str
    instance_count: int
    orientation_consistent: bool
    slice_thickness_mm: _containers.RepeatedScalarFieldContainer[float]
    spacing_min_mm: float
    spacing_max_mm: float
    spacing_median_mm: float
    spacing_uniform: bool
    missing_slices_estimate: int
    duplicate_positions: int
    gantry_tilt_deg: float
    passed: bool
    findings: _containers.RepeatedScalarFieldContainer[str]
    report: str
    def __init__(self, series_uid: _Optional[str] = ..., instance_count: _Optional[int] = ..., orientation_consistent: _Optional[bool] = ..., slice_thickness_mm: _Optional[_Iterable[float]] = ..., spacing_min_mm: _Optional[float] = ..., spacing_max_mm: _Optional[float] = ..., spacing_median_mm: _Optional[float] = ..., spacing_uniform: _Optional[bool] = ..., missing_slices_estimate: _Optional[int] = ..., duplicate_positions: _Optional[int] = ..., gantry_tilt_deg: _Optional[float] = ..., passed: _Optional[bool] = ..., findings: _Optional[_Iterable[str]] = ..., report: _Optional[str] = ...) -> None: ...

class FactoryStudy(_message.Message):
    __slots__ = ("case_id", "study_uid", "instance_count", "series_count", "first_received_at", "last_received_at", "suitability", "series", "instances")
    CASE_ID_FIELD_NUMBER: _ClassVar[int]
    STUDY_UID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SERIES_COUNT_FIELD_NUMBER: _ClassVar[int]
    FIRST_RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    SUITABILITY_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    case_id: str
    study_uid: str
    instance_count: int
    series_count: int
    first_received_at: str
    last_received_at: str
    suitability: SuitabilityResult
    series: _containers.RepeatedCompositeFieldContainer[SeriesAnalysis]
    instances: _containers.RepeatedCompositeFieldContainer[FactoryInstance]
    def __init__(self, case_id: _Optional[str] = ..., study_uid: _Optional[str] = ..., instance_count: _Optional[int] = ..., series_count: _Optional[int] = ..., first_received_at: _Optional[str] = ..., last_received_at: _Optional[str] = ..., suitability: _Optional[_Union[SuitabilityResult, _Mapping]] = ..., series: _Optional[_Iterable[_Union[SeriesAnalysis, _Mapping]]] = ..., instances: _Optional[_Iterable[_Union[FactoryInstance, _Mapping]]] = ...) -> None: ...

class FactoryInstance(_message.Message):
    __slots__ = ("object_id", "series_uid", "sop_instance_uid")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    series_uid: str
    sop_instance_uid: str
    def __init__(self, object_id: _Optional[str] = ..., series_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ...) -> None: ...
