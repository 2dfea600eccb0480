"""The raw-bytes fast path of deidentify_part10 is equivalent to the engine.

Every case runs both paths on the same Part-10 bytes: the fast path directly
(``deidentify_part10_fast``, which must not decline) and the engine
(``Deidentifier(..., fast=False)``). Their outputs, parsed with pydicom, must be equal
element by element (tag, VR, value; sequences recursively; the file meta and the
preamble too), and so must every field of the DeidResult. Inputs the fast path must
not handle are checked to raise FastPathUnsupported and to give the engine's result
through the default (fast-first) entry point.
"""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Callable

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from gateway.errors import IntegrityError, ValidationError
from hospital_node.deid import BurnedInAnnotationHeld, Deidentifier, scan_for_identifiers
from hospital_node.deid import engine as engine_module
from hospital_node.deid import transform as transform_module
from hospital_node.deid.engine import DeidRefused
from hospital_node.deid.fast import FastPathUnsupported, deidentify_part10_fast
from hospital_node.deid.profile import Action, TableRow, Treatment, default_profile, dictionary_vr
from tests.dicom_factory import (
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
)
from tests.test_deid_engine import ACTED, KEPT, ROWS, _row_id

KEY = b"federation-test-key-0123456789abcdef"
CASE = "CASE-2024-0001"
FAST = Deidentifier(KEY)
SLOW = Deidentifier(KEY, fast=False)


# --- comparison --------------------------------------------------------------------------


def assert_same_dataset(a: Dataset, b: Dataset, path: str = "") -> None:
    """Equal element by element: same tags, VRs and values; sequences recursively."""
    assert sorted(a.keys()) == sorted(b.keys()), f"{path}: tags differ"
    for tag in sorted(a.keys()):
        ea, eb = a[tag], b[tag]
        where = f"{path}({tag >> 16:04X},{tag & 0xFFFF:04X})"
        assert ea.VR == eb.VR, f"{where}: VR {ea.VR} != {eb.VR}"
        if ea.VR == "SQ":
            items_a, items_b = list(ea.value or ()), list(eb.value or ())
            assert len(items_a) == len(items_b), f"{where}: item count"
            for i, (ia, ib) in enumerate(zip(items_a, items_b, strict=True)):
                assert_same_dataset(ia, ib, f"{where}[{i}].")
        else:
            assert ea.value == eb.value, f"{where}: values differ"
            assert type(ea.value) is type(eb.value) or ea.is_empty, f"{where}: value types"


def assert_same_file(out_fast: bytes, out_slow: bytes) -> None:
    fa, fb = dcmread(io.BytesIO(out_fast)), dcmread(io.BytesIO(out_slow))
    assert fa.preamble == fb.preamble
    assert_same_dataset(fa.file_meta, fb.file_meta, "meta ")
    assert_same_dataset(fa, fb)


def check_equivalent(data: bytes, *, allow_burned_in: bool = False) -> bytes:
    """Run both paths on ``data``; the fast path must handle it; everything must agree."""
    out_fast, res_fast = deidentify_part10_fast(FAST, data, CASE, allow_burned_in=allow_burned_in)
    out_slow, res_slow = SLOW.deidentify_part10(data, CASE, allow_burned_in=allow_burned_in)
    if out_fast != out_slow:
        assert_same_file(out_fast, out_slow)
    assert res_fast.original_sop_uid == res_slow.original_sop_uid
    assert res_fast.new_sop_uid == res_slow.new_sop_uid
    assert res_fast.geometry_hash == res_slow.geometry_hash
    assert res_fast.pixel_hash == res_slow.pixel_hash
    assert dict(res_fast.actions_applied) == dict(res_slow.actions_applied)
    # the returned data set is the output as pydicom reads it
    back = dcmread(io.BytesIO(out_fast))
    assert_same_dataset(res_fast.dataset, back)
    assert_same_dataset(res_fast.dataset.file_meta, back.file_meta, "meta ")
    # and the default entry point takes the fast path and gives the same bytes
    assert FAST.deidentify_part10(data, CASE, allow_burned_in=allow_burned_in)[0] == out_fast
    return out_fast


def check_fallback(data: bytes) -> None:
    """The fast path declines ``data``; the default entry point behaves like the engine."""
    with pytest.raises(FastPathUnsupported):
        deidentify_part10_fast(FAST, data, CASE, allow_burned_in=False)
    try:
        expected: tuple[bytes, object] | BaseException = SLOW.deidentify_part10(data, CASE)
    except (ValidationError, IntegrityError) as exc:
        expected = exc
    if isinstance(expected, BaseException):
        with pytest.raises(type(expected)):
            FAST.deidentify_part10(data, CASE)
        return
    out, result = FAST.deidentify_part10(data, CASE)
    assert out == expected[0]  # the engine's own output, byte for byte
    assert result.new_sop_uid == expected[1].new_sop_uid  # type: ignore[attr-defined]


def check_same_refusal(data: bytes) -> str:
    """Both paths refuse ``data`` with the same DeidRefused message; returns it."""
    with pytest.raises(DeidRefused) as fast_exc:
        deidentify_part10_fast(FAST, data, CASE, allow_burned_in=False)
    with pytest.raises(DeidRefused) as slow_exc:
        SLOW.deidentify_part10(data, CASE)
    assert str(fast_exc.value) == str(slow_exc.value)
    return str(slow_exc.value)


# --- (a) the per-attribute cases of test_deid_engine, through both paths -------------------


def _acted_case(row: TableRow) -> bytes:
    assert row.tag is not None
    i = ROWS.index(row)
    vr = dictionary_vr(row.tag)
    ds = base_dataset()
    value: object
    if vr == "SQ":
        value, _needles = sequence_token(i, uid_only=row.action is Action.UID)
    else:
        value, _needle = token_for(vr, i)
    plant(ds, row.tag, vr, value)
    return part10_any(ds)


def part10_any(ds: Dataset) -> bytes:
    """Part-10 bytes even for command/file-meta group elements in the body (which
    dcmwrite refuses): preamble, meta, then the data set as it is."""
    if not any(tag >> 16 in (0x0000, 0x0002) for tag in ds.keys()):
        return to_part10(ds)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("row", ACTED, ids=_row_id)
def test_acted_attribute_equivalent(row: TableRow) -> None:
    assert row.tag is not None
    if row.tag >> 16 == 0x0002 or dictionary_vr(row.tag) == "UN":
        # a file-meta element in the body duplicates the meta; a UN value is opaque
        check_fallback(_acted_case(row))
        return
    vr = dictionary_vr(row.tag)
    if default_profile().treatment(row.tag, vr, in_clean_sequence=False)[0] is Treatment.REFUSE:
        check_same_refusal(_acted_case(row))
        return
    out = check_equivalent(_acted_case(row))
    assert scan_for_identifiers(dcmread(io.BytesIO(out)), CASE) == []


@pytest.mark.parametrize("row", KEPT, ids=_row_id)
def test_kept_attribute_equivalent(row: TableRow) -> None:
    assert row.tag is not None
    vr = dictionary_vr(row.tag)
    value = {"AS": "047Y", "DS": "61.5", "CS": "F", "US": 4}.get(vr, "BONE")
    ds = base_dataset()
    plant(ds, row.tag, vr, value)
    check_equivalent(to_part10(ds))
    if vr in {"SH", "LO", "ST", "LT", "UT", "UC"}:
        ds = base_dataset()
        plant(ds, row.tag, vr, "TOKQK")
        check_equivalent(to_part10(ds))


@pytest.mark.parametrize("tag_value", [0x50000010, 0x501E3000, 0x60003000, 0x60024000])
def test_curve_and_overlay_ranges_equivalent(tag_value: int) -> None:
    ds = base_dataset()
    is_ob = tag_value & 0xFFFF == 0x3000
    ds.add_new(tag_value, "OB" if is_ob else "LT", b"TOKQRANGE0" if is_ob else "TOKQRANGE0")
    ds.add_new(0x60000010, "US", 4)
    check_equivalent(to_part10(ds))


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientAge", "Jane Doe age"),
        ("PatientAge", "045Y"),
        ("PatientSex", "Wang Wei"),
        ("PatientSex", "F"),
        ("StudyDate", "not a date"),
        ("AcquisitionDateTime", "2024"),
        ("AcquisitionDateTime", "20240315101500.123+0800"),
        ("AcquisitionDateTime", "garbage"),
        ("PatientIdentityRemoved", "NO"),
        ("DeidentificationMethod", "SOMETHING ELSE"),
        ("LongitudinalTemporalInformationModified", "UNMODIFIED"),
        ("StudyDescription", ""),
        ("PatientName", ""),
    ],
)
def test_odd_values_equivalent(keyword: str, value: str) -> None:
    ds = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
    setattr(ds, keyword, value)
    check_equivalent(to_part10(ds))


def test_missing_patient_name_and_id_equivalent() -> None:
    ds = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
    del ds.PatientName
    del ds.PatientID
    check_equivalent(to_part10(ds))


def test_trailing_padding_equivalent() -> None:
    data = to_part10(_slice())
    check_equivalent(data + _element(0xFFFC, 0xFFFC, b"OB", b"\x00" * 6))


def test_character_set_equivalent() -> None:
    ds = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "CT 膝关节 王医生"
    ds.PatientName = "王^小明"
    ds.InstitutionName = "北京 医院"
    check_equivalent(to_part10(ds))


# --- (b) the factory's realistic instances -------------------------------------------------


@pytest.mark.parametrize(("rows", "cols"), [(64, 64), (128, 96), (512, 512)])
def test_ct_series_equivalent(rows: int, cols: int) -> None:
    study, series = StudyInfo(), SeriesInfo()
    for ds in ct_series(3, rows=rows, cols=cols, study=study, series=series):
        check_equivalent(to_part10(ds))


def test_enhanced_multiframe_equivalent() -> None:
    check_equivalent(to_part10(enhanced_ct()))
    check_equivalent(to_part10(enhanced_ct(frames=7, rows=8, cols=12)))


def test_nested_sequences_equivalent() -> None:
    ds = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
    inner = Dataset()
    inner.StudyDescription = "INNER DR WANG"
    inner.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99.1"
    inner.ContentDate = "20240101"
    inner.PersonName = "DOE^JANE"
    middle = Dataset()
    middle.ReferencedImageSequence = Sequence([inner, copy.deepcopy(inner)])
    middle.AccessionNumber = "ACC-1"
    middle.InstitutionCodeSequence = Sequence([Dataset()])  # an empty item, X/Z/D
    ds.add_new(0x00081115, "SQ", Sequence([middle]))  # Referenced Series: recursed
    ds.add_new(0x00400275, "SQ", Sequence([copy.deepcopy(middle)]))  # Request Attributes
    ds.add_new(0x00081140, "SQ", Sequence([]))  # an empty sequence
    check_equivalent(to_part10(ds))


def _undefined_length_sequences(data: bytes) -> bytes:
    """Re-write ``data`` with every sequence and item of undefined length (via pydicom)."""
    ds = dcmread(io.BytesIO(data))
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
    return to_part10(ds)


def test_undefined_length_sequences_equivalent() -> None:
    data = to_part10(ct_slice(0, study=StudyInfo(), series=SeriesInfo()))
    undefined = _undefined_length_sequences(data)
    assert b"\xfe\xff\xdd\xe0" in undefined and b"\xfe\xff\x0d\xe0" in undefined
    check_equivalent(undefined)
    check_equivalent(_undefined_length_sequences(to_part10(enhanced_ct())))


@pytest.mark.parametrize(
    "changes",
    [
        {"BurnedInAnnotation": "YES"},
        {"Modality": "US", "BurnedInAnnotation": None},
        {"Modality": "OT", "BurnedInAnnotation": ""},
        {"SOPClassUID": SecondaryCaptureImageStorage, "BurnedInAnnotation": None},
        {"SOPClassUID": SecondaryCaptureImageStorage, "BurnedInAnnotation": "NO"},
    ],
)
def test_burned_in_equivalent(changes: dict[str, str | None]) -> None:
    ds = ct_slice(0, study=StudyInfo(), series=SeriesInfo())
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    data = to_part10(ds)
    if changes.get("BurnedInAnnotation") != "NO":
        with pytest.raises(BurnedInAnnotationHeld) as fast_info:
            deidentify_part10_fast(FAST, data, CASE, allow_burned_in=False)
        with pytest.raises(BurnedInAnnotationHeld) as slow_info:
            SLOW.deidentify_part10(data, CASE)
        assert str(fast_info.value) == str(slow_info.value)
        check_equivalent(data, allow_burned_in=True)
    else:
        check_equivalent(data)


def test_bad_pseudonym_is_rejected_like_the_engine() -> None:
    data = to_part10(ct_slice(0, study=StudyInfo(), series=SeriesInfo()))
    for bad in ("DOE^JANE", ""):
        with pytest.raises(ValidationError):
            deidentify_part10_fast(FAST, data, bad, allow_burned_in=False)
        with pytest.raises(ValidationError):
            SLOW.deidentify_part10(data, bad)


def test_geometry_change_raises_integrity_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transformation that touched geometry is refused, not produced."""
    data = to_part10(ct_slice(0, study=StudyInfo(), series=SeriesInfo()))
    real = transform_module.clean_text  # the transform both paths share
    monkeypatch.setattr(transform_module, "clean_text", lambda v: real(v) + "9")
    monkeypatch.setattr(
        "hospital_node.deid.profile.ConfidentialityProfile.treatment",
        _treat_slice_thickness_as_text,
    )
    with pytest.raises(IntegrityError):
        deidentify_part10_fast(FAST, data, CASE, allow_burned_in=False)
    with pytest.raises(IntegrityError):
        SLOW.deidentify_part10(data, CASE)


_REAL_TREATMENT = engine_module.ConfidentialityProfile.treatment


def _treat_slice_thickness_as_text(
    self: engine_module.ConfidentialityProfile, tag: int, vr: str, *, in_clean_sequence: bool
) -> tuple[engine_module.Treatment, str]:
    if tag == 0x00180050:
        return engine_module.Treatment.CLEAN_TEXT, "C"
    return _REAL_TREATMENT(self, tag, vr, in_clean_sequence=in_clean_sequence)


# --- fallbacks -----------------------------------------------------------------------------


def _slice() -> Dataset:
    return ct_slice(0, study=StudyInfo(), series=SeriesInfo())


def _with_syntax(syntax: str) -> bytes:
    ds = _slice()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return to_part10(ds)


def _append_raw(element: bytes) -> bytes:
    """A valid slice with ``element`` appended after the last element (raw bytes)."""
    return to_part10(_slice()) + element


def _element(group: int, elem: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    n = len(value) if length is None else length
    head = struct.pack("<HH", group, elem) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
        return head + b"\x00\x00" + struct.pack("<I", n) + value
    return head + struct.pack("<H", n) + value


def _item_charset() -> bytes:
    ds = _slice()
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 100"
    item.CodeMeaning = "X"
    ds.add_new(0x00081115, "SQ", Sequence([item]))
    return to_part10(ds)


def _un_public() -> bytes:
    ds = _slice()
    ds.SeriesDescription = "AXIAL DOE "
    data = to_part10(ds)
    head = b"\x08\x00\x3e\x10LO\x0a\x00"
    assert data.count(head) == 1  # Series Description re-labelled UN (4-byte length)
    return data.replace(head, b"\x08\x00\x3e\x10UN\x00\x00\x0a\x00\x00\x00")


def _finish_with_other_vr() -> bytes:
    ds = _slice()
    ds.add_new(0x00120062, "LO", "NO")  # Patient Identity Removed with VR LO, not CS
    return to_part10(ds)


def _no_dicm() -> bytes:
    data = to_part10(_slice())
    return data[:128] + b"NOPE" + data[132:]


FALLBACKS: dict[str, Callable[[], bytes]] = {
    "implicit-vr-le": lambda: _with_syntax(ImplicitVRLittleEndian),
    "explicit-vr-be": lambda: _with_syntax(ExplicitVRBigEndian),
    "deflated": lambda: _with_syntax(DeflatedExplicitVRLittleEndian),
    "rle-encapsulated": lambda: to_part10(encapsulated_ct()),
    "no-dicm-prefix": _no_dicm,
    "not-dicom": lambda: b"not dicom at all" * 20,
    "truncated": lambda: to_part10(_slice())[:-1001],
    "unknown-vr": lambda: _append_raw(_element(0xFFFC, 0xFFFC, b"QQ", b"ab")),
    "odd-length": lambda: _append_raw(_element(0xFFFC, 0xFFFC, b"OB", b"abc")),
    "overrunning-length": lambda: _append_raw(_element(0xFFFC, 0xFFFC, b"OB", b"ab", length=64)),
    "undefined-length-non-sq": lambda: _append_raw(
        _element(0xFFFC, 0xFFFC, b"OB", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", length=0xFFFFFFFF)
    ),
    "unsorted-tags": lambda: _append_raw(_element(0x0008, 0x1030, b"LO", b"DOE JANE")),
    "un-not-removed": _un_public,
    "charset-in-item": _item_charset,
    "finish-attribute-other-vr": _finish_with_other_vr,
}


@pytest.mark.parametrize("make", list(FALLBACKS.values()), ids=list(FALLBACKS))
def test_fallback(make: Callable[[], bytes]) -> None:
    check_fallback(make())


def test_switches_force_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    data = to_part10(_slice())
    calls: list[int] = []
    import hospital_node.deid.fast as fast_module

    real = fast_module.deidentify_part10_fast

    def counting(*args: object, **kwargs: bool) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fast_module, "deidentify_part10_fast", counting)
    FAST.deidentify_part10(data, CASE)
    assert calls == [1]
    SLOW.deidentify_part10(data, CASE)
    assert calls == [1]
    monkeypatch.setattr(engine_module, "FAST_PATH", False)
    FAST.deidentify_part10(data, CASE)
    assert calls == [1]


def test_case_counts() -> None:
    """The per-attribute cases cover every concrete row of Table E.1-1."""
    assert len(ACTED) + len(KEPT) == len(ROWS) > 300
