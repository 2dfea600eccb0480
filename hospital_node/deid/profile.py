"""PS3.15 Annex E, Table E.1-1 (edition 2024b): the attribute table and its actions.

Source: DICOM PS3.15 2024b, Annex E "Attribute Confidentiality Profiles", Table E.1-1
"Application Level Confidentiality Profile Attributes", as extracted to JSON by the
innolitics/dicom-standard project (MIT licence). The file ships with this package
(``ps3.15-table-e1-1-2024b.json``) and is loaded once at import.

Each row has a ``basicProfile`` action code and, per option column, an optional
override. We implement the Basic Application Level Confidentiality Profile with the
options *Retain Longitudinal Temporal Information with Modified Dates*
(``rtnLongModifDatesOpt``), *Retain Patient Characteristics* (``rtnPatCharsOpt``)
and *Clean Descriptors* (``cleanDescOpt``).

Action resolution (:func:`resolve_action`), in order:

1. An enabled option column that has a cell for the row overrides ``basicProfile``.
   If several enabled option columns have cells and disagree, the most protective
   wins (X > Z > D > U > C > K); in 2024b the only overlaps (Allergies, Patient
   State) agree on C.
2. Combined codes depend on the attribute's type in the IOD, which we do not know
   per attribute, so we choose conservatively, aiming to keep the object valid:
   ``X/Z`` -> Z, ``X/D`` -> D, ``Z/D`` -> D, ``X/Z/D`` -> D, ``X/Z/U*`` -> U.
   Z keeps a type-2 attribute present but empty; D keeps a type-1 attribute valid
   with a dummy value (fixed per VR, see :data:`DUMMY_VALUES`; a UID gets its mapped
   UID). A sequence cannot get a dummy item without knowing its IOD or template, so
   D on a sequence is decided by the row's basic code: ``X/Z/D`` and ``Z/D`` empty it
   (zero items, valid where it is type 2 or 3), ``X/D`` removes it, and a plain ``D``
   (Content Sequence of SR and KO, Graphic Annotation, Verifying Observer, ...) that
   holds items refuses the whole instance (:class:`Treatment.REFUSE`): emptying it
   would empty the document;
   U keeps reference sequences (Referenced Image / Source Image)
   and replaces every UID inside them consistently, preserving the links between
   instances; their items keep only what references (UIDs, numbers, coded strings,
   nested sequences, coded entries with Code Meaning cleaned), see
   :data:`REFERENCE_VRS`.
3. C ("clean") is applied by VR: DA/DT dates are shifted by the per-patient offset;
   TM is kept (the shift is a whole number of days, so time of day is unchanged);
   text VRs are cleaned with the allowlist (:mod:`hospital_node.deid.clean`);
   sequences are kept and everything textual inside them is cleaned. C on a VR
   that cannot be cleaned (OB, UN, ...) falls back to the basic-profile action
   resolved by rule 2.

Beyond the table (decided in :meth:`ConfidentialityProfile.treatment`):
private attributes, group lengths, command-group elements and file-meta elements
misplaced in a data set body are removed (the file meta itself is rebuilt); every
element of an overlay group (60xx, even) is removed, not only Overlay Data and
Comments; Timezone Offset From UTC is removed (with shifted dates, a daylight-saving
offset would tell the season of the real date); Encapsulated Document Length is set
to the length of the dummy document that replaces the original; Patient's Name and
Patient ID get the pseudonym; any other PN attribute gets a dummy; a public attribute
unknown to the data dictionary with VR UN (an opaque blob that cannot be inspected)
is removed. Every free-text attribute (SH, LO, ST, LT, UT, UC) the table does not
list is cleaned with the allowlist at any depth, top level or nested in any
sequence, and every URL (UR) it does not list is removed (a Retrieve URL holds the
original UIDs), unless :data:`KEPT_BY_NAME` keeps it by keyword; everything else not in
the table is kept, with dates shifted and sequences recursed into.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from importlib import resources
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword

from gateway.errors import ConfigError

TABLE_EDITION = "2024b"
TABLE_RESOURCE = "ps3.15-table-e1-1-2024b.json"
TABLE_CITATION = (
    "DICOM PS3.15 2024b Annex E Table E.1-1 (Application Level Confidentiality Profile Attributes)"
)

PATIENT_NAME_TAG = 0x00100010
PATIENT_ID_TAG = 0x00100020


class Action(StrEnum):
    """Action codes of Table E.1-1 after resolution."""

    KEEP = "K"
    REMOVE = "X"
    ZERO = "Z"
    DUMMY = "D"
    CLEAN = "C"
    UID = "U"


class Option(StrEnum):
    """Option columns of Table E.1-1 we support (value = JSON key)."""

    RETAIN_LONG_MODIFIED_DATES = "rtnLongModifDatesOpt"
    RETAIN_PATIENT_CHARACTERISTICS = "rtnPatCharsOpt"
    CLEAN_DESCRIPTORS = "cleanDescOpt"


DEFAULT_OPTIONS: frozenset[Option] = frozenset(Option)

BASIC_PROFILE_CODE: tuple[str, str] = ("113100", "Basic Application Confidentiality Profile")
"""CID 7050 code (scheme DCM) for the profile itself."""

OPTION_CODES: Mapping[Option, tuple[str, str]] = {
    Option.RETAIN_LONG_MODIFIED_DATES: (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    Option.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    Option.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
}
"""CID 7050 codes (scheme DCM) for the options, in the order they are declared."""

_KNOWN_CODES = {"K", "X", "Z", "D", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
COMBINED_RULES: Mapping[str, Action] = {
    "X/Z": Action.ZERO,
    "X/D": Action.DUMMY,
    "Z/D": Action.DUMMY,
    "X/Z/D": Action.DUMMY,
    "X/Z/U*": Action.UID,
}
_STRICTNESS = "XZDUCK"  # most protective first

TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "CS"})
FREE_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})
"""VRs cleaned inside a sequence whose action is C (CS holds defined terms, not prose)."""
DATE_VRS = frozenset({"DA", "DT"})

WELL_FORMED: dict[str, re.Pattern[str]] = {
    "AS": re.compile(r"^\d{3}[DWMY]$"),
    "CS": re.compile(r"^[A-Z0-9 _]{0,16}$"),
    "DS": re.compile(r"^ *[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)? *$"),
    "IS": re.compile(r"^ *[+-]?\d{1,12} *$"),
}
"""Retained (K) values of these VRs are kept only when they match their format."""


def well_formed(vr: str, value: object) -> bool:
    pattern = WELL_FORMED.get(vr)
    return pattern is None or bool(pattern.match(str(value)))


KEPT_BY_NAME: Mapping[str, str] = {
    "CodeValue": "coded-entry identifier from a coding scheme (its Code Meaning is cleaned)",
    "CodingSchemeDesignator": "names the coding scheme of a code",
    "CodingSchemeVersion": "version of the coding scheme of a code",
    "LongCodeValue": "coded-entry identifier from a coding scheme",
    "RescaleType": "units of the rescaled pixel values: part of the geometry, never changed",
    "URNCodeValue": "coded-entry identifier from a coding scheme (a URN)",
    "CodingSchemeURL": "where a coding scheme is published, not about the patient",
}
"""Free-text (and URL) attributes not listed in Table E.1-1 that are kept verbatim, by
keyword, with the reason. Every other unlisted free-text attribute is cleaned and every
other unlisted URL (UR) removed, at any depth."""

CODED_ENTRY_TAGS = frozenset(
    {
        0x00080100,  # Code Value
        0x00080102,  # Coding Scheme Designator
        0x00080103,  # Coding Scheme Version
        0x00080119,  # Long Code Value
        0x00080120,  # URN Code Value
    }
)
"""Coded-entry identifiers (kept by name, see :data:`KEPT_BY_NAME`)."""

KEPT_BY_NAME_TAGS: frozenset[int] = frozenset(
    int(tag_for_keyword(keyword) or 0) for keyword in KEPT_BY_NAME
)

TIMEZONE_OFFSET_TAG = 0x00080201
ENCAPSULATED_DOCUMENT_TAG = 0x00420011
ENCAPSULATED_DOCUMENT_LENGTH_TAG = 0x00420015
CONTENT_SEQUENCE_TAG = 0x0040A730

DUMMY_TEXT = "X"
DUMMY_NAME = "ANONYMOUS"
DUMMY_VALUES: Mapping[str, Any] = {
    "PN": DUMMY_NAME,
    "AE": DUMMY_NAME,
    "AS": "000Y",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "UR": DUMMY_TEXT,
    **{vr: DUMMY_TEXT for vr in ("SH", "LO", "ST", "LT", "UT", "UC", "CS")},
    **{vr: 0 for vr in ("US", "SS", "UL", "SL", "UV", "SV", "AT")},
    **{vr: 0.0 for vr in ("FL", "FD")},
    **{vr: b"\x00" * 8 for vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN")},
}
"""Fixed dummy values for action D by VR (UI gets a mapped UID, SQ an empty sequence).

Dummy dates are fixed, not shifted: they carry no information to preserve.
"""


class Treatment(Enum):
    """What the de-identifier does to one element; the scanner checks the same."""

    REMOVE = "remove"
    EMPTY = "empty"
    DUMMY = "dummy"
    MAP_UID = "map-uid"
    PSEUDONYM = "pseudonym"
    CLEAN_TEXT = "clean-text"
    SHIFT_DATE = "shift-date"
    RECURSE = "recurse"
    RECURSE_CLEAN = "recurse-clean"
    RECURSE_REFERENCE = "recurse-reference"
    KEEP = "keep"
    KEEP_VALID = "keep-if-well-formed"
    REFUSE = "refuse-if-items"
    DOCUMENT_LENGTH = "document-length"


IN_REFERENCE = 2
"""``in_clean_sequence`` value inside a sequence kept for its references (action U on a
sequence: Referenced Image, Source Image). 0 = plain, 1 = inside a cleaned sequence."""
REFERENCE_VRS = frozenset(
    {"UI", "SQ", "CS", "IS", "US", "UL", "SS", "SL", "UV", "SV", "FL", "FD", "DS", "AT"}
)
"""What an item of a reference sequence keeps: UIDs, numbers (frame and segment numbers),
coded strings and nested sequences, plus the coded entries of :data:`KEPT_BY_NAME` and
Code Meaning (cleaned), which a Purpose of Reference code needs to stay valid."""
CODE_MEANING_TAG = 0x00080104


def child_context(context: int, treatment: Treatment) -> int:
    """The ``in_clean_sequence`` value for the items of a sequence given ``treatment``."""
    if context == IN_REFERENCE or treatment is Treatment.RECURSE_REFERENCE:
        return IN_REFERENCE
    return 1 if context or treatment is Treatment.RECURSE_CLEAN else 0


RECURSE_TREATMENTS = frozenset(
    {Treatment.RECURSE, Treatment.RECURSE_CLEAN, Treatment.RECURSE_REFERENCE}
)


@dataclass(frozen=True, slots=True)
class TableRow:
    """One row of Table E.1-1 with its tag pattern parsed and its action resolved."""

    name: str
    tag_text: str
    row_id: str
    basic: str
    cells: Mapping[str, str]
    action: Action
    fallback: Action
    tag: int | None
    mask: int
    value: int
    odd_groups: bool

    def matches(self, tag: int) -> bool:
        if self.odd_groups:
            return bool((tag >> 16) & 1)
        return (tag & self.mask) == self.value


def parse_tag_pattern(text: str) -> tuple[int | None, int, int, bool]:
    """Parse a Table E.1-1 tag cell into (tag or None, mask, value, odd-groups).

    ``(0008,0050)`` is concrete; ``(50XX,XXXX)`` and ``(60XX,3000)`` are wildcard
    patterns matched with ``tag & mask == value``; ``(GGGG,EEEE) WHERE GGGG IS ODD``
    denotes all private attributes.
    """
    norm = text.strip().upper()
    if norm.startswith("(GGGG,EEEE)") and "ODD" in norm:
        return None, 0, 0, True
    m = re.fullmatch(r"\(([0-9A-FX]{4}),([0-9A-FX]{4})\)", norm)
    if not m:
        raise ConfigError(f"Table E.1-1 row has an unparseable tag {text!r}")
    digits = m.group(1) + m.group(2)
    mask = int("".join("0" if c == "X" else "F" for c in digits), 16)
    value = int(digits.replace("X", "0"), 16)
    concrete = value if mask == 0xFFFFFFFF else None
    return concrete, mask, value, False


def resolve_combined(code: str) -> Action:
    """Resolve a basic-profile code, combined or not, to one action (rule 2)."""
    if code in COMBINED_RULES:
        return COMBINED_RULES[code]
    return Action(code)


def resolve_action(basic: str, cells: Mapping[str, str], options: Iterable[Option]) -> Action:
    """Resolve a row's action under ``options`` (rules 1 and 2 of the module docstring)."""
    chosen = [cells[opt.value] for opt in options if opt.value in cells]
    if not chosen:
        return resolve_combined(basic)
    strictest = min(
        (resolve_combined(code) for code in chosen), key=lambda a: _STRICTNESS.index(a.value)
    )
    return strictest


@functools.cache
def load_table() -> tuple[Mapping[str, str], ...]:
    """The raw rows of the packaged Table E.1-1 (validated once, then cached)."""
    try:
        text = resources.files(__package__).joinpath(TABLE_RESOURCE).read_text("utf-8")
        rows = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load packaged {TABLE_RESOURCE}: {exc}") from exc
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{TABLE_RESOURCE} is not a non-empty JSON list")
    for row in rows:
        if not isinstance(row, dict) or "tag" not in row or "basicProfile" not in row:
            raise ConfigError(f"{TABLE_RESOURCE} has a row without tag/basicProfile")
        codes = [v for k, v in row.items() if k == "basicProfile" or k.endswith("Opt")]
        bad = [c for c in codes if c not in _KNOWN_CODES]
        if bad:
            raise ConfigError(f"{TABLE_RESOURCE} row {row['tag']} has unknown action {bad[0]!r}")
    return tuple(rows)


class ConfidentialityProfile:
    """Table E.1-1 resolved under a set of options; answers "what to do with this tag"."""

    def __init__(self, options: Iterable[Option] = DEFAULT_OPTIONS) -> None:
        self.options: frozenset[Option] = frozenset(options)
        rows: list[TableRow] = []
        for raw in load_table():
            tag, mask, value, odd = parse_tag_pattern(raw["tag"])
            cells = {k: v for k, v in raw.items() if k.endswith("Opt")}
            rows.append(
                TableRow(
                    name=raw.get("name", ""),
                    tag_text=raw["tag"],
                    row_id=raw.get("id", ""),
                    basic=raw["basicProfile"],
                    cells=cells,
                    action=resolve_action(raw["basicProfile"], cells, self.options),
                    fallback=resolve_combined(raw["basicProfile"]),
                    tag=tag,
                    mask=mask,
                    value=value,
                    odd_groups=odd,
                )
            )
        self.rows: tuple[TableRow, ...] = tuple(rows)
        self._exact = {r.tag: r for r in rows if r.tag is not None}
        self._patterns = tuple(r for r in rows if r.tag is None and not r.odd_groups)
        self._private = next((r for r in rows if r.odd_groups), None)
        self.shift_dates = Option.RETAIN_LONG_MODIFIED_DATES in self.options

    def lookup(self, tag: int) -> TableRow | None:
        """The table row governing ``tag``, or None when the table does not list it."""
        row = self._exact.get(tag)
        if row is not None:
            return row
        if (tag >> 16) & 1:
            return self._private
        for pattern in self._patterns:
            if pattern.matches(tag):
                return pattern
        return None

    def treatment(self, tag: int, vr: str, *, in_clean_sequence: int) -> tuple[Treatment, str]:
        """Decide what happens to element ``tag`` with runtime ``vr``.

        Returns the treatment and the table code it came from (for counting and for
        the scanner's messages; "" when the table does not list the attribute).
        """
        group = tag >> 16
        if group & 1 or group in (0x0000, 0x0002) or (tag & 0xFFFF) == 0:
            # private, command group, file meta in a data set body (the file meta is
            # rebuilt from scratch), group lengths
            return Treatment.REMOVE, "X"
        if 0x6000 <= group <= 0x601E or tag == TIMEZONE_OFFSET_TAG:
            # every element of an overlay (not only its data and comments); the timezone
            # offset would tell the season (daylight saving) of the shifted dates
            return Treatment.REMOVE, "X"
        if (
            in_clean_sequence == IN_REFERENCE
            and vr not in REFERENCE_VRS
            and tag not in KEPT_BY_NAME_TAGS
            and tag != CODE_MEANING_TAG
        ):
            return Treatment.REMOVE, "X"  # a reference item keeps only what references
        if tag in (PATIENT_NAME_TAG, PATIENT_ID_TAG):
            return Treatment.PSEUDONYM, "D"
        if tag == ENCAPSULATED_DOCUMENT_LENGTH_TAG:
            return Treatment.DOCUMENT_LENGTH, "D"
        row = self.lookup(tag)
        if row is None:
            return self._untabled(tag, vr, in_clean_sequence), ""
        action = row.action
        if action is Action.CLEAN:
            treatment = self._clean_treatment(vr)
            if treatment is not None:
                return treatment, action.value
            action = row.fallback
        if action is Action.DUMMY and vr == "SQ":
            return self._dummy_sequence(row.basic), action.value
        return self._basic_treatment(action, vr), action.value

    @staticmethod
    def _dummy_sequence(basic: str) -> Treatment:
        """D on a sequence (no dummy item can be made without IOD or template knowledge)."""
        if "Z" in basic:
            return Treatment.EMPTY  # X/Z/D, Z/D: zero items is valid where it is type 2/3
        if "X" in basic:
            return Treatment.REMOVE  # X/D: absent is valid where it is type 3
        return Treatment.REFUSE  # plain D: emptying it would empty the document

    def _untabled(self, tag: int, vr: str, in_clean_sequence: int) -> Treatment:
        if vr == "SQ":
            if in_clean_sequence == IN_REFERENCE:
                return Treatment.RECURSE_REFERENCE
            return Treatment.RECURSE_CLEAN if in_clean_sequence else Treatment.RECURSE
        if vr in DATE_VRS and self.shift_dates:
            return Treatment.SHIFT_DATE
        if vr == "PN":
            return Treatment.DUMMY
        if vr == "UN" and not dictionary_has_tag(tag):
            return Treatment.REMOVE
        if vr in FREE_TEXT_VRS and tag not in KEPT_BY_NAME_TAGS:
            return Treatment.CLEAN_TEXT  # at any depth, in any sequence
        if vr == "UR" and tag not in KEPT_BY_NAME_TAGS:
            return Treatment.REMOVE  # a retrieve/storage URL names the hospital's originals
        return Treatment.KEEP

    def _clean_treatment(self, vr: str) -> Treatment | None:
        if vr in DATE_VRS:
            return Treatment.SHIFT_DATE if self.shift_dates else None
        if vr == "TM":
            return Treatment.KEEP if self.shift_dates else None
        if vr in TEXT_VRS:
            return Treatment.CLEAN_TEXT
        if vr == "SQ":
            return Treatment.RECURSE_CLEAN
        return None

    def _basic_treatment(self, action: Action, vr: str) -> Treatment:
        if action is Action.REMOVE:
            return Treatment.REMOVE
        if action is Action.ZERO or (action is Action.DUMMY and vr == "SQ"):
            # A dummy sequence cannot be synthesised without IOD knowledge: emptied.
            return Treatment.EMPTY
        if action is Action.DUMMY:
            return Treatment.MAP_UID if vr == "UI" else Treatment.DUMMY
        if action is Action.UID:
            if vr == "UI":
                return Treatment.MAP_UID
            # a sequence kept for its references keeps only what references
            return Treatment.RECURSE_REFERENCE if vr == "SQ" else Treatment.DUMMY
        # KEEP (retained patient characteristics and the like). A retained value must
        # still be what its VR says: free text is cleaned, formatted values (age, code
        # string, decimal) are kept only when well-formed - "Jane Doe age" is no age.
        if vr == "SQ":
            return Treatment.RECURSE
        if vr in DATE_VRS and self.shift_dates:
            return Treatment.SHIFT_DATE
        if vr in FREE_TEXT_VRS:
            return Treatment.CLEAN_TEXT
        if vr in WELL_FORMED:
            return Treatment.KEEP_VALID
        return Treatment.KEEP

    def concrete_rows(self) -> tuple[TableRow, ...]:
        """Rows naming exactly one tag (used by the generated per-attribute tests)."""
        return tuple(r for r in self.rows if r.tag is not None)


def dictionary_vr(tag: int) -> str:
    """VR of ``tag`` in the data dictionary ("UN" when unknown)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


@functools.cache
def default_profile() -> ConfidentialityProfile:
    """The profile with all our options enabled (shared, immutable)."""
    return ConfidentialityProfile(DEFAULT_OPTIONS)
