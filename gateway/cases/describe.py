"""Case record types for people: the full schema, an example, a readable preview,
and hash prefixes.

- :func:`describe_type`: every field of a record type, nested, with its type,
  required/optional, allowed values, who signs it and at which stage
  (``yigong case types TYPE``);
- :func:`template`: an example ``data`` object that passes the schema, with
  ``TODO`` in every text to replace (``yigong case template TYPE``);
- :func:`preview`: the record a person is about to sign, on several lines;
- :func:`expand_hashes`: a unique hex prefix where a SHA-256 is expected (a design
  hash, a file's object id) becomes the full hash it names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway.cases.schema import HEX64, SHAPES, TYPES, Spec, validate_data
from gateway.cases.workflow import CHANGE_WINDOW, CLINICIAN, HOME_STAGE, SIGNERS
from gateway.errors import ValidationError

SIGNER_TEXT = {
    CLINICIAN: "a clinician of the hospital node",
    "engineer": "an engineer of the manufacturer (factory) node",
}
RULES: dict[str, tuple[str, ...]] = {
    "order": ("shrinkage_range.min_percent must be <= shrinkage_range.max_percent",),
    "design_input_review": ("reason is required when decision is 'rejected'",),
    "design_confirmation": (
        "reason is required when decision is 'rejected'",
        "design_hash is the record hash of the design output (or design change) being "
        "confirmed; a clinician signs side 'clinical', an engineer side 'production'",
    ),
    "design_change": (
        "files, parameters and safety_features: all three (the revised design) or none",
    ),
    "production_record": ("design_hash is the record hash of the confirmed design",),
    "acceptance": ("reason is required when decision is 'rejected'",),
    "design_output": ("files[].object_id: objects uploaded for this case (yigong send --case)",),
    "data_delivery": ("files[].object_id: objects uploaded for this case (yigong send --case)",),
}
MIN_PREFIX = 4
_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},63}}")


def article(noun: str) -> str:
    """'a clinician', 'an engineer'."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def signers_text(kind: str) -> str:
    return " or ".join(article(r) for r in sorted(SIGNERS[kind]))


def stage_text(kind: str) -> str:
    if kind == "design_change":
        return f"from stage '{CHANGE_WINDOW[0]}' until the acceptance ('{CHANGE_WINDOW[-1]}')"
    if kind in ("follow_up", "nonconformity"):
        return "stage 'follow_up' (after the acceptance; any number of times)"
    return f"stage '{HOME_STAGE[kind]}' (every earlier stage complete)"


def describe_type(kind: str) -> list[str]:
    """The lines of ``yigong case types KIND``."""
    spec = TYPES[kind]
    lines = [
        f"{kind} ({spec.section}, {spec.title})",
        "  signed by: " + " or ".join(SIGNER_TEXT[r] for r in sorted(SIGNERS[kind])),
        f"  recorded at: {stage_text(kind)}",
        "  fields of data (* = required):",
    ]
    fields = [(k, True, v) for k, v in spec.required.items()] + [
        (k, False, v) for k, v in spec.optional.items()
    ]
    for name, required, field_spec in fields:
        lines.extend(_field_lines(name, required, field_spec, 4))
    for rule in RULES.get(kind, ()):
        lines.append(f"  rule: {rule}")
    return lines


def _field_lines(name: str, required: bool, spec: Spec, indent: int) -> list[str]:
    shape = SHAPES[spec]
    label = f"{' ' * indent}{'*' if required else ' '} {name}"
    if shape.kind == "list" and shape.item is not None:
        item = SHAPES[shape.item]
        if item.kind == "object":
            out = [f"{label:<42} {shape.what}, each an object:"]
            for sub, req, sub_spec in item.fields:
                out.extend(_field_lines(sub, req, sub_spec, indent + 4))
            return out
        return [f"{label:<42} {shape.what}, each {item.what}"]
    if shape.kind == "object":
        out = [f"{label:<42} an object:"]
        for sub, req, sub_spec in shape.fields:
            out.extend(_field_lines(sub, req, sub_spec, indent + 4))
        return out
    return [f"{label:<42} {shape.what}"]


def template(kind: str, *, optional: bool = False) -> dict[str, Any]:
    """An example ``data`` for ``kind`` that passes the schema (``TODO`` marks what to
    write); with ``optional``, the optional fields too."""
    spec = TYPES[kind]
    fields = list(spec.required.items()) + (list(spec.optional.items()) if optional else [])
    data = {name: _example(s, name, optional) for name, s in fields}
    validate_data(kind, data)
    return data


def example_value(spec: Spec, path: str) -> Any:
    """An example value of one field (its required parts), as in :func:`template`."""
    return _example(spec, path, False)


def _example(spec: Spec, path: str, optional: bool) -> Any:
    shape = SHAPES[spec]
    if shape.kind == "object":
        return {
            name: _example(s, f"{path}.{name}", optional)
            for name, required, s in shape.fields
            if required or optional
        }
    if shape.kind == "list" and shape.item is not None:
        return [_example(shape.item, f"{path}[0]", optional)]
    if shape.kind == "text":
        return f"TODO {path}"
    return shape.example


def todo_fields(data: Any, path: str = "data") -> list[str]:
    """Paths of text values still starting with ``TODO`` (from a template)."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in todo_fields(v, f"{path}.{k}")]
    if isinstance(data, list):
        return [p for n, v in enumerate(data) for p in todo_fields(v, f"{path}[{n}]")]
    return [path] if isinstance(data, str) and data.startswith("TODO") else []


def preview(record: dict[str, Any]) -> str:
    """The record about to be signed, readable: header lines, then the data indented."""
    a = record["author"]
    lines = [
        f"case:      {record['case_id']}",
        f"record:    {record['seq']} ({record['type']})",
        f"author:    {a['role']}:{a['id']}@{a['org']} (certificate {a['cert_fingerprint']})",
        f"time:      {record['time']}",
        f"follows:   {record['prev_hash']}",
        "data:",
    ]
    body = json.dumps(record["data"], indent=2, ensure_ascii=False, sort_keys=True)
    lines.extend("  " + line for line in body.splitlines())
    return "\n".join(lines)


def expand_hashes(
    kind: str,
    data: dict[str, Any],
    known: Iterable[str] | Callable[[], Iterable[str]],
    where: str,
) -> list[tuple[str, str]]:
    """Replace hex prefixes (>= 4 digits) in SHA-256 fields of ``data`` by the one hash of
    ``known`` they start with; returns ``(path, full hash)`` per expansion. ``known`` may be
    a function: it is called only when there is a prefix to resolve.

    Raises ValidationError naming the field when a prefix matches none or several."""
    cache: list[str] = []
    spec = TYPES[kind]

    def candidates() -> list[str]:
        if not cache:
            cache.extend(sorted(set(known() if callable(known) else known)))
        return cache

    expanded: list[tuple[str, str]] = []

    def walk(value: Any, s: Spec, path: str) -> Any:
        if s is HEX64:
            if isinstance(value, str) and _PREFIX.fullmatch(value):
                return _resolve(value, path)
            return value
        shape = SHAPES.get(s)
        if shape is None:
            return value
        if shape.kind == "object" and isinstance(value, dict):
            specs = {name: sub for name, _, sub in shape.fields}
            return {
                k: walk(v, specs[k], f"{path}.{k}") if k in specs else v for k, v in value.items()
            }
        if shape.kind == "list" and shape.item is not None and isinstance(value, list):
            return [walk(v, shape.item, f"{path}[{n}]") for n, v in enumerate(value)]
        return value

    def _resolve(prefix: str, path: str) -> str:
        found = [h for h in candidates() if h.startswith(prefix)]
        if not found:
            raise ValidationError(
                f"{path}: no record or object of {where} has a SHA-256 starting with {prefix}; "
                "give the full hash (yigong case show, yigong query objects --case)"
            )
        if len(found) > 1:
            raise ValidationError(
                f"{path}: {prefix} is the start of {len(found)} hashes of {where} "
                f"({', '.join(h[:16] + '…' for h in found[:5])}); give more digits"
            )
        expanded.append((path, found[0]))
        return found[0]

    fields = {**spec.required, **spec.optional}
    for key in list(data):
        if key in fields:
            data[key] = walk(data[key], fields[key], f"data.{key}")
    return expanded
