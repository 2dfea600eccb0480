"""Identifier re-scan of outgoing DICOM instances (invariant 2, the send path).

The sender calls :func:`scan_for_identifiers` on every outgoing instance and refuses
to send on any finding. The scan is independent of how the instance was produced: it
walks every element at every sequence depth and checks it against what the
de-identifier would have produced, using the same decision
(:meth:`ConfidentialityProfile.treatment`) as :mod:`.engine`:

- removed attributes (table X, private attributes, command-group elements, opaque
  unknown public attributes) must be absent or empty — private ones absent;
- Z attributes must be empty; D attributes empty or the fixed dummy (UIDs mapped);
- U attributes must hold UIDs under ``2.25.`` (or well-known UIDs under the DICOM root);
- C text, and every free-text attribute the table does not list (any depth, unless
  kept by name), must be unchanged by cleaning; overlay groups and Timezone Offset
  From UTC must be absent; a plain-D sequence (Content Sequence, ...) must hold no
  items; Encapsulated Document Length must be the dummy document's length; dates are
  accepted only when the instance
  declares Longitudinal Temporal Information Modified = MODIFIED;
- Patient's Name and Patient ID must equal the case pseudonym, Patient Identity
  Removed must be YES and the De-identification Method Code Sequence must name the
  Basic profile (113100); in the file meta, the Media Storage SOP Instance UID must
  equal the SOP Instance UID and no source/sending AE titles or private information
  may remain.

Findings name the attribute (path, tag, keyword) and the rule, never the value.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset

from hospital_node.deid.clean import clean_text
from hospital_node.deid.profile import (
    BASIC_PROFILE_CODE,
    DEFAULT_OPTIONS,
    PATIENT_ID_TAG,
    PATIENT_NAME_TAG,
    RECURSE_TREATMENTS,
    ConfidentialityProfile,
    Option,
    Treatment,
    child_context,
    default_profile,
    well_formed,
)
from hospital_node.deid.transform import (
    DICOM_UID_ROOT,
    DOCUMENT_DUMMY_LENGTH,
    MAPPED_UID_ROOT,
    dummy_value,
    element_values,
    element_vr,
    has_utc_offset,
    method_code_items,
    method_description,
)

METHOD_TAG = 0x00120063  # De-identification Method
METHOD_CODES_TAG = 0x00120064  # De-identification Method Code Sequence
_FORBIDDEN_META_TAGS = (
    0x00020016,  # Source Application Entity Title
    0x00020017,  # Sending Application Entity Title
    0x00020018,  # Receiving Application Entity Title
    0x00020100,  # Private Information Creator UID
    0x00020102,  # Private Information
)


def _describe(path: str, tag: int, reason: str) -> str:
    keyword = keyword_for_tag(tag) or ("private" if (tag >> 16) & 1 else "unknown")
    return f"{path}({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}: {reason}"


def _is_dummy(vr: str, value: object) -> bool:
    expected = dummy_value(vr)
    if isinstance(expected, bytes):
        return value == expected
    return str(value).strip(" \x00") == str(expected)


class _Scan:
    def __init__(
        self, profile: ConfidentialityProfile, pseudonym: str, dates_declared: bool
    ) -> None:
        self.profile = profile
        self.pseudonym = pseudonym
        self.dates_declared = dates_declared
        self.first: list[str] = []  # the patient's name and ID: listed first
        self.findings: list[str] = []
        self.untabled: list[str] = []  # unlisted free text: listed last

    def walk(self, ds: Dataset, path: str, in_clean: int) -> None:
        for tag in list(ds.keys()):
            if not path and tag in (METHOD_TAG, METHOD_CODES_TAG):
                self.check_method(ds, tag)  # written by the de-identifier itself
                continue
            vr = element_vr(ds, tag)
            treatment, code = self.profile.treatment(tag, vr, in_clean_sequence=in_clean)
            if treatment is Treatment.KEEP:
                continue
            if treatment is Treatment.REMOVE:
                self.check_removed(ds, tag, path, code)
                continue
            elem = ds[tag]
            if treatment in RECURSE_TREATMENTS:
                for i, item in enumerate(elem.value or ()):
                    prefix = f"{path}({tag >> 16:04X},{tag & 0xFFFF:04X})[{i}]."
                    self.walk(item, prefix, child_context(in_clean, treatment))
                continue
            reason = self.check(treatment, elem.VR, element_values(elem), code)
            if reason and treatment is Treatment.PSEUDONYM:
                self.first.append(_describe(path, tag, reason))
            elif reason and not code and treatment is Treatment.CLEAN_TEXT:
                self.untabled.append(_describe(path, tag, "text not in Table E.1-1 not cleaned"))
            elif reason:
                self.findings.append(_describe(path, tag, reason))

    def check_method(self, ds: Dataset, tag: int) -> None:
        """De-identification Method (+ Code Sequence) must be exactly what we write."""
        options = self.profile.options
        if tag == METHOD_TAG:
            ok = [str(v) for v in element_values(ds[tag])] == method_description(options)
        else:
            expected = [
                (str(i.CodeValue), str(i.CodingSchemeDesignator), str(i.CodeMeaning))
                for i in method_code_items(options)
            ]
            found = [
                (str(i.get("CodeValue", "")), str(i.get("CodingSchemeDesignator", "")),
                 str(i.get("CodeMeaning", "")), len(i))
                for i in ds[tag].value or ()
            ]  # fmt: skip
            ok = found == [(*e, 3) for e in expected]
        if not ok:
            self.findings.append(_describe("", tag, "not the values the de-identifier writes"))

    def check_removed(self, ds: Dataset, tag: int, path: str, code: str) -> None:
        group = tag >> 16
        if group & 1:
            self.findings.append(_describe(path, tag, "private attribute present"))
        elif group in (0x0000, 0x0002):
            self.findings.append(_describe(path, tag, "command/file-meta element in data set"))
        elif tag & 0xFFFF == 0:
            return  # a group length carries nothing identifying
        elif element_values(ds[tag]):
            self.findings.append(_describe(path, tag, f"must be removed (action {code or 'X'})"))

    def check(self, treatment: Treatment, vr: str, values: list[object], code: str) -> str | None:
        if not values:
            return None if treatment is not Treatment.PSEUDONYM else "must be the case pseudonym"
        if treatment is Treatment.EMPTY:
            return f"must be empty (action {code})"
        if treatment is Treatment.REFUSE:
            return f"must not hold items: such an instance is not released (action {code})"
        if treatment is Treatment.DOCUMENT_LENGTH:
            ok = len(values) == 1 and str(values[0]) == str(DOCUMENT_DUMMY_LENGTH)
            return None if ok else "must be the length of the dummy document"
        if treatment is Treatment.DUMMY:
            if vr == "SQ" or not all(_is_dummy(vr, v) for v in values):
                return f"must be empty or a dummy value (action {code or 'D'})"
            return None
        if treatment is Treatment.PSEUDONYM:
            ok = len(values) == 1 and str(values[0]) == self.pseudonym
            return None if ok else "not the case pseudonym"
        if treatment is Treatment.MAP_UID:
            roots = (MAPPED_UID_ROOT, DICOM_UID_ROOT)
            ok = all(str(v).strip(" \x00").startswith(roots) for v in values)
            return None if ok else f"UID not replaced (action {code})"
        if treatment is Treatment.CLEAN_TEXT:
            ok = all(clean_text(str(v)) == str(v) for v in values)
            return None if ok else "descriptor not cleaned (action C)"
        if treatment is Treatment.SHIFT_DATE:
            if vr == "DT" and any(has_utc_offset(str(v)) for v in values):
                return "date-time keeps a UTC offset (it would tell the season)"
            ok = self.dates_declared or all(_is_dummy(vr, v) for v in values)
            return None if ok else "date present but dates are not declared MODIFIED"
        if treatment is Treatment.KEEP_VALID:
            ok = all(well_formed(vr, v) for v in values)
            return None if ok else f"retained value is not a well-formed {vr}"
        return None


def scan_for_identifiers(
    ds: Dataset, pseudonym: str, *, options: Iterable[Option] = DEFAULT_OPTIONS
) -> list[str]:
    """Describe every attribute of ``ds`` that could still identify the patient.

    An empty list means the instance may leave the hospital. ``options`` must be the
    options the de-identifier used (default: all of ours).
    """
    opts = frozenset(options)
    profile = default_profile() if opts == DEFAULT_OPTIONS else ConfidentialityProfile(opts)
    declared = str(ds.get("LongitudinalTemporalInformationModified", "") or "").upper()
    scan = _Scan(profile, pseudonym, declared.strip() == "MODIFIED")
    scan.walk(ds, "", in_clean=False)

    findings = scan.first + scan.findings + scan.untabled
    for tag in (PATIENT_NAME_TAG, PATIENT_ID_TAG):
        if tag not in ds:
            findings.append(_describe("", tag, "missing; must be the case pseudonym"))
    if str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() != "YES":
        findings.append(_describe("", 0x00120062, "must be YES"))
    codes = {
        (str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")))
        for item in ds.get("DeidentificationMethodCodeSequence", None) or ()
    }
    if (BASIC_PROFILE_CODE[0], "DCM") not in codes:
        findings.append(_describe("", 0x00120064, f"must contain ({BASIC_PROFILE_CODE[0]}, DCM)"))

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in _FORBIDDEN_META_TAGS:
            if tag in meta:
                findings.append(_describe("file meta ", tag, "must not be present"))
        media_uid = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
        if media_uid and media_uid != str(ds.get("SOPInstanceUID", "") or ""):
            findings.append(_describe("file meta ", 0x00020003, "differs from SOP Instance UID"))
    return findings
