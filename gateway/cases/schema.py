"""The fields of each case record type (a record's ``data``) and their checks.

One table, :data:`TYPES`, says for every record type which fields it must and may
carry; :func:`validate_data` enforces it (unknown fields are refused, like unknown
configuration keys) plus the few rules that tie fields of one record together
(a rejection needs a reason, a shrinkage range has min <= max, ...). Rules that
need the case's history (the order's shrinkage range, the design being confirmed)
are stage gates in :mod:`gateway.cases.workflow`.

Messages name the field path and what it must be, never the value: records carry
the patient's pseudonym, age and sex and clinical free text, and those stay out of
errors, logs and the audit log.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from gateway.errors import CaseFormatError

Spec = Callable[[Any, str], None]
"""Checks one value at a path (``data.patient.age``); raises CaseFormatError."""


@dataclass(frozen=True)
class Shape:
    """What a :data:`Spec` accepts, for people: ``yigong case types TYPE`` and
    ``yigong case template TYPE`` (:mod:`gateway.cases.describe`)."""

    kind: str  # text identifier date choice boolean integer number object list map
    what: str  # one line: "text of at most 4000 characters"
    example: Any = None  # a value the spec accepts (objects and lists: built from their parts)
    fields: tuple[tuple[str, bool, Spec], ...] = ()  # object: (name, required, spec)
    item: Spec | None = None  # list: the spec of each entry


SHAPES: dict[Spec, Shape] = {}
"""The :class:`Shape` of every spec made here."""


def _shaped(check: Spec, shape: Shape) -> Spec:
    SHAPES[check] = shape
    return check

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_NODE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_UDI = re.compile(r"[!-~]{1,120}")
_DATE = re.compile(r"\d{4}-\d\d-\d\d")


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def shown(name: str) -> str:
    """A field or type name as it may appear in a message (and so in logs): only names that
    look like identifiers are repeated; anything else might be free text someone typed."""
    return repr(name) if _NAME.fullmatch(name) else "(a name that is not an identifier)"


def is_hex64(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def _fail(path: str, must: str) -> NoReturn:
    raise CaseFormatError(f"{path} must be {must}")


def text(max_chars: int = 4000) -> Spec:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str) or not value.strip() or len(value) > max_chars:
            _fail(path, f"non-empty text of at most {max_chars} characters")

    return _shaped(check, Shape("text", f"text, at most {max_chars} characters", "TODO"))


def pattern(regex: re.Pattern[str], what: str, example: str = "") -> Spec:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, str) or not regex.fullmatch(value):
            _fail(path, what)

    return _shaped(check, Shape("identifier", what, example))


TOKEN = pattern(
    _TOKEN, "1-64 characters of A-Z a-z 0-9 . _ : / - (an identifier, no spaces)", "EXAMPLE-1"
)
NODE_ID = pattern(
    _NODE, "a federation node id (lowercase letters, digits, '.', '_', '-')", "factory-1"
)
UDI = pattern(_UDI, "1-120 printable ASCII characters without spaces", "(01)00000000000000")
HEX64 = pattern(_HEX64, "64 lowercase hex digits (a SHA-256)", "0" * 64)


def iso_date(value: Any, path: str) -> None:
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        _fail(path, "a date YYYY-MM-DD")
    from datetime import date

    try:
        date.fromisoformat(value)
    except ValueError:
        _fail(path, "a valid calendar date YYYY-MM-DD")


_shaped(iso_date, Shape("date", "a date YYYY-MM-DD", "2026-01-31"))


def choice(*values: str) -> Spec:
    def check(value: Any, path: str) -> None:
        if value not in values:
            _fail(path, "one of " + ", ".join(repr(v) for v in values))

    return _shaped(check, Shape("choice", "one of " + ", ".join(values), values[0]))


def boolean(required: bool | None = None) -> Spec:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, bool) or (required is not None and value is not required):
            _fail(path, "true or false" if required is None else str(required).lower())

    what = "true or false" if required is None else f"{str(required).lower()} (only)"
    return _shaped(check, Shape("boolean", what, bool(required)))


def integer(lo: int, hi: int) -> Spec:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            _fail(path, f"an integer {lo}-{hi}")

    return _shaped(check, Shape("integer", f"an integer {lo}-{hi}", max(lo, min(hi, 1))))


def number(lo: float, hi: float, *, tenth: bool = False) -> Spec:
    """A finite number in [lo, hi]; with ``tenth``, given to 0.1 (e.g. 12.3 mm)."""

    def check(value: Any, path: str) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or not lo <= value <= hi:
            _fail(path, f"a number {lo:g}-{hi:g}")
        if tenth and abs(value * 10 - round(value * 10)) > 1e-6:
            _fail(path, "given to 0.1 (one decimal place)")

    what = f"a number from {lo:g} to {hi:g}" + (", given to 0.1" if tenth else "")
    return _shaped(check, Shape("number", what, max(lo, min(hi, 1.0))))


def obj(required: Mapping[str, Spec], optional: Mapping[str, Spec] | None = None) -> Spec:
    optional = optional or {}

    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            _fail(path, "an object")
        missing = [k for k in required if k not in value]
        if missing:
            raise CaseFormatError(f"{path} lacks the required field(s) {', '.join(missing)}")
        unknown = sorted(k for k in value if k not in required and k not in optional)
        if unknown:
            allowed = ", ".join([*required, *optional])
            raise CaseFormatError(
                f"{path} has unknown field(s) {', '.join(shown(k) for k in unknown[:5])}; "
                f"allowed: {allowed}"
            )
        for key, spec in (*required.items(), *optional.items()):
            if key in value:
                spec(value[key], f"{path}.{key}")

    fields = tuple((k, True, v) for k, v in required.items()) + tuple(
        (k, False, v) for k, v in optional.items()
    )
    return _shaped(check, Shape("object", "an object", fields=fields))


def items(spec: Spec, min_items: int = 1, max_items: int = 500) -> Spec:
    def check(value: Any, path: str) -> None:
        if not isinstance(value, list) or not min_items <= len(value) <= max_items:
            _fail(path, f"a list of {min_items}-{max_items} entries")
        for n, item in enumerate(value):
            spec(item, f"{path}[{n}]")

    return _shaped(check, Shape("list", f"a list of {min_items}-{max_items} entries", item=spec))


def scalar_map(value: Any, path: str) -> None:
    """A non-empty object of named values (text, numbers, booleans)."""
    if not isinstance(value, dict) or not 1 <= len(value) <= 500:
        _fail(path, "an object of 1-500 named values")
    for key, item in value.items():
        if not key or len(key) > 100:
            _fail(f"{path} keys", "1-100 characters")
        ok = isinstance(item, str | bool | int) or (isinstance(item, float) and math.isfinite(item))
        if not ok or (isinstance(item, str) and len(item) > 1000):
            _fail(f"{path}.{shown(key)}", "text (at most 1000 characters), a number or a boolean")


_shaped(
    scalar_map,
    Shape(
        "map",
        "an object of 1-500 named values (text of at most 1000 characters, numbers, booleans)",
        {"example_parameter_mm": 1.0},
    ),
)


NOTES: dict[str, Spec] = {"notes": text()}
FILE = obj({"object_id": HEX64, "name": text(255)}, {"kind": text(100)})
RESULT = obj({"result": choice("pass", "fail")}, NOTES)
REPORT = obj({"result": choice("pass", "fail"), "reference": text(300)}, NOTES)
DESIGN = {
    "files": items(FILE),
    "parameters": scalar_map,
    "safety_features": items(obj({"feature": text(500), "requirement": text()})),
}


@dataclass(frozen=True)
class RecordType:
    name: str
    title: str  # for messages: "the design output"
    section: str  # of the standard
    required: Mapping[str, Spec]
    optional: Mapping[str, Spec]
    rule: Callable[[dict[str, Any]], None] | None = None


def _reason_if_rejected(data: dict[str, Any]) -> None:
    if data.get("decision") == "rejected" and "reason" not in data:
        raise CaseFormatError("data.reason is required when data.decision is 'rejected'")


def _order_rule(data: dict[str, Any]) -> None:
    span = data["shrinkage_range"]
    if span["min_percent"] > span["max_percent"]:
        raise CaseFormatError("data.shrinkage_range.min_percent must be <= max_percent")


def _design_change_rule(data: dict[str, Any]) -> None:
    given = [k for k in DESIGN if k in data]
    if given and len(given) != len(DESIGN):
        raise CaseFormatError(
            "a design change that carries the revised design needs all of data.files, "
            "data.parameters and data.safety_features"
        )


_TYPES: tuple[RecordType, ...] = (
    RecordType(
        "data_confirmation", "the data confirmation", "§4.5",
        {"studies": items(TOKEN), "complete": boolean(True)},
        {"confirmation_id": HEX64, "modalities": items(TOKEN), **NOTES},
    ),
    RecordType(
        "order", "the order", "§5.2.2",
        {
            "manufacturer": NODE_ID,
            "institution": text(200),
            "patient": obj(
                {
                    "pseudonym": TOKEN,
                    "age": integer(0, 150),
                    "sex": choice("female", "male", "other", "unknown"),
                }
            ),
            "clinical_description": text(),
            "treatment_plan": text(),
            "risks": text(),
            "device": obj({"name": text(200), "site": text(200), "purpose": text()}),
            "material": text(),
            "structure": text(),
            "mechanical_requirements": text(),
            "specification": text(),
            "surface": text(),
            "instruments": text(),
            "post_processing_cleaning": text(),
            "packaging_sterilisation": text(),
            "delivery_time": iso_date,
            "shrinkage_range": obj(
                {"min_percent": number(-50, 50), "max_percent": number(-50, 50)}
            ),
            "custom_reason": text(),
        },
        NOTES,
        _order_rule,
    ),
    RecordType(
        "design_input_review", "the design input review", "§5.3.2",
        {"decision": choice("accepted", "rejected"), "findings": text()},
        {"reason": text(), **NOTES},
        _reason_if_rejected,
    ),
    RecordType("design_output", "the design output", "§5.3.3", DESIGN, NOTES),
    RecordType(
        "design_confirmation", "the design confirmation", "§5.3.6.3",
        {
            "side": choice("clinical", "production"),
            "decision": choice("confirmed", "rejected"),
            "design_hash": HEX64,
        },
        {"reason": text(), **NOTES},
        _reason_if_rejected,
    ),
    RecordType(
        "design_change", "a design change", "§5.3.7",
        {"reason": text(), "description": text()},
        {**DESIGN, **NOTES},
        _design_change_rule,
    ),
    RecordType(
        "production_record", "the production record", "§6.2",
        {
            "batch_number": TOKEN,
            "design_hash": HEX64,
            "process_records": items(
                obj({"step": text(200), "result": text(500)}, {"reference": text(500)})
            ),
        },
        {"serial_number": TOKEN, "produced_on": iso_date, **NOTES},
    ),
    RecordType(
        "delivery_list", "the delivery list", "§7.1",
        {
            "udi": UDI,
            "batch_number": TOKEN,
            "items": items(obj({"name": text(200), "quantity": integer(1, 10000)})),
            "logistics": obj(
                {"carrier": text(200), "signed_off_by": text(200), "dispatched_on": iso_date},
                {"tracking": TOKEN},
            ),
        },
        NOTES,
    ),
    RecordType("data_delivery", "the data delivery", "§7.2", {"files": items(FILE)}, NOTES),
    RecordType(
        "acceptance", "the acceptance", "§8.3, §9.3",
        {
            "decision": choice("accepted", "rejected"),
            "udi": UDI,
            "indicators": obj(
                {
                    "dimensional": items(
                        obj(
                            {
                                "feature": text(200),
                                "nominal_mm": number(0, 10000, tenth=True),
                                "measured_mm": number(0, 10000, tenth=True),
                                "tolerance_mm": number(0.1, 100, tenth=True),
                            }
                        )
                    ),
                    "fit": RESULT,
                    "shrinkage_percent": number(-50, 50),
                    "surface": RESULT,
                    "pore_size": obj(
                        {"result": choice("pass", "fail", "not_applicable")},
                        {"measured_um": number(0, 100000), **NOTES},
                    ),
                    "mechanical_report": REPORT,
                    "biocompatibility_report": REPORT,
                }
            ),
        },
        {"reason": text(), "disposition": choice("remake", "redesign"), **NOTES},
        _reason_if_rejected,
    ),
    RecordType(
        "nonconformity", "a nonconformity", "§9.4",
        {"description": text(), "disposition": choice("remake", "redesign", "observe")},
        {"udi": UDI, "severity": choice("minor", "major", "critical"), **NOTES},
    ),
    RecordType(
        "follow_up", "a follow-up", "§10",
        {"date": iso_date, "findings": text()},
        {
            "feedback": text(),
            "outcome": choice("satisfactory", "complication", "revision"),
            **NOTES,
        },
    ),
)  # fmt: skip

TYPES: Mapping[str, RecordType] = {t.name: t for t in _TYPES}
"""Every record type by name, in the order of the workflow."""


def validate_data(kind: str, data: Any) -> None:
    """Raise CaseFormatError unless ``data`` is valid for record type ``kind``."""
    spec = TYPES.get(kind)
    if spec is None:
        raise CaseFormatError(f"unknown record type {kind[:60]!r}; one of {', '.join(TYPES)}")
    obj(spec.required, spec.optional)(data, "data")
    if spec.rule is not None:
        spec.rule(data)


def describe_fields(kind: str) -> list[tuple[str, bool]]:
    """(field, required) of a record type, for the CLI's help."""
    spec = TYPES[kind]
    return [(k, True) for k in spec.required] + [(k, False) for k in spec.optional]
