"""Text the table does not list, overlays, timezone, encapsulated documents, SR/KO.

Every free-text attribute of pydicom's data dictionary (VR SH, LO, ST, LT, UT, UC, PN,
and the URLs, UR; listed in Table E.1-1 or not) gets a unique canary token, at top level
and nested in the sequences an outside probe found leaking (kept for their references, or simply not
listed: Referenced Image, Source Image, Anatomic Region, Derivation Code, Contrast/Bolus
Agent, Real World Value Mapping, Purpose of Reference two levels deep) and in a cleaned
one (Request Attributes). Both paths (the engine and the byte-walking fast path) must
give the same output, and no token may be in it unless the profile keeps the attribute
by name (:data:`KEPT_BY_NAME`). Batched per VR and placement: a few thousand attributes
in a few dozen cases that run in seconds.
"""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage

from hospital_node.deid import Deidentifier, scan_for_identifiers
from hospital_node.deid.engine import DOCUMENT_DUMMY_LENGTH, DeidRefused
from hospital_node.deid.fast import deidentify_part10_fast
from hospital_node.deid.profile import KEPT_BY_NAME, Treatment, default_profile
from tests.dicom_factory import base_dataset, to_part10
from tests.test_deid_fast import check_equivalent, check_same_refusal

KEY = b"federation-test-key-0123456789abcdef"
CASE = "CASE-2024-0001"
ENGINE = Deidentifier(KEY, fast=False)
FREE_TEXT = ("SH", "LO", "ST", "LT", "UT", "UC", "PN", "UR")

TEXT_ATTRIBUTES: dict[str, list[tuple[int, str]]] = {
    vr: sorted(
        (tag, entry[4])
        for tag, entry in DicomDictionary.items()
        if entry[0] == vr and tag >> 16 not in (0x0000, 0x0002) and entry[4]
    )
    for vr in FREE_TEXT
}
"""(tag, keyword) of every dictionary attribute of each free-text VR (command and file-meta
groups aside: they are removed from a data set body whatever their VR)."""

PLACEMENTS: dict[str, tuple[str, ...]] = {
    "top": (),
    "ReferencedImage": ("ReferencedImageSequence",),
    "SourceImage": ("SourceImageSequence",),
    "PurposeOfReference": ("SourceImageSequence", "PurposeOfReferenceCodeSequence"),
    "AnatomicRegion": ("AnatomicRegionSequence",),
    "DerivationCode": ("DerivationCodeSequence",),
    "ContrastBolusAgent": ("ContrastBolusAgentSequence",),
    "RealWorldValueMapping": ("RealWorldValueMappingSequence",),
    "RequestAttributes": ("RequestAttributesSequence",),
}


def token(vr: str, n: int) -> str:
    """A canary no allowlist knows, short enough for SH (16)."""
    return f"QZK{vr}{n:05d}W"


def planted(vr: str, path: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """A CT instance with a token in every ``vr`` attribute at ``path``; (bytes, keyword →
    token)."""
    ds = base_dataset()
    ds.BurnedInAnnotation = "NO"
    target = ds
    for keyword in path:
        item = Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77.1"
        setattr(target, keyword, Sequence([item]))
        target = item
    tokens: dict[str, str] = {}
    for n, (tag, keyword) in enumerate(TEXT_ATTRIBUTES[vr]):
        if not path and tag in ds:
            continue  # the base instance's own Patient's Name / ID: pseudonymised anyway
        value = token(vr, n)
        target.add_new(tag, vr, value)
        tokens[keyword] = value
    return to_part10(ds), tokens


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("vr", FREE_TEXT)
def test_no_text_attribute_token_reaches_the_factory_unless_kept_by_name(
    vr: str, placement: str
) -> None:
    data, tokens = planted(vr, PLACEMENTS[placement])
    assert len(tokens) >= len(TEXT_ATTRIBUTES[vr]) - 2  # all but the base's name and ID
    out = check_equivalent(data)  # engine and fast path: the same bytes, element by element
    leaked = sorted(k for k, v in tokens.items() if v.encode() in out and k not in KEPT_BY_NAME)
    assert leaked == []
    kept = sorted(k for k, v in tokens.items() if v.encode() in out)
    assert kept == sorted(k for k in tokens if k in KEPT_BY_NAME)
    assert scan_for_identifiers(dcmread(io.BytesIO(out)), CASE) == []


def test_every_free_text_attribute_of_the_dictionary_is_covered() -> None:
    counts = {vr: len(found) for vr, found in TEXT_ATTRIBUTES.items()}
    assert sum(counts.values()) > 700 and min(counts.values()) >= 10, counts


def test_the_kept_by_name_list_is_explicit_and_only_free_text() -> None:
    by_keyword = {entry[4]: entry[0] for entry in DicomDictionary.values()}
    assert set(KEPT_BY_NAME) == {
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "LongCodeValue",
        "RescaleType",
        "URNCodeValue",
        "CodingSchemeURL",
    }
    assert all(by_keyword[k] in (*FREE_TEXT, "UR") for k in KEPT_BY_NAME)
    assert all(reason for reason in KEPT_BY_NAME.values())


def test_scanner_refuses_unlisted_text_that_was_not_cleaned() -> None:
    out = dcmread(io.BytesIO(check_equivalent(to_part10(base_dataset()))))
    out.DocumentTitle = "JANE DOE REPORT"
    out.ReferencedImageSequence = Sequence([Dataset()])
    out.ReferencedImageSequence[0].CodeMeaning = "WANG WEI"
    findings = scan_for_identifiers(out, CASE)
    assert any("(0042,0010) DocumentTitle: text not in Table E.1-1 not cleaned" in f
               for f in findings)  # fmt: skip
    assert any(f.startswith("(0008,1140)[0].(0008,0104) CodeMeaning") for f in findings)


# --- overlays, timezone, encapsulated documents -------------------------------------------


def test_overlay_groups_are_removed_entirely() -> None:
    ds = base_dataset()
    for group in (0x6000, 0x6002, 0x601E):
        ds.add_new((group << 16) | 0x0010, "US", 4)  # Overlay Rows
        ds.add_new((group << 16) | 0x0011, "US", 4)  # Overlay Columns
        ds.add_new((group << 16) | 0x0022, "LO", "OVERLAY OF JANE DOE")  # Overlay Description
        ds.add_new((group << 16) | 0x0040, "CS", "G")  # Overlay Type
        ds.add_new((group << 16) | 0x0050, "SS", [1, 1])  # Overlay Origin
        ds.add_new((group << 16) | 0x0100, "US", 1)  # Overlay Bits Allocated
        ds.add_new((group << 16) | 0x1500, "LO", "JANE")  # Overlay Label
        ds.add_new((group << 16) | 0x3000, "OW", b"\xff\x00")  # Overlay Data
    out = dcmread(io.BytesIO(check_equivalent(to_part10(ds))))
    assert [t for t in out.keys() if 0x6000 <= t >> 16 <= 0x60FF] == []
    assert b"JANE" not in to_part10(out)
    out.add_new(0x60000010, "US", 4)
    assert scan_for_identifiers(out, CASE) == [
        "(6000,0010) OverlayRows: must be removed (action X)"
    ]


@pytest.mark.parametrize("offset", ["+0800", "-0500", "+0100", "CET", "Europe/Berlin"])
def test_timezone_offset_is_removed(offset: str) -> None:
    """With shifted dates a kept offset would tell the season (daylight saving) of the real
    date; a non-numeric one must not become the invalid 'X' either."""
    ds = base_dataset()
    ds.TimezoneOffsetFromUTC = offset
    out = dcmread(io.BytesIO(check_equivalent(to_part10(ds))))
    assert "TimezoneOffsetFromUTC" not in out
    out.TimezoneOffsetFromUTC = "+0800"
    assert scan_for_identifiers(out, CASE) == [
        "(0008,0201) TimezoneOffsetFromUTC: must be removed (action X)"
    ]


def encapsulated_pdf() -> Dataset:
    ds = base_dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
    ds.Modality = "DOC"
    ds.BurnedInAnnotation = "NO"
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                    "PixelData"):  # fmt: skip
        if keyword in ds:
            delattr(ds, keyword)
    document = b"%PDF-1.4\n% Report for DOE^JANE MRN 123456\n%%EOF\n"
    ds.DocumentTitle = "Report of DOE JANE"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document
    ds.EncapsulatedDocumentLength = len(document)
    return ds


def test_encapsulated_document_length_is_the_dummy_document_length() -> None:
    out_bytes = check_equivalent(to_part10(encapsulated_pdf()))
    out = dcmread(io.BytesIO(out_bytes))
    assert out.EncapsulatedDocument == b"\x00" * DOCUMENT_DUMMY_LENGTH
    assert out.EncapsulatedDocumentLength == len(out.EncapsulatedDocument) == 8
    assert b"DOE" not in out_bytes and b"JANE" not in out_bytes and b"123456" not in out_bytes
    assert "DOE" not in out.DocumentTitle and "JANE" not in out.DocumentTitle
    assert out.MIMETypeOfEncapsulatedDocument == "application/pdf"  # allowlisted words
    assert scan_for_identifiers(out, CASE) == []
    out.EncapsulatedDocumentLength = 44
    assert scan_for_identifiers(out, CASE) == [
        "(0042,0015) EncapsulatedDocumentLength: must be the length of the dummy document"
    ]


# --- D-action sequences (SR and KO content) ----------------------------------------------


def report(content: list[Dataset], sop_class: str = "1.2.840.10008.5.1.4.1.1.88.11") -> Dataset:
    """A Basic Text SR (or, with the KO class, a Key Object Selection) with ``content``."""
    ds = base_dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = "SR" if sop_class.endswith(".88.11") else "KO"
    ds.BurnedInAnnotation = "NO"
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation",
                    "PixelData"):  # fmt: skip
        if keyword in ds:
            delattr(ds, keyword)
    ds.ValueType = "CONTAINER"
    ds.ContentSequence = Sequence(content)
    return ds


def text_item(text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = text
    return item


@pytest.mark.parametrize(
    "sop_class", ["1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.59"]
)
def test_content_sequence_with_items_refuses_the_instance_with_its_reason(sop_class: str) -> None:
    """Emptying it would empty the document; no valid dummy item exists: refused."""
    message = check_same_refusal(to_part10(report([text_item("DOE JANE, fracture")], sop_class)))
    assert "(0040,A730) ContentSequence holds 1 item(s)" in message
    assert "not released" in message and "JANE" not in message
    with pytest.raises(DeidRefused):
        ENGINE.deidentify(report([text_item("x")], sop_class), CASE)


def test_empty_content_sequence_is_kept_empty() -> None:
    out = dcmread(io.BytesIO(check_equivalent(to_part10(report([])))))
    assert "ContentSequence" in out and len(out.ContentSequence) == 0
    assert scan_for_identifiers(out, CASE) == []
    out.ContentSequence = Sequence([text_item("x")])
    assert any("ContentSequence: must not hold items" in f for f in scan_for_identifiers(out, CASE))


def test_d_sequences_are_emptied_removed_or_refused_by_their_basic_code() -> None:
    profile = default_profile()
    got = {
        keyword: profile.treatment(tag, "SQ", in_clean_sequence=False)[0]
        for keyword, tag in (
            ("ContentSequence", 0x0040A730),
            ("VerifyingObserverSequence", 0x0040A073),
            ("GraphicAnnotationSequence", 0x00700001),
            ("InstitutionCodeSequence", 0x00080082),
            ("ReferencedPerformedProcedureStepSequence", 0x00081111),
            ("OperatorIdentificationSequence", 0x00081072),
        )
    }
    assert got == {
        "ContentSequence": Treatment.REFUSE,
        "VerifyingObserverSequence": Treatment.REFUSE,
        "GraphicAnnotationSequence": Treatment.REFUSE,
        "InstitutionCodeSequence": Treatment.EMPTY,
        "ReferencedPerformedProcedureStepSequence": Treatment.EMPTY,
        "OperatorIdentificationSequence": Treatment.REMOVE,
    }
    # and a refusal in the fast path is the engine's, raised after the burned-in hold
    data = to_part10(report([text_item("x")]))
    with pytest.raises(DeidRefused):
        deidentify_part10_fast(Deidentifier(KEY), data, CASE, allow_burned_in=False)


# --- sequences kept for their references --------------------------------------------------


@pytest.mark.parametrize("keyword", ["ReferencedImageSequence", "SourceImageSequence"])
def test_reference_sequence_items_keep_only_what_references(keyword: str) -> None:
    """Action U on a sequence: UIDs (mapped), numbers, coded strings and codes stay; every
    other element goes, even text made only of allowlisted words and nested deeper."""
    purpose = Dataset()
    purpose.CodeValue = "121320"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Uncompressed predecessor JANE"
    purpose.ContextIdentifier = "7201"
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.77.2"
    item.ReferencedFrameNumber = "3"
    item.SpatialLocationsPreserved = "YES"
    item.PurposeOfReferenceCodeSequence = Sequence([purpose])
    item.SeriesDescription = "AXIAL BONE"  # allowlisted words: cleaning alone would keep it
    item.ContentDate = "20240315"
    item.OperatorsName = "DOE^JANE"
    item.add_new(0x00420011, "OB", b"%PDF JANE")
    purpose.ContentDate = "20240315"
    ds = base_dataset()
    setattr(ds, keyword, Sequence([item]))
    out = dcmread(io.BytesIO(check_equivalent(to_part10(ds))))
    (kept,) = getattr(out, keyword)
    assert sorted(e.keyword for e in kept) == [
        "PurposeOfReferenceCodeSequence",
        "ReferencedFrameNumber",
        "ReferencedSOPClassUID",
        "ReferencedSOPInstanceUID",
        "SpatialLocationsPreserved",
    ]
    assert kept.ReferencedSOPInstanceUID == ENGINE.map_uid("1.2.826.0.1.3680043.8.498.77.2")
    (code,) = kept.PurposeOfReferenceCodeSequence
    assert sorted(e.keyword for e in code) == [
        "CodeMeaning",
        "CodeValue",
        "CodingSchemeDesignator",
        "ContextIdentifier",
    ]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("121320", "DCM")
    assert "JANE" not in code.CodeMeaning
    assert scan_for_identifiers(out, CASE) == []
    kept.SeriesDescription = "AXIAL BONE"
    assert scan_for_identifiers(out, CASE) == [
        f"({ds[keyword].tag >> 16:04X},{ds[keyword].tag & 0xFFFF:04X})[0].(0008,103E) "
        "SeriesDescription: must be removed (action X)"
    ]
