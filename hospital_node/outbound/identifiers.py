"""The real patient's identifiers of a case, as byte patterns to search files for.

:func:`case_identifiers` gathers, at the hospital, what identifies the patient of a
case: from the pseudonym vault the Patient's Name, Patient ID and Birth Date; from the
original instances of the studies confirmed for the case (one instance per study) the
Accession Number, Other Patient IDs and the IDs of the Other Patient IDs Sequence.

:class:`IdentifierMatcher` searches bytes for them:

- names: every component of every component group of the PN value (Latin,
  ideographic, phonetic; ``^`` and ``=`` separated) of at least two characters, and the
  whole name written as ``Family^Given``, ``Family Given``, ``Given Family``,
  ``Family, Given`` and, for a group that is not Latin, ``FamilyGiven``;
- IDs and accession numbers of at least :data:`MIN_ID_CHARS` characters;
- the birth date as ``YYYYMMDD``, ``YYYY-MM-DD``, ``YYYY/MM/DD``, ``DD/MM/YYYY``,
  ``DD.MM.YYYY``, ``MM/DD/YYYY`` and ``YYYY年MM月DD日`` (also unpadded);

each encoded as UTF-8, UTF-16 (both byte orders) and, when not ASCII, GB18030;
case-insensitive (ASCII case by byte, other scripts by casefold/upper variants).
In a file's raw or decompressed bytes only patterns of at least :data:`MIN_BINARY_BYTES`
bytes are searched (a two-letter name would be "found" in any compressed stream);
text places (PDF text and metadata, PNG/JPEG text, headers, comments, names) are
searched for all of them. Latin names and IDs match whole words only (``Ann`` does
not hit ``Annual``; ID ``12345`` does not hit ``9123456``). A hit tells *which kind*
of identifier was found, never its value; the matcher's ``repr`` withholds everything.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom import dcmread

from gateway.errors import NotFound, YigongError
from gateway.storage import ObjectStore
from hospital_node.vault import PseudonymVault

log = logging.getLogger(__name__)

MIN_ID_CHARS = 3
MIN_DIGIT_ID_CHARS = 4
MIN_BINARY_BYTES = 5
NAME = "the patient's name"
PATIENT_ID = "the patient ID"
OTHER_ID = "another ID of the patient"
BIRTH_DATE = "the patient's birth date"
ACCESSION = "an accession number of the patient's studies"
_ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be")
_HEADER_TAGS = [0x00080005, 0x00080050, 0x00101000, 0x00101002]
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")


@dataclass(frozen=True)
class _Pattern:
    what: str
    needle: bytes  # lower-cased bytes
    width: int  # bytes per character unit for the boundary check (1, or 2 for UTF-16)
    big_endian: bool
    boundary: bytes  # b"" (none), b"alnum" or b"digit"


def _alternation(patterns: list[_Pattern]) -> re.Pattern[bytes] | None:
    if not patterns:
        return None
    return re.compile(b"|".join(re.escape(p.needle) for p in patterns))


def _is_boundary_char(byte: int, kind: bytes) -> bool:
    if kind == b"digit":
        return 0x30 <= byte <= 0x39
    return 0x30 <= byte <= 0x39 or 0x61 <= byte <= 0x7A or 0x41 <= byte <= 0x5A


class IdentifierMatcher:
    """Searches bytes for one patient's identifiers (see the module doc)."""

    def __init__(self, needles: Iterable[tuple[str, str]]) -> None:
        patterns: dict[tuple[bytes, int, bool], _Pattern] = {}
        for what, text in needles:
            text = text.strip()
            if not text:
                continue
            ascii_word = text.isascii() and text[0].isalnum() and text[-1].isalnum()
            boundary = b""
            if ascii_word:
                boundary = b"digit" if text.isdigit() else b"alnum"
            variants = {text, text.lower(), text.upper(), text.casefold()}
            encodings = _ENCODINGS if text.isascii() else (*_ENCODINGS, "gb18030")
            for variant in variants:
                for enc in encodings:
                    try:
                        raw = variant.encode(enc).lower()
                    except UnicodeEncodeError:
                        continue
                    width = 2 if enc.startswith("utf-16") else 1
                    key = (raw, width, enc.endswith("be"))
                    patterns.setdefault(
                        key, _Pattern(what, raw, width, enc.endswith("be"), boundary)
                    )
        self._patterns = sorted(patterns.values(), key=lambda p: -len(p.needle))
        # one alternation per kind of place: far faster than one find() per pattern
        self._any = _alternation(self._patterns)
        self._binary = _alternation(
            [p for p in self._patterns if len(p.needle) >= MIN_BINARY_BYTES]
        )
        digest = hashlib.sha256()
        for p in self._patterns:
            digest.update(p.needle + b"\x00" + p.what.encode() + b"\x00")
        self.fingerprint = digest.hexdigest()
        self.overlap = max((len(p.needle) for p in self._patterns), default=0) + 4

    def __repr__(self) -> str:
        return f"IdentifierMatcher(<{len(self._patterns)} patterns withheld>)"

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def search(self, data: bytes, *, binary: bool = False) -> str | None:
        """The kind of the first identifier found in ``data``, or None.

        ``binary``: ``data`` is a file's raw or decompressed bytes, where a pattern of
        fewer than :data:`MIN_BINARY_BYTES` bytes (``Li`` in UTF-8 or UTF-16) would be
        found by chance in any few megabytes; those are searched in text places only.
        """
        rx = self._binary if binary else self._any
        if rx is None or not data:
            return None
        low = data.lower()
        found = rx.search(low)
        while found is not None:
            start = found.start()
            for p in self._patterns:
                if binary and len(p.needle) < MIN_BINARY_BYTES:
                    continue
                if low.startswith(p.needle, start) and (
                    not p.boundary or self._whole(low, start, p)
                ):
                    return p.what
            found = rx.search(low, start + 1)
        return None

    def search_text(self, text: str) -> str | None:
        return self.search(text.encode("utf-8", "replace"))

    @staticmethod
    def _whole(low: bytes, start: int, p: _Pattern) -> bool:
        end = start + len(p.needle)
        w = p.width
        for unit in (low[start - w : start] if start >= w else b"", low[end : end + w]):
            if len(unit) != w:
                continue
            if w == 1:
                char, high = unit[0], 0
            elif p.big_endian:
                high, char = unit[0], unit[1]
            else:
                char, high = unit[0], unit[1]
            if high == 0 and _is_boundary_char(char, p.boundary):
                return False
        return True


def name_needles(value: str) -> list[str]:
    """Search forms of a PN value: components, and the whole name per group."""
    found: list[str] = []
    for group in value.split("="):
        parts = [c.strip() for c in group.split("^")]
        named = [c for c in parts if c]
        found.extend(c for c in named if len(c) >= 2)
        for word in (w for c in named for w in c.split()):
            if len(word) >= 2:
                found.append(word)
        if len(named) >= 2:
            family, given = named[0], named[1]
            found += [
                "^".join(parts).rstrip("^"),
                f"{family} {given}",
                f"{given} {family}",
                f"{family}, {given}",
                f"{family},{given}",
            ]
            if not group.isascii():
                found.append(family + given)
    return found


def id_needles(value: str) -> list[str]:
    value = value.strip()
    need = MIN_DIGIT_ID_CHARS if value.isdigit() else MIN_ID_CHARS
    return [value] if len(value) >= need else []


def date_needles(value: str) -> list[str]:
    """Written forms of a DICOM DA value ``YYYYMMDD``."""
    match = _DATE.fullmatch(value.strip())
    if match is None:
        return []
    y, m, d = match.groups()
    mi, di = str(int(m)), str(int(d))
    return [
        f"{y}{m}{d}",
        f"{y}-{m}-{d}",
        f"{y}/{m}/{d}",
        f"{d}/{m}/{y}",
        f"{d}.{m}.{y}",
        f"{m}/{d}/{y}",
        f"{y}年{m}月{d}日",
        f"{y}年{mi}月{di}日",
    ]


def patient_needles(
    name: str,
    patient_id: str,
    birth_date: str,
    other_ids: Iterable[str] = (),
    accession_numbers: Iterable[str] = (),
) -> list[tuple[str, str]]:
    needles = [(NAME, n) for n in name_needles(name)]
    needles += [(PATIENT_ID, n) for n in id_needles(patient_id)]
    needles += [(OTHER_ID, n) for v in other_ids for n in id_needles(v)]
    needles += [(BIRTH_DATE, n) for n in date_needles(birth_date)]
    needles += [(ACCESSION, n) for v in accession_numbers for n in id_needles(v)]
    return needles


def study_identifiers(data: bytes) -> tuple[list[str], list[str]]:
    """(other patient IDs, accession numbers) of one original instance."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:  # an unreadable original adds nothing; the vault identity remains
        return [], []
    others: list[str] = []
    raw = ds.get("OtherPatientIDs", None)
    if raw:
        others += [str(v) for v in (raw if isinstance(raw, list | tuple) else [raw])]
        others += [str(v) for v in str(raw).split("\\")]
    for item in ds.get("OtherPatientIDsSequence", None) or []:
        if item.get("PatientID"):
            others.append(str(item.PatientID))
    accession = str(ds.get("AccessionNumber", "") or "").strip()
    return others, [accession] if accession else []


def case_identifiers(
    case_id: str,
    vault: PseudonymVault,
    study_uids: Iterable[str],
    first_object: Callable[[str], str],
    store: ObjectStore,
) -> IdentifierMatcher:
    """The matcher for the patient of ``case_id`` (empty when the vault has no entry).

    ``first_object(study_uid)`` gives the object id of one original instance of a study
    (or "").
    """
    if not case_id or not vault.has_case(case_id):
        return IdentifierMatcher(())
    try:
        patient = vault.lookup(case_id)
    except NotFound:
        return IdentifierMatcher(())
    others: list[str] = []
    accessions: list[str] = []
    for uid in study_uids:
        oid = first_object(uid)
        if not oid:
            continue
        try:
            with store.open_read(oid) as chunks:
                data = b"".join(chunks)
        except YigongError:
            log.warning("case %s: original of study %s unreadable for the scan", case_id, uid)
            continue
        more_ids, more_acc = study_identifiers(data)
        others += more_ids
        accessions += more_acc
    return IdentifierMatcher(
        patient_needles(
            patient.patient_name, patient.patient_id, patient.birth_date, others, accessions
        )
    )
