"""The DICOM de-identifier of the hospital node (invariants 2 and 4).

Implements PS3.15 Annex E (Table E.1-1, edition 2024b, see :mod:`.profile`): the Basic
Application Level Confidentiality Profile with the options Retain Longitudinal
Temporal Information with Modified Dates, Retain Patient Characteristics and Clean
Descriptors, applied recursively to every sequence item.

- UIDs (action U, and D on UI) are replaced by ``2.25.<n>`` where ``n`` is the first
  128 bits of HMAC-SHA256(key, "yigong.deid.uid.v1\\0" + uid) as a decimal integer:
  deterministic, so references within and across a patient's studies stay consistent
  (Frame of Reference UIDs included, which keeps spatial relationships), and
  unlinkable without the key. UIDs under the DICOM root (1.2.840.10008.) are
  well-known UIDs, not instance identifiers, and are kept.
- Dates (every DA and the date part of every DT that is kept) are shifted by a whole
  number of days in [-3650, -365] derived from the key and the pseudonym, so all
  intervals of one patient are preserved; times are unchanged. Partial DT values keep
  their precision; a DT's UTC offset suffix is dropped (it would tell the season). A
  value that is not a date is replaced by a fixed dummy date.
- The release de-identifies with :meth:`Deidentifier.for_recipient`: one key (so one
  UID mapping and one date offset) and one pseudonym per patient and destination.
- Patient's Name and Patient ID become the pseudonym; Patient Identity Removed,
  De-identification Method (+ Code Sequence, CID 7050) and Longitudinal Temporal
  Information Modified (PS3.15 E.3.6) are set.
- Pixel data and geometry are never touched: both hashes of :mod:`gateway.fidelity.dicom`
  are computed before and after, and any difference raises ``IntegrityError``.

The key must never leave the hospital node: with the key and a pseudonym anybody can
undo the date shift.

This module is the entry point (:class:`Deidentifier`) and the pydicom path; the
transform it shares with the byte path of :mod:`.fast` (UID mapping, date shift, each
treatment, the finishing attributes, the checks) lives in :mod:`.transform`, whose
names stay importable from here.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import logging
from collections.abc import Iterable

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from gateway.errors import (
    BurnedInAnnotationHeld,
    ConfigError,
    DeidRefused,
    ValidationError,
)
from gateway.fidelity.dicom import geometry_hash, pixel_hash
from hospital_node.deid import fast
from hospital_node.deid.profile import (
    DEFAULT_OPTIONS,
    ConfidentialityProfile,
    Option,
    Treatment,
    default_profile,
)
from hospital_node.deid.transform import (
    BURNED_IN_MODALITIES,
    DATE_OFFSET_RANGE,
    DICOM_UID_ROOT,
    DOCUMENT_DUMMY_LENGTH,
    IMPLEMENTATION_VERSION_NAME,
    MAPPED_UID_ROOT,
    MIN_KEY_BYTES,
    SECONDARY_CAPTURE_CLASSES,
    DeidResult,
    Pass,
    burned_in_reason,
    check_pseudonym,
    check_unchanged,
    date_offset_days,
    dummy_value,
    element_values,
    element_vr,
    finish_attributes,
    has_utc_offset,
    hold_burned_in,
    map_uid,
    method_code_items,
    method_description,
    refused_sequence,
    shift_date,
    shift_datetime,
)

__all__ = [  # the transform's names stay importable from here, where they were defined
    "BURNED_IN_MODALITIES",
    "DATE_OFFSET_RANGE",
    "DICOM_UID_ROOT",
    "DOCUMENT_DUMMY_LENGTH",
    "FAST_PATH",
    "IMPLEMENTATION_VERSION_NAME",
    "MAPPED_UID_ROOT",
    "MIN_KEY_BYTES",
    "SECONDARY_CAPTURE_CLASSES",
    "BurnedInAnnotationHeld",
    "ConfidentialityProfile",
    "DeidRefused",
    "DeidResult",
    "Deidentifier",
    "Treatment",
    "burned_in_reason",
    "check_pseudonym",
    "check_unchanged",
    "date_offset_days",
    "dummy_value",
    "element_values",
    "element_vr",
    "has_utc_offset",
    "hold_burned_in",
    "map_uid",
    "method_code_items",
    "method_description",
    "refused_sequence",
    "shift_date",
    "shift_datetime",
]

log = logging.getLogger(__name__)
_RECIPIENT_LABEL = b"yigong.deid.recipient.v1\x00"

FAST_PATH = True
"""Process-wide switch for :mod:`.fast` (``Deidentifier(..., fast=False)`` per instance)."""


class Deidentifier:
    """De-identifies DICOM instances under one federation key and one set of options."""

    def __init__(
        self, key: bytes, *, options: Iterable[Option] = DEFAULT_OPTIONS, fast: bool = True
    ) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the de-identification key must be at least {MIN_KEY_BYTES} bytes")
        self._key = bytes(key)
        self.fast = fast  # try :mod:`.fast` first in deidentify_part10 (falls back to this)
        opts = frozenset(options)
        self.profile = (
            default_profile() if opts == DEFAULT_OPTIONS else ConfidentialityProfile(opts)
        )

    def __repr__(self) -> str:
        return f"Deidentifier(options={sorted(o.value for o in self.profile.options)})"

    def for_recipient(self, context: bytes) -> Deidentifier:
        """The de-identifier of one patient and one destination (``context`` names both).

        Its key is HMAC-SHA256(this key, label + context): UID mapping and date offset
        are the same for everything one destination receives about one patient, and
        share nothing with what another destination receives about the same patient.
        """
        if not context:
            raise ConfigError("a recipient de-identifier needs a non-empty context")
        sub = hmac.new(self._key, _RECIPIENT_LABEL + bytes(context), hashlib.sha256).digest()
        return Deidentifier(sub, options=self.profile.options, fast=self.fast)

    def map_uid(self, uid: str) -> str:
        """The replacement of ``uid`` under this key."""
        return map_uid(self._key, uid)

    def date_offset_days(self, pseudonym: str) -> int:
        """The date shift (days) of the patient behind ``pseudonym``."""
        return date_offset_days(self._key, pseudonym)

    def deidentify(
        self, ds: Dataset, pseudonym: str, *, allow_burned_in: bool = False
    ) -> DeidResult:
        """De-identify a copy of ``ds`` (``ds`` itself is not modified).

        Raises BurnedInAnnotationHeld (unless ``allow_burned_in``), ValidationError for a
        bad pseudonym and IntegrityError if geometry or pixel data changed.
        """
        return self._run(ds, pseudonym, allow_burned_in=allow_burned_in, in_place=False)

    def deidentify_part10(
        self, data: bytes, pseudonym: str, *, allow_burned_in: bool = False
    ) -> tuple[bytes, DeidResult]:
        """De-identify a Part-10 file; the output keeps the transfer syntax and pixel bytes."""
        if self.fast and FAST_PATH:
            try:
                return fast.deidentify_part10_fast(
                    self, data, pseudonym, allow_burned_in=allow_burned_in
                )
            except fast.FastPathUnsupported:
                pass  # the engine below handles (or rejects) everything else
        try:
            ds = dcmread(io.BytesIO(data))
        except Exception as exc:
            raise ValidationError(
                f"not a readable DICOM Part-10 file: {type(exc).__name__}"
            ) from exc
        meta = getattr(ds, "file_meta", None)
        if meta is None or "TransferSyntaxUID" not in meta:
            raise ValidationError("not a DICOM Part-10 file: no Transfer Syntax UID in file meta")
        result = self._run(ds, pseudonym, allow_burned_in=allow_burned_in, in_place=True)
        out = result.dataset
        out.preamble = b"\x00" * 128  # the input preamble may hold anything (e.g. TIFF)
        buffer = io.BytesIO()
        try:
            dcmwrite(buffer, out, enforce_file_format=True)
        except Exception as exc:
            raise ValidationError(
                f"could not encode de-identified instance {result.new_sop_uid}: "
                f"{type(exc).__name__}"
            ) from exc
        return buffer.getvalue(), result

    def deidentify_bytes(
        self, data: bytes, pseudonym: str, *, allow_burned_in: bool = False
    ) -> bytes:
        """:meth:`deidentify_part10` without the result details."""
        return self.deidentify_part10(data, pseudonym, allow_burned_in=allow_burned_in)[0]

    def _run(
        self, ds: Dataset, pseudonym: str, *, allow_burned_in: bool, in_place: bool
    ) -> DeidResult:
        check_pseudonym(pseudonym)
        original_sop = str(ds.get("SOPInstanceUID", "") or "")
        hold_burned_in(burned_in_reason(ds), original_sop, allow_burned_in)
        geo_before, pix_before = geometry_hash(ds), pixel_hash(ds)
        out = ds if in_place else copy.deepcopy(ds)
        run = Pass(self, pseudonym, original_sop)
        run.walk(out, in_clean=False)
        self._finish(out, pseudonym)
        new_sop = str(out.get("SOPInstanceUID", "") or "")
        geo_after, pix_after = geometry_hash(out), pixel_hash(out)
        check_unchanged((geo_before, pix_before), (geo_after, pix_after), new_sop)
        log.debug("de-identified instance %s (%d changes)", new_sop, sum(run.counts.values()))
        return DeidResult(
            dataset=out,
            original_sop_uid=original_sop,
            new_sop_uid=new_sop,
            geometry_hash=geo_after,
            pixel_hash=pix_after,
            actions_applied=dict(run.counts),
        )

    def _finish(self, ds: Dataset, pseudonym: str) -> None:
        finish_attributes(ds, self.profile.options, pseudonym)
        old_meta = getattr(ds, "file_meta", None)
        if old_meta is None:
            return
        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = ds.get(
            "SOPClassUID", old_meta.get("MediaStorageSOPClassUID")
        )
        meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "")
        if "TransferSyntaxUID" in old_meta:
            meta.TransferSyntaxUID = old_meta.TransferSyntaxUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        ds.file_meta = meta
