"""The de-identification engine: per-attribute table test, geometry, UIDs, dates, send scan."""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import time
import warnings
from datetime import date, timedelta

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from gateway.errors import ConfigError, IntegrityError, ValidationError
from gateway.fidelity.dicom import geometry_hash, pixel_hash
from hospital_node.deid import (
    BurnedInAnnotationHeld,
    Deidentifier,
    scan_for_identifiers,
)
from hospital_node.deid.engine import DATE_OFFSET_RANGE, DeidRefused, shift_datetime
from hospital_node.deid.profile import (
    Action,
    ConfidentialityProfile,
    TableRow,
    Treatment,
    default_profile,
    dictionary_vr,
)
from tests.dicom_factory import (
    CONTAINER,
    IDENTIFYING_STRINGS,
    INNER,
    PATIENT_BIRTH_DATE,
    PATIENT_NAME,
    SeriesInfo,
    StudyInfo,
    base_dataset,
    ct_series,
    ct_slice,
    encapsulated_ct,
    enhanced_ct,
    plant,
    sequence_token,
    to_part10,
    token_for,
    values_at,
)

KEY = b"federation-test-key-0123456789abcdef"
OTHER_KEY = b"another-federation-key-fedcba9876543210"
CASE = "CASE-2024-0001"
DEID = Deidentifier(KEY)


def deid(ds: Dataset, **kw: bool) -> Dataset:
    return DEID.deidentify(ds, CASE, **kw).dataset


def one_slice(**kw: object) -> Dataset:
    return next(ct_series(2, **kw))  # type: ignore[arg-type]


# --- per-attribute test generated from Table E.1-1 --------------------------------------

PROFILE = default_profile()
ROWS = PROFILE.concrete_rows()
assert PROFILE.lookup(CONTAINER) is None and PROFILE.lookup(INNER) is None


def _row_id(row: TableRow) -> str:
    return f"{row.tag:08X}-{row.name}".replace(" ", "_")


ACTED = [r for r in ROWS if r.action is not Action.KEEP]
KEPT = [r for r in ROWS if r.action is Action.KEEP]


def _kept_by_design(row: TableRow, vr: str) -> bool:
    """C on TM: dates move by whole days, so times of day are kept unchanged."""
    return row.action is Action.CLEAN and vr == "TM"


@pytest.mark.parametrize("row", ACTED, ids=_row_id)
def test_attribute_acted_on_leaves_no_trace(row: TableRow) -> None:
    assert row.tag is not None
    i = ROWS.index(row)
    vr = dictionary_vr(row.tag)
    ds = base_dataset()
    value: object
    if vr == "SQ":
        # U sequences keep their non-UID content by design: follow the UID only
        value, needles = sequence_token(i, uid_only=row.action is Action.UID)
    else:
        value, needle = token_for(vr, i)
        needles = [needle] if needle else []
    plant(ds, row.tag, vr, value)

    if vr == "SQ" and default_profile().treatment(row.tag, vr, in_clean_sequence=False)[
        0
    ] is Treatment.REFUSE:
        # a plain-D sequence with items: no valid dummy exists, the instance is refused
        with pytest.raises(DeidRefused, match=r"holds \d+ item\(s\).*not released"):
            DEID.deidentify(ds, CASE)
        return
    result = DEID.deidentify(ds, CASE)
    data = to_part10(result.dataset)
    back = dcmread(io.BytesIO(data))
    assert not [t for t in back.iterall() if t.tag & 0x00010000], "private left"

    if _kept_by_design(row, vr):
        assert values_at(back, row.tag) == [value, value, value]
        return
    for needle in needles:
        assert needle not in data
    if vr != "SQ":
        assert all(v != value for v in values_at(back, row.tag))
    assert scan_for_identifiers(back, CASE) == []


@pytest.mark.parametrize("row", KEPT, ids=_row_id)
def test_retained_patient_characteristic_is_kept(row: TableRow) -> None:
    assert row.tag is not None
    vr = dictionary_vr(row.tag)
    # Free text is kept only as far as the descriptor allowlist allows (a retained
    # characteristic must not smuggle a name through); formatted values when well-formed.
    value = {"AS": "047Y", "DS": "61.5", "CS": "F", "US": 4}.get(vr, "BONE")
    ds = base_dataset()
    plant(ds, row.tag, vr, value)
    back = dcmread(io.BytesIO(to_part10(deid(ds))))
    assert [str(v) for v in values_at(back, row.tag)] == [str(value)] * 3
    if vr in {"SH", "LO", "ST", "LT", "UT", "UC"}:
        ds = base_dataset()
        plant(ds, row.tag, vr, "TOKQK")
        data = to_part10(deid(ds))
        assert b"TOKQK" not in data


def test_characteristics_from_the_factory_survive() -> None:
    out = deid(one_slice())
    assert (out.PatientSex, out.PatientAge, out.PatientSize, out.PatientWeight) == (
        "F",
        "047Y",
        1.62,
        58.5,
    )


@pytest.mark.parametrize("tag_value", [0x50000010, 0x501E3000, 0x60003000, 0x60024000])
def test_curve_and_overlay_ranges_are_removed(tag_value: int) -> None:
    ds = base_dataset()
    ds.add_new(
        tag_value,
        "OB" if tag_value & 0xFFFF == 0x3000 else "LT",
        b"TOKQRANGE0" if tag_value & 0xFFFF == 0x3000 else "TOKQRANGE0",
    )
    ds.add_new(0x60000010, "US", 4)  # Overlay Rows: removed with the whole overlay
    out = deid(ds)
    assert tag_value not in out and b"TOKQRANGE0" not in to_part10(out)
    assert 0x60000010 not in out


# --- the factory's realistic instances ---------------------------------------------------


def test_nothing_planted_by_the_factory_leaks() -> None:
    slices = list(ct_series(3))
    for ds in [*slices, enhanced_ct(), encapsulated_ct()]:
        data = DEID.deidentify_bytes(to_part10(ds), CASE)
        leaks = [s for s in IDENTIFYING_STRINGS if s.encode() in data]
        assert leaks == []
        back = dcmread(io.BytesIO(data))
        assert back.PatientName == CASE and back.PatientID == CASE
        assert back.PatientIdentityRemoved == "YES"
        assert back.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [i.CodeValue for i in back.DeidentificationMethodCodeSequence] == [
            "113100",
            "113107",
            "113108",
            "113105",
        ]
        assert all(
            i.CodingSchemeDesignator == "DCM" for i in back.DeidentificationMethodCodeSequence
        )
        assert "2024b" in back.DeidentificationMethod[0]
        assert all(len(v) <= 64 for v in back.DeidentificationMethod)
        assert scan_for_identifiers(back, CASE) == []


def test_descriptors_are_cleaned_not_dropped() -> None:
    out = deid(one_slice())
    assert out.SeriesDescription == "AXIAL 1.0 BONE"
    assert out.StudyDescription == "CT KNEE LEFT W/O CONTRAST DR X"
    item = out.RequestAttributesSequence[0]
    assert item.RequestedProcedureDescription == "CT KNEE LEFT X X X"
    assert "RequestedProcedureID" not in item and "ScheduledProcedureStepID" not in item
    assert out.AnatomicRegionSequence[0].CodeValue == "72696002"
    assert out.InstitutionName == "X" and out.ReferringPhysicianName == ""
    assert out.PatientBirthDate == ""
    assert "OtherPatientIDsSequence" not in out and len(out.ReferencedStudySequence) == 0


def test_input_dataset_is_not_modified() -> None:
    ds = one_slice()
    before = to_part10(ds)
    deid(ds)
    assert to_part10(ds) == before


# --- geometry is sacred ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [one_slice, enhanced_ct, encapsulated_ct],
    ids=["native", "enhanced-multiframe", "encapsulated-rle"],
)
def test_geometry_and_pixels_unchanged(make: object) -> None:
    ds = make()  # type: ignore[operator]
    result = DEID.deidentify(ds, CASE)
    assert result.geometry_hash == geometry_hash(ds)
    assert result.pixel_hash == pixel_hash(ds)
    back = dcmread(io.BytesIO(to_part10(result.dataset)))
    assert geometry_hash(back) == geometry_hash(ds) and pixel_hash(back) == pixel_hash(ds)


def test_geometry_hash_sees_every_geometry_attribute() -> None:
    ds = enhanced_ct()
    reference = geometry_hash(ds)
    changed = copy.deepcopy(ds)
    changed.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0].ImagePositionPatient[2] = (
        "99.0"
    )
    assert geometry_hash(changed) != reference
    changed = copy.deepcopy(ds)
    changed.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = "0.6"
    assert geometry_hash(changed) != reference
    native = one_slice()
    for keyword, value in [
        ("Rows", 63),
        ("PixelSpacing", ["0.5", "0.488281"]),
        ("RescaleIntercept", "-1000"),
        ("GantryDetectorTilt", "1"),
    ]:
        other = copy.deepcopy(native)
        setattr(other, keyword, value)
        assert geometry_hash(other) != geometry_hash(native), keyword
    other = copy.deepcopy(native)
    other.PixelData = native.PixelData[:-1] + b"\x01"
    assert pixel_hash(other) != pixel_hash(native)


def test_a_change_to_geometry_raises_integrity_error() -> None:
    class Tampering(ConfidentialityProfile):
        def treatment(self, tag: int, vr: str, *, in_clean_sequence: bool) -> tuple[Treatment, str]:
            if tag == 0x00180050:  # Slice Thickness
                return Treatment.EMPTY, "Z"
            return super().treatment(tag, vr, in_clean_sequence=in_clean_sequence)

    tampering = Deidentifier(KEY)
    tampering.profile = Tampering()
    with pytest.raises(IntegrityError, match="geometry"):
        tampering.deidentify(one_slice(), CASE)


# --- UIDs --------------------------------------------------------------------------------


def test_uid_mapping_is_keyed_hmac_under_2_25() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1.1"
    digest = hmac.new(KEY, b"yigong.deid.uid.v1\x00" + uid.encode(), hashlib.sha256).digest()
    expected = "2.25." + str(int.from_bytes(digest[:16], "big"))
    assert DEID.map_uid(uid) == expected and len(expected) <= 64
    assert Deidentifier(OTHER_KEY).map_uid(uid) != expected
    assert DEID.map_uid(CTImageStorage) == CTImageStorage  # well-known UIDs are kept


def test_uids_consistent_within_and_across_studies_of_one_patient() -> None:
    for_uid = "1.2.826.0.1.3680043.8.498.55.1"  # same fixation frame in both studies
    first = list(ct_series(3, study=StudyInfo(), series=SeriesInfo(frame_of_reference_uid=for_uid)))
    second_study = StudyInfo(study_date="20240610")
    follow_up = ct_slice(
        0,
        study=second_study,
        series=SeriesInfo(frame_of_reference_uid=for_uid),
        previous_sop_uid=first[2].SOPInstanceUID,
    )  # derived from study 1
    out1 = [DEID.deidentify(ds, CASE) for ds in first]
    out2 = DEID.deidentify(follow_up, CASE).dataset

    assert len({r.dataset.StudyInstanceUID for r in out1}) == 1
    assert len({r.dataset.SeriesInstanceUID for r in out1}) == 1
    assert (
        out1[1].dataset.ReferencedImageSequence[0].ReferencedSOPInstanceUID == out1[0].new_sop_uid
    )
    assert out1[2].dataset.SourceImageSequence[0].ReferencedSOPInstanceUID == out1[1].new_sop_uid
    assert out2.SourceImageSequence[0].ReferencedSOPInstanceUID == out1[2].new_sop_uid
    assert out2.FrameOfReferenceUID == out1[0].dataset.FrameOfReferenceUID
    assert out2.StudyInstanceUID != out1[0].dataset.StudyInstanceUID
    for r in out1:
        assert r.new_sop_uid.startswith("2.25.") and r.new_sop_uid != r.original_sop_uid
        assert r.dataset.RequestAttributesSequence[0].StudyInstanceUID == r.dataset.StudyInstanceUID
        assert r.dataset.SOPClassUID == CTImageStorage

    again = DEID.deidentify(first[0], CASE)
    assert to_part10(again.dataset) == to_part10(out1[0].dataset)
    other = Deidentifier(OTHER_KEY).deidentify(first[0], CASE)
    assert other.new_sop_uid != out1[0].new_sop_uid
    assert other.dataset.FrameOfReferenceUID != out1[0].dataset.FrameOfReferenceUID


# --- dates -------------------------------------------------------------------------------


def _day(value: str) -> date:
    return date(int(value[:4]), int(value[4:6]), int(value[6:8]))


def test_date_shift_preserves_intervals_across_studies() -> None:
    first = DEID.deidentify(one_slice(study=StudyInfo(study_date="20240315")), CASE).dataset
    second = DEID.deidentify(one_slice(study=StudyInfo(study_date="20240610")), CASE).dataset
    offset = DEID.date_offset_days(CASE)
    assert DATE_OFFSET_RANGE[0] <= offset <= DATE_OFFSET_RANGE[1]
    assert _day(first.StudyDate) == date(2024, 3, 15) + timedelta(days=offset)
    assert (_day(second.StudyDate) - _day(first.StudyDate)).days == 87
    assert first.AcquisitionDateTime[:8] == first.StudyDate
    assert first.AcquisitionDateTime[8:] == "093505.250000"  # the UTC offset is dropped
    assert first.StudyTime == "093012" and first.AcquisitionTime == "093505.250"
    assert first.PatientBirthDate == "" and PATIENT_BIRTH_DATE not in str(first)
    offsets = {Deidentifier(KEY).date_offset_days(f"CASE-{n}") for n in range(20)}
    assert len(offsets) > 10
    enhanced = DEID.deidentify(enhanced_ct(study=StudyInfo(study_date="20240315")), CASE)
    frame = enhanced.dataset.PerFrameFunctionalGroupsSequence[1].FrameContentSequence[0]
    assert frame.FrameAcquisitionDateTime[:8] == first.StudyDate


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024", "2024"),
        ("202403", "202402"),
        ("20240315", "20240214"),
        ("2024+0800", "2024"),  # a UTC offset would tell the season of the real date
        ("20240315101500.5-0500", "20240214101500.5"),
        ("nonsense", None),
        ("", ""),
    ],
)
def test_datetime_shift_keeps_precision(value: str, expected: str | None) -> None:
    assert shift_datetime(value, -30) == expected


def test_unparseable_date_becomes_the_fixed_dummy() -> None:
    ds = base_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom rightly warns about the invalid input
        ds.StudyDate = "15/03/2024"
    assert deid(ds).StudyDate == "19000101"


# --- burned-in annotation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes"),
    [
        {"BurnedInAnnotation": "YES"},
        {"Modality": "US", "BurnedInAnnotation": None},
        {"Modality": "OT", "BurnedInAnnotation": ""},
        {"SOPClassUID": SecondaryCaptureImageStorage, "BurnedInAnnotation": None},
    ],
    ids=["flag-yes", "us-unflagged", "ot-empty-flag", "secondary-capture"],
)
def test_burned_in_is_held_back_unless_allowed(changes: dict[str, str | None]) -> None:
    ds = one_slice()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with pytest.raises(BurnedInAnnotationHeld) as info:
        DEID.deidentify(ds, CASE)
    assert isinstance(info.value, ValidationError)
    message = str(info.value)
    assert ds.SOPInstanceUID in message
    assert not [s for s in IDENTIFYING_STRINGS if s in message]
    out = DEID.deidentify(ds, CASE, allow_burned_in=True).dataset
    assert scan_for_identifiers(out, CASE) == []


def test_explicit_no_lets_secondary_capture_through() -> None:
    ds = one_slice()
    ds.Modality = "SC"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.BurnedInAnnotation = "NO"
    DEID.deidentify(ds, CASE)


# --- scan_for_identifiers ----------------------------------------------------------------


def test_scan_reports_each_leftover_of_a_raw_instance() -> None:
    ds = list(ct_series(2))[1]
    findings = scan_for_identifiers(ds, CASE)
    text = "\n".join(findings)
    for expected in (
        "(0010,0010) PatientName",
        "(0010,0020) PatientID",
        "(0010,0030) PatientBirthDate",
        "(0008,0050) AccessionNumber",
        "(0008,0080) InstitutionName",
        "(0008,0018) SOPInstanceUID",
        "(0020,0052) FrameOfReferenceUID",
        "(0008,1030) StudyDescription",
        "(0008,0020) StudyDate",
        "(0009,1001) private",
        "(0029,0010) private",
        "(0040,0275)[0].(0040,1001) RequestedProcedureID",
        "(0008,1140)[0].(0008,1155) ReferencedSOPInstanceUID",
        "(0010,1002) OtherPatientIDsSequence",
        "(0012,0062) PatientIdentityRemoved",
        "(0012,0064) DeidentificationMethodCodeSequence",
        "file meta (0002,0016) SourceApplicationEntityTitle",
    ):
        assert expected in text, expected
    for planted in (*IDENTIFYING_STRINGS, ds.SOPInstanceUID, ds.StudyDate):
        assert planted not in text  # findings never carry values


@pytest.mark.parametrize(
    ("mutate", "every", "some"),
    [
        (
            lambda d: d.private_block(0x0019, "ACME", create=True).add_new(1, "LO", "x"),
            "private attribute present",
            "(0019,1001) private",
        ),
        (lambda d: setattr(d, "PatientName", "SOMEONE^ELSE"), "(0010,0010) PatientName", ""),
        (lambda d: setattr(d, "PatientID", "CASE-2024-0002"), "(0010,0020) PatientID", ""),
        (lambda d: setattr(d, "SeriesInstanceUID", "1.2.3.4"), "(0020,000E) SeriesInst", ""),
        (lambda d: setattr(d, "SeriesDescription", "AXIAL JANE"), "(0008,103E)", ""),
        (lambda d: setattr(d, "PatientIdentityRemoved", "NO"), "(0012,0062)", ""),
        (lambda d: setattr(d, "AccessionNumber", "A1"), "(0008,0050) AccessionNumber", ""),
        (lambda d: setattr(d, "EvaluatorName", "DOE^J"), "(0014,2006) EvaluatorName", ""),
        (
            lambda d: setattr(d.RequestAttributesSequence[0], "RequestedProcedureID", "RP1"),
            "(0040,0275)[0].(0040,1001) RequestedProcedureID",
            "",
        ),
        (
            lambda d: setattr(d.SourceImageSequence[0], "ReferencedSOPInstanceUID", "1.2.3"),
            "(0008,2112)[0].(0008,1155)",
            "",
        ),
        (
            lambda d: setattr(d, "LongitudinalTemporalInformationModified", "UNMODIFIED"),
            "dates are not declared MODIFIED",
            "(0008,0020) StudyDate",
        ),
    ],
)
def test_scan_reports_a_single_planted_leftover(mutate: object, every: str, some: str) -> None:
    out = DEID.deidentify(list(ct_series(2))[1], CASE).dataset
    assert scan_for_identifiers(out, CASE) == []
    mutate(out)  # type: ignore[operator]
    findings = scan_for_identifiers(out, CASE)
    assert findings and all(every in f for f in findings), findings
    assert any(some in f for f in findings)


# --- Part-10 bytes -----------------------------------------------------------------------


def _with_syntax(ds: Dataset, syntax: str) -> Dataset:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


@pytest.mark.parametrize(
    "make",
    [
        lambda: _with_syntax(one_slice(), ExplicitVRLittleEndian),
        lambda: _with_syntax(one_slice(), ImplicitVRLittleEndian),
        encapsulated_ct,
    ],
    ids=["explicit-le", "implicit-le", "rle-encapsulated"],
)
def test_deidentify_bytes_keeps_syntax_and_pixel_bytes(make: object) -> None:
    source = make()  # type: ignore[operator]
    data = to_part10(source)
    parsed = dcmread(io.BytesIO(data))
    out, result = DEID.deidentify_part10(data, CASE)
    back = dcmread(io.BytesIO(out))
    assert back.file_meta.TransferSyntaxUID == parsed.file_meta.TransferSyntaxUID
    assert back.PixelData == parsed.PixelData and parsed.PixelData in out
    assert pixel_hash(back) == pixel_hash(parsed) == result.pixel_hash
    assert geometry_hash(back) == geometry_hash(parsed) == result.geometry_hash
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID == result.new_sop_uid
    assert back.file_meta.MediaStorageSOPClassUID == parsed.SOPClassUID
    assert "SourceApplicationEntityTitle" not in back.file_meta
    assert back.preamble == b"\x00" * 128
    assert result.original_sop_uid == parsed.SOPInstanceUID
    assert scan_for_identifiers(back, CASE) == []
    if parsed.file_meta.TransferSyntaxUID == RLELossless:
        assert data.count(parsed.PixelData) == 1 and out.count(parsed.PixelData) == 1


def test_bad_inputs_are_validation_errors() -> None:
    with pytest.raises(ValidationError):
        DEID.deidentify_bytes(b"not dicom at all" * 20, CASE)
    with pytest.raises(ValidationError):
        DEID.deidentify(one_slice(), "DOE^JANE")
    with pytest.raises(ValidationError):
        DEID.deidentify(one_slice(), "")
    with pytest.raises(ConfigError):
        Deidentifier(b"short")
    assert "federation" not in repr(DEID)


# --- scale -------------------------------------------------------------------------------


def test_300_slice_512_series() -> None:
    start = time.perf_counter()
    study, series = StudyInfo(), SeriesInfo()
    study_uids, sop_uids = set(), set()
    previous_new = None
    for ds in ct_series(300, rows=512, cols=512, study=study, series=series):
        result = DEID.deidentify(ds, CASE)
        out = result.dataset
        assert result.geometry_hash == geometry_hash(ds)
        assert len(out.PixelData) == 512 * 512 * 2
        if previous_new is not None:
            assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == previous_new
        previous_new = result.new_sop_uid
        study_uids.add(out.StudyInstanceUID)
        sop_uids.add(result.new_sop_uid)
    assert len(study_uids) == 1 and len(sop_uids) == 300
    assert PATIENT_NAME not in str(out)
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize(
    ("keyword", "bad", "good"),
    [
        ("PatientAge", "Jane Doe age", "045Y"),
        ("PatientSex", "Wang Wei", "F"),
    ],
)
def test_retained_characteristics_must_be_well_formed(keyword: str, bad: str, good: str) -> None:
    """Retain Patient Characteristics keeps values, not free text hiding in them."""
    deid = DEID
    for value, kept in ((bad, False), (good, True)):
        ds = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
        setattr(ds, keyword, value)
        out = deid.deidentify(ds, CASE).dataset
        got = str(getattr(out, keyword, "") or "")
        assert (got.strip() == value) is kept, (keyword, value, got)
        assert scan_for_identifiers(out, CASE) == []
    raw = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
    setattr(raw, keyword, bad)
    assert any(keyword in f for f in scan_for_identifiers(raw, CASE))


def test_invalid_values_are_not_echoed_in_warnings(caplog: pytest.LogCaptureFixture) -> None:
    """pydicom's value validation would log the value (patient data): it is off."""
    raw = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
    raw.add_new(0x00101010, "AS", "Jane Doe age")  # Patient's Age, not an age
    data = to_part10(raw)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("DEBUG"):
        warnings.simplefilter("always")
        back = dcmread(io.BytesIO(data))
        _ = back.PatientAge
        DEID.deidentify(back, CASE)
    text = " ".join(str(w.message) for w in caught) + caplog.text
    assert "Jane Doe" not in text
