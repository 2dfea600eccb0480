"""The de-identification transform both paths of the de-identifier share.

:class:`hospital_node.deid.engine.Deidentifier` de-identifies a pydicom data set (the
engine) or, for plain Explicit VR Little Endian files, the raw bytes
(:mod:`hospital_node.deid.fast`). Both ask the same profile for each element's
treatment and change every element with the same code, which lives here: the keyed UID
mapping and date shift, :class:`Pass` (a treatment applied to one element, recursion
into sequences), the finishing attributes, the burned-in hold, the pseudonym check, the
geometry/pixel check and the refusal of a D-action sequence with items. Neither path
imports the other's private names; ``tests/test_dicom_raw.py`` checks that.

Values are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping, MutableSequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any, Protocol

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset

from gateway.errors import (
    BurnedInAnnotationHeld,
    DeidRefused,
    IntegrityError,
    ValidationError,
)
from hospital_node.deid.clean import clean_text
from hospital_node.deid.profile import (
    BASIC_PROFILE_CODE,
    DUMMY_VALUES,
    OPTION_CODES,
    RECURSE_TREATMENTS,
    TABLE_EDITION,
    ConfidentialityProfile,
    Option,
    Treatment,
    child_context,
    dictionary_vr,
    well_formed,
)

log = logging.getLogger(__name__)

MAPPED_UID_ROOT = "2.25."
DICOM_UID_ROOT = "1.2.840.10008."
DATE_OFFSET_RANGE: tuple[int, int] = (-3650, -365)
MIN_KEY_BYTES = 16
_UID_LABEL = b"yigong.deid.uid.v1\x00"
_DATE_LABEL = b"yigong.deid.date-offset.v1\x00"

BURNED_IN_MODALITIES = frozenset({"US", "SC", "XC", "OT", "ES"})
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)
_PSEUDONYM_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DA_RE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")  # also the ACR-NEMA "YYYY.MM.DD"
_DT_RE = re.compile(
    r"(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?"
)
IMPLEMENTATION_VERSION_NAME = "YIGONG_DEID_1"


def check_unchanged(before: tuple[str, str], after: tuple[str, str], sop_uid: str) -> None:
    """Geometry is sacred: (geometry hash, pixel hash) must be identical before and after."""
    if before != after:
        what = "geometry" if before[0] != after[0] else "pixel data"
        raise IntegrityError(
            f"de-identification changed the {what} of instance {sop_uid}; "
            "the instance was not produced"
        )


def refused_sequence(tag: int, items: int, sop_uid: str) -> DeidRefused:
    """Why an instance whose D-action sequence ``tag`` holds ``items`` items is refused."""
    keyword = keyword_for_tag(tag) or "sequence"
    return DeidRefused(
        f"instance {sop_uid or '(no SOP Instance UID)'} not de-identified: "
        f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword} holds {items} item(s), which "
        "PS3.15 Table E.1-1 replaces by a dummy (action D); no valid dummy item can be made "
        "without the document's template, and emptying it would empty the document "
        "(e.g. the content of a Structured Report or Key Object Selection), so the "
        "instance is not released"
    )


class Keys(Protocol):
    """What a pass needs of its de-identifier (:class:`hospital_node.deid.engine.Deidentifier`):
    the profile and the keyed UID mapping and date offset."""

    @property
    def profile(self) -> ConfidentialityProfile: ...

    def map_uid(self, uid: str) -> str: ...

    def date_offset_days(self, pseudonym: str) -> int: ...


@dataclass(frozen=True, slots=True)
class DeidResult:
    """A de-identified instance and what was done to it."""

    dataset: Dataset
    original_sop_uid: str
    new_sop_uid: str
    geometry_hash: str
    pixel_hash: str
    actions_applied: Mapping[str, int]


def map_uid(key: bytes, uid: str) -> str:
    """The keyed, deterministic replacement of ``uid`` (``2.25.`` + 128-bit decimal)."""
    uid = uid.strip(" \x00")
    if not uid or uid.startswith(DICOM_UID_ROOT):
        return uid
    digest = hmac.new(key, _UID_LABEL + uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return MAPPED_UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def date_offset_days(key: bytes, pseudonym: str) -> int:
    """The per-patient date shift in days, in :data:`DATE_OFFSET_RANGE`."""
    digest = hmac.new(key, _DATE_LABEL + pseudonym.encode("utf-8"), hashlib.sha256).digest()
    low, high = DATE_OFFSET_RANGE
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def _shifted(year: str, month: str | None, day: str | None, days: int) -> date | None:
    # A partial value is anchored in the middle of its period, so that the truncated
    # result is the period the shifted interval mostly falls into.
    if month is None:
        month, day = "07", "02"
    try:
        return date(int(year), int(month), int(day or 15)) + timedelta(days=days)
    except (ValueError, OverflowError):
        return None


def shift_date(value: str, days: int) -> str | None:
    """Shift a DA value by ``days``; "" stays "", None when it is not a date."""
    text = value.strip(" \x00")
    if not text:
        return ""
    m = _DA_RE.fullmatch(text)
    new = _shifted(m.group(1), m.group(2), m.group(3), days) if m else None
    return None if new is None else f"{new.year:04d}{new.month:02d}{new.day:02d}"


def shift_datetime(value: str, days: int) -> str | None:
    """Shift the date part of a DT value by ``days``, keeping time and precision.

    A UTC offset suffix (``+0100``) is dropped, like Timezone Offset From UTC: with the
    date shifted, a daylight-saving offset would tell the season of the real date.
    """
    text = value.strip(" \x00")
    if not text:
        return ""
    m = _DT_RE.fullmatch(text)
    if not m:
        return None
    year, month, day, time_part, _offset = m.groups()
    if time_part and not day:
        return None
    new = _shifted(year, month, day, days)
    if new is None or new.year < 1:
        return None
    out = f"{new.year:04d}"
    if month:
        out += f"{new.month:02d}"
    if day:
        out += f"{new.day:02d}"
    return out + (time_part or "")


def has_utc_offset(value: str) -> bool:
    """Whether a DT value ends in a UTC offset suffix (``+hhmm`` / ``-hhmm``)."""
    m = _DT_RE.fullmatch(value.strip(" \x00"))
    return bool(m and m.group(5))


def burned_in_reason(ds: Dataset) -> str | None:
    """Why ``ds`` may carry burned-in patient data, or None when it does not."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "Burned In Annotation is YES"
    if flag == "NO":
        return None
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"modality {modality} often has burned-in text and Burned In Annotation is not NO"
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return f"Secondary Capture ({sop_class}) without Burned In Annotation = NO"
    return None


def hold_burned_in(reason: str | None, original_sop: str, allow_burned_in: bool) -> None:
    """Raise :class:`BurnedInAnnotationHeld` when ``reason`` says the instance may carry
    burned-in patient data and no clinician allowed it (both paths of the engine)."""
    if reason is None or allow_burned_in:
        return
    log.info("instance held back for burned-in annotation review")
    raise BurnedInAnnotationHeld(
        f"instance {original_sop or '(no SOP Instance UID)'} held back: {reason}; "
        "it may only be de-identified with a clinician's explicit permission "
        "(allow_burned_in=True)"
    )


def method_description(options: Iterable[Option]) -> list[str]:
    """De-identification Method (0012,0063) values (LO, each at most 64 characters)."""
    enabled = frozenset(options)
    values = [f"PS3.15 E.1-1 {TABLE_EDITION} {BASIC_PROFILE_CODE[1]}"]
    values += [OPTION_CODES[opt][1] for opt in Option if opt in enabled]
    return values


def method_code_items(options: Iterable[Option]) -> list[Dataset]:
    """De-identification Method Code Sequence items (CID 7050, scheme DCM)."""
    enabled = frozenset(options)
    codes = [BASIC_PROFILE_CODE] + [OPTION_CODES[opt] for opt in Option if opt in enabled]
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    return items


def check_pseudonym(pseudonym: str) -> None:
    """Raise ValidationError unless ``pseudonym`` fits PN and LO: 1-64 of [A-Za-z0-9._-]."""
    if not isinstance(pseudonym, str) or not _PSEUDONYM_RE.fullmatch(pseudonym):
        raise ValidationError(
            "case pseudonym must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-' "
            "starting with a letter or digit"
        )


def element_vr(ds: Dataset, tag: int) -> str:
    """VR of element ``tag`` of ``ds`` without parsing its value when possible."""
    raw = ds.get_item(tag)
    vr = raw.VR if raw is not None else None
    if not vr or vr == "UN":  # implicit VR, or stored as UN: pydicom will use the dictionary
        return dictionary_vr(tag)
    return str(vr)


def element_values(elem: DataElement) -> list[Any]:
    """The values of ``elem`` as a list ([] when empty)."""
    value = elem.value
    if isinstance(value, MutableSequence):  # MultiValue, Sequence, list
        return list(value)
    if value is None or (isinstance(value, bytes) and not value) or str(value) == "":
        return []
    return [value]


def _assign(elem: DataElement, values: list[Any]) -> None:
    elem.value = values[0] if len(values) == 1 else (values or empty_value_for_VR(elem.VR))


def dummy_value(vr: str) -> Any:
    """The fixed dummy value for action D on ``vr``."""
    return DUMMY_VALUES.get(vr, "X")


DOCUMENT_DUMMY_LENGTH = len(DUMMY_VALUES["OB"])
"""Encapsulated Document Length of a de-identified instance: the Encapsulated Document
(action D) is replaced by the OB dummy, so its length is the dummy's."""


class Pass:
    """One de-identification pass over one instance: the change of every element the
    profile does not keep (both paths: the engine walks a pydicom data set with
    :meth:`walk`, the byte path calls :meth:`apply` on each element it decodes)."""

    def __init__(self, deid: Keys, pseudonym: str, sop_uid: str = "") -> None:
        self.deid = deid
        self.profile = deid.profile
        self.pseudonym = pseudonym
        self.offset = deid.date_offset_days(pseudonym)
        self.sop_uid = sop_uid  # only named in a refusal
        self.counts: Counter[str] = Counter()

    def walk(self, ds: Dataset, in_clean: int) -> None:
        for tag in list(ds.keys()):
            vr = element_vr(ds, tag)
            treatment, _code = self.profile.treatment(tag, vr, in_clean_sequence=in_clean)
            if treatment is Treatment.KEEP:
                continue
            if treatment is Treatment.REMOVE:
                del ds[tag]
                self.counts["private" if (tag >> 16) & 1 else treatment.value] += 1
                continue
            self.apply(ds[tag], treatment, in_clean)

    def apply(self, elem: DataElement, treatment: Treatment, in_clean: int) -> None:
        if treatment in RECURSE_TREATMENTS:
            for item in elem.value or ():
                self.walk(item, child_context(in_clean, treatment))
            return
        if treatment is Treatment.REFUSE:
            if elem.value:
                raise refused_sequence(int(elem.tag), len(elem.value), self.sop_uid)
            return
        self.counts[treatment.value] += 1
        if treatment is Treatment.DOCUMENT_LENGTH:
            # the document is replaced by the dummy: its length is the dummy's
            elem.value = DOCUMENT_DUMMY_LENGTH
            return
        if treatment is Treatment.EMPTY:
            elem.value = empty_value_for_VR(elem.VR)
        elif treatment is Treatment.DUMMY:
            elem.value = dummy_value(elem.VR)
        elif treatment is Treatment.PSEUDONYM:
            elem.value = self.pseudonym
        elif treatment is Treatment.MAP_UID:
            _assign(elem, [self.deid.map_uid(str(v)) for v in element_values(elem)])
        elif treatment is Treatment.CLEAN_TEXT:
            _assign(elem, [clean_text(str(v)) for v in element_values(elem)])
        elif treatment is Treatment.SHIFT_DATE:
            self.shift(elem)
        elif treatment is Treatment.KEEP_VALID:
            values = element_values(elem)
            if not all(well_formed(elem.VR, v) for v in values):
                self.counts[Treatment.EMPTY.value] += 1
                elem.value = empty_value_for_VR(elem.VR)

    def shift(self, elem: DataElement) -> None:
        shifter = shift_datetime if elem.VR == "DT" else shift_date
        values = []
        for value in element_values(elem):
            new = shifter(str(value), self.offset)
            if new is None:
                self.counts[Treatment.DUMMY.value] += 1
                new = dummy_value(elem.VR)
            values.append(new)
        _assign(elem, values)


def finish_attributes(ds: Dataset, options: Iterable[Option], pseudonym: str) -> None:
    """Set the attributes every de-identified instance carries: Patient's Name and ID =
    the pseudonym, Patient Identity Removed, De-identification Method (+ Code Sequence)
    and Longitudinal Temporal Information Modified (PS3.15 E.3.6)."""
    enabled = frozenset(options)
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = method_description(enabled)
    ds.DeidentificationMethodCodeSequence = method_code_items(enabled)
    ds.LongitudinalTemporalInformationModified = (
        "MODIFIED" if Option.RETAIN_LONG_MODIFIED_DATES in enabled else "REMOVED"
    )
