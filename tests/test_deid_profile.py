"""PS3.15 Table E.1-1 loading, action resolution and descriptor cleaning."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from pydicom.datadict import dictionary_has_tag, tag_for_keyword

from gateway.errors import ConfigError
from hospital_node.deid.clean import allowed_words, clean_text, is_clean
from hospital_node.deid.profile import (
    BASIC_PROFILE_CODE,
    OPTION_CODES,
    TABLE_EDITION,
    TABLE_RESOURCE,
    Action,
    ConfidentialityProfile,
    Option,
    Treatment,
    default_profile,
    load_table,
    parse_tag_pattern,
    resolve_action,
    resolve_combined,
)

REFERENCE = Path("/work/shared/reference/ps3.15-table-e1-1-2024b.json")


def tag(keyword: str) -> int:
    value = tag_for_keyword(keyword)
    assert value is not None, keyword
    return value


# --- the table -----------------------------------------------------------------------


def test_table_is_the_2024b_edition_with_all_rows() -> None:
    assert TABLE_EDITION == "2024b"
    assert "2024b" in TABLE_RESOURCE
    assert len(load_table()) == 621
    assert len(default_profile().rows) == 621


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference not mounted")
def test_packaged_table_is_an_exact_copy_of_the_reference() -> None:
    packaged = resources.files("hospital_node.deid").joinpath(TABLE_RESOURCE).read_bytes()
    assert packaged == REFERENCE.read_bytes()
    assert json.loads(packaged)[0]["tag"] == "(0008,0050)"


def test_every_concrete_row_is_in_the_data_dictionary() -> None:
    rows = default_profile().concrete_rows()
    assert len(rows) == 617
    assert all(dictionary_has_tag(r.tag) for r in rows if r.tag is not None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(0008,0050)", (0x00080050, 0xFFFFFFFF, 0x00080050, False)),
        ("(50XX,XXXX)", (None, 0xFF000000, 0x50000000, False)),
        ("(60XX,3000)", (None, 0xFF00FFFF, 0x60003000, False)),
        ("(GGGG,EEEE) WHERE GGGG IS ODD", (None, 0, 0, True)),
    ],
)
def test_parse_tag_patterns(text: str, expected: tuple[object, ...]) -> None:
    assert parse_tag_pattern(text) == expected


def test_parse_rejects_garbage() -> None:
    with pytest.raises(ConfigError):
        parse_tag_pattern("(0008,005)")


@pytest.mark.parametrize(
    ("tag_value", "name"),
    [
        (0x50020010, "Curve Data"),
        (0x501E3000, "Curve Data"),
        (0x60003000, "Overlay Data"),
        (0x60A04000, "Overlay Comments"),
        (0x00091001, "Private Attributes"),
        (0x7FE10010, "Private Attributes"),
    ],
)
def test_lookup_of_ranges_and_private(tag_value: int, name: str) -> None:
    row = default_profile().lookup(tag_value)
    assert row is not None and row.name == name
    assert row.action is Action.REMOVE


def test_lookup_of_unlisted_attributes_is_none() -> None:
    profile = default_profile()
    for keyword in ("Rows", "PixelSpacing", "ImagePositionPatient", "Modality", "SOPClassUID"):
        assert profile.lookup(tag(keyword)) is None
    assert profile.lookup(0x60000010) is None  # Overlay Rows: geometry of the overlay, kept


# --- resolution rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "action"),
    [
        ("X", Action.REMOVE),
        ("Z", Action.ZERO),
        ("D", Action.DUMMY),
        ("U", Action.UID),
        ("X/Z", Action.ZERO),
        ("X/D", Action.DUMMY),
        ("Z/D", Action.DUMMY),
        ("X/Z/D", Action.DUMMY),
        ("X/Z/U*", Action.UID),
    ],
)
def test_combined_codes(code: str, action: Action) -> None:
    assert resolve_combined(code) is action


def test_enabled_options_override_basic_and_the_strictest_wins() -> None:
    opts = [Option.CLEAN_DESCRIPTORS, Option.RETAIN_PATIENT_CHARACTERISTICS]
    assert resolve_action("X", {"cleanDescOpt": "C"}, opts) is Action.CLEAN
    assert resolve_action("X", {"rtnLongFullDatesOpt": "K"}, opts) is Action.REMOVE
    assert resolve_action("X", {"cleanDescOpt": "C", "rtnPatCharsOpt": "K"}, opts) is Action.CLEAN
    assert resolve_action("X/Z", {}, opts) is Action.ZERO


@pytest.mark.parametrize(
    ("keyword", "action"),
    [
        ("PatientSex", Action.KEEP),
        ("PatientAge", Action.KEEP),
        ("PatientSize", Action.KEEP),
        ("PatientWeight", Action.KEEP),
        ("PatientBirthDate", Action.ZERO),
        ("AccessionNumber", Action.ZERO),
        ("StudyDate", Action.CLEAN),
        ("AcquisitionDateTime", Action.CLEAN),
        ("StudyTime", Action.CLEAN),
        ("ProtocolName", Action.CLEAN),
        ("SeriesDescription", Action.CLEAN),
        ("InstitutionName", Action.DUMMY),
        ("OperatorsName", Action.DUMMY),
        ("ReferringPhysicianName", Action.ZERO),
        ("PerformingPhysicianName", Action.REMOVE),
        ("OtherPatientIDsSequence", Action.REMOVE),
        ("ReferencedStudySequence", Action.ZERO),
        ("ReferencedImageSequence", Action.UID),
        ("SourceImageSequence", Action.UID),
        ("RequestAttributesSequence", Action.CLEAN),
        ("SOPInstanceUID", Action.UID),
        ("FrameOfReferenceUID", Action.UID),
        ("PatientID", Action.DUMMY),
    ],
)
def test_resolved_actions_under_our_options(keyword: str, action: Action) -> None:
    row = default_profile().lookup(tag(keyword))
    assert row is not None
    assert row.action is action


def test_without_options_the_basic_profile_applies() -> None:
    basic = ConfidentialityProfile(())
    expected = {
        "PatientSex": Action.ZERO,
        "PatientAge": Action.REMOVE,
        "StudyDate": Action.ZERO,
        "ProtocolName": Action.DUMMY,
    }
    for keyword, action in expected.items():
        row = basic.lookup(tag(keyword))
        assert row is not None and row.action is action, keyword
    assert basic.treatment(tag("StudyTime"), "TM", in_clean_sequence=False)[0] is Treatment.EMPTY


@pytest.mark.parametrize(
    ("tag_value", "vr", "in_clean", "expected"),
    [
        (tag("StudyTime"), "TM", False, Treatment.KEEP),  # whole-day shift keeps time
        (tag("StudyDate"), "DA", False, Treatment.SHIFT_DATE),
        (tag("AcquisitionDateTime"), "DT", False, Treatment.SHIFT_DATE),
        (tag("CalibrationDate"), "DA", False, Treatment.SHIFT_DATE),  # not in the table
        (tag("MakerNote"), "OB", False, Treatment.REMOVE),  # C on OB falls back to X
        (tag("FrameOriginTimestamp"), "OB", False, Treatment.DUMMY),  # C on OB -> basic D
        (tag("RequestAttributesSequence"), "SQ", False, Treatment.RECURSE_CLEAN),
        (tag("ReferencedImageSequence"), "SQ", False, Treatment.RECURSE_REFERENCE),
        (tag("ReferencedStudySequence"), "SQ", False, Treatment.EMPTY),
        (tag("ContentSequence"), "SQ", False, Treatment.REFUSE),  # plain D on SQ: refuse
        (tag("InstitutionCodeSequence"), "SQ", False, Treatment.EMPTY),  # X/Z/D on SQ
        (tag("OperatorIdentificationSequence"), "SQ", False, Treatment.REMOVE),  # X/D
        (tag("TimezoneOffsetFromUTC"), "SH", False, Treatment.REMOVE),
        (tag("EncapsulatedDocumentLength"), "UL", False, Treatment.DOCUMENT_LENGTH),
        (0x60000010, "US", False, Treatment.REMOVE),  # Overlay Rows: the whole overlay
        (tag("DocumentTitle"), "ST", False, Treatment.CLEAN_TEXT),  # not in the table
        (tag("LUTExplanation"), "LO", False, Treatment.CLEAN_TEXT),
        (tag("RescaleType"), "LO", False, Treatment.KEEP),  # kept by name
        (tag("AnnotationGroupUID"), "UI", False, Treatment.MAP_UID),  # D on UI
        (tag("PatientName"), "PN", False, Treatment.PSEUDONYM),
        (tag("PatientID"), "LO", True, Treatment.PSEUDONYM),
        (tag("EvaluatorName"), "PN", False, Treatment.DUMMY),  # PN not in the table
        (tag("CodeMeaning"), "LO", True, Treatment.CLEAN_TEXT),
        (tag("CodeMeaning"), "LO", False, Treatment.CLEAN_TEXT),  # any depth
        (tag("CodeValue"), "SH", True, Treatment.KEEP),
        (tag("BodyPartExamined"), "CS", True, Treatment.KEEP),
        (tag("PixelSpacing"), "DS", True, Treatment.KEEP),
        (0x00080000, "UL", False, Treatment.REMOVE),  # group length
        (0x00001000, "UI", False, Treatment.REMOVE),  # command group
        (0x00091001, "LO", False, Treatment.REMOVE),  # private
        (0x00230042, "UN", False, Treatment.REMOVE),  # unknown public blob
    ],
)
def test_treatments(tag_value: int, vr: str, in_clean: bool, expected: Treatment) -> None:
    got, _code = default_profile().treatment(tag_value, vr, in_clean_sequence=in_clean)
    assert got is expected


def test_no_geometry_attribute_is_acted_on() -> None:
    profile = default_profile()
    for keyword in (
        "Rows",
        "Columns",
        "PixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "GantryDetectorTilt",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "PixelMeasuresSequence",
        "PlanePositionSequence",
        "PlaneOrientationSequence",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
    ):
        assert profile.lookup(tag(keyword)) is None, keyword


def test_cid_7050_codes() -> None:
    assert BASIC_PROFILE_CODE[0] == "113100"
    assert {opt: code for opt, (code, _m) in OPTION_CODES.items()} == {
        Option.RETAIN_LONG_MODIFIED_DATES: "113107",
        Option.RETAIN_PATIENT_CHARACTERISTICS: "113108",
        Option.CLEAN_DESCRIPTORS: "113105",
    }


# --- Clean Descriptors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("AXIAL 1.0 BONE", "AXIAL 1.0 BONE"),
        ("Thorax 1.0 B31f", "Thorax 1.0 B31f"),
        ("0.625mm 120kV 512x512", "0.625mm 120kV 512x512"),
        ("KNEE L4-L5 AXIAL/CORONAL", "KNEE L4-L5 AXIAL/CORONAL"),
        ("CT HEAD W/O CONTRAST DR WANG", "CT HEAD W/O CONTRAST DR X"),
        ("MANDIBLE CBCT 0.3mm pt Zhang Wei", "MANDIBLE CBCT 0.3mm X X X"),
        ("scan 2024-03-15", "scan X"),
        ("scan 15.03.2024", "scan X"),
        ("10:30", "X"),
        ("2019", "X"),
        ("MRN12345678", "X"),
        ("12345", "X"),
        ("tel 138 0013 8000", "X X X X"),
        ("王小明 头颅CT", "X X"),
        ("HIP, LEFT (PRE-OP)", "HIP, LEFT (X)"),
        ("", ""),
    ],
)
def test_clean_text(value: str, expected: str) -> None:
    assert clean_text(value) == expected
    assert is_clean(expected)


def test_allowlist_has_the_basics_and_no_common_names() -> None:
    words = allowed_words()
    assert len(words) > 300
    for word in (
        "AXIAL",
        "BONE",
        "HEAD",
        "CT",
        "MR",
        "SAGITTAL",
        "CONTRAST",
        "MM",
        "KNEE",
        "HIP",
        "PELVIS",
        "MANDIBLE",
        "CBCT",
        "X",
    ):
        assert word in words, word
    surnames = (
        "WANG",
        "LI",
        "ZHANG",
        "LIU",
        "CHEN",
        "YANG",
        "HUANG",
        "ZHAO",
        "WU",
        "ZHOU",
        "XU",
        "SUN",
        "MA",
        "ZHU",
        "HU",
        "GUO",
        "HE",
        "LIN",
        "GAO",
        "LUO",
        "MIN",
        "LONG",
        "SMITH",
        "JOHNSON",
        "BROWN",
        "WHITE",
        "MARK",
        "DOE",
        "JANE",
        "YA",
        "SI",
    )
    assert not [s for s in surnames if s in words]
