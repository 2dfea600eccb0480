"""Design files: which types are accepted and whether a file really is of its type.

:func:`validate_design_file` parses a file as the media type it was declared with
and returns facts about it (strings, for the signed receipt), or raises
:class:`~gateway.errors.ValidationError` naming the file, the declared type and the
reason. Both nodes run it on the same bytes; :func:`gateway.fidelity.mesh.compare_facts`
compares the results.

==========================  ===========  =====================================================
media type                  format       checked
==========================  ===========  =====================================================
``model/stl``               STL          binary (size = 84 + 50 * count) or strict ASCII grammar;
                                         mesh figures (:mod:`gateway.fidelity.mesh`)
``model/obj``               Wavefront    strict statements, indices in range; mesh figures
``model/x-ply``             PLY          header ↔ data size/lines exactly; mesh figures
``model/3mf``               3MF          OPC package parts, content type, core model XML;
                                         mesh figures of the build (in mm)
``model/step``              STEP AP2xx   ISO 10303-21 structure: ``ISO-10303-21;`` HEADER with
                                         FILE_DESCRIPTION/FILE_NAME/FILE_SCHEMA, DATA sections of
                                         ``#n=`` instances, ``END-ISO-10303-21;``; strings and
                                         comments closed (streamed, bounded memory)
``application/pdf``         PDF          ``%PDF-n.n`` header, final ``%%EOF``, ``startxref``
                                         pointing at a cross-reference table or stream
``application/json``        parameters   UTF-8 JSON object, no duplicate keys, no NaN/Infinity
``text/csv``                parameters   UTF-8 CSV (RFC 4180 quoting), same column count per row
==========================  ===========  =====================================================

IANA registers ``model/stl``, ``model/obj``, ``model/3mf`` and ``model/step``; PLY has
no registered type, so ``model/x-ply`` is used (``application/ply`` and ``model/ply``
are accepted as aliases). Media type parameters and case are ignored.

Meshes are read whole (up to ``max_mesh_bytes`` and
:data:`~gateway.fidelity.mesh.DEFAULT_MAX_TRIANGLES` triangles); JSON and CSV up to
:data:`MAX_TEXT_BYTES`; PDF is checked from its first and last bytes; STEP is streamed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import ReceiptError, ValidationError
from gateway.fidelity.mesh import (
    DEFAULT_MAX_MESH_BYTES,
    DEFAULT_MAX_TRIANGLES,
    MESH_MEDIA_TYPES,
    canonical_media_type,
    compare_facts,
    figures_as_facts,
    mesh_figures,
)
from gateway.fidelity.step import StepFormatError, step_facts

if TYPE_CHECKING:
    from gateway.storage import ObjectStore

log = logging.getLogger(__name__)

DESIGN_MEDIA_TYPES: dict[str, str] = {
    "model/stl": "STL mesh (binary or ASCII)",
    "model/obj": "Wavefront OBJ mesh",
    "model/x-ply": "PLY mesh (ASCII or binary)",
    "model/3mf": "3MF package",
    "model/step": "STEP (ISO 10303-21) model",
    "application/pdf": "PDF document",
    "application/json": "parameter file (JSON object)",
    "text/csv": "parameter file (CSV table)",
}
"""Canonical media type → what it is. Only these are design files."""

MAX_TEXT_BYTES = 16 * 1024 * 1024
"""Largest JSON or CSV parameter file (read whole)."""

FACT_MEDIA_TYPE = "design.media_type"
FACT_ERROR = "design.error"


def design_media_type(media_type: str) -> str | None:
    """The canonical design media type for ``media_type``, or None if it is not one."""
    mtype = canonical_media_type(media_type)
    return mtype if mtype in DESIGN_MEDIA_TYPES else None


def is_design_media_type(media_type: str) -> bool:
    return design_media_type(media_type) is not None


def validate_design_file(
    path: Path,
    media_type: str,
    *,
    name: str | None = None,
    max_mesh_bytes: int = DEFAULT_MAX_MESH_BYTES,
    max_mesh_triangles: int = DEFAULT_MAX_TRIANGLES,
) -> dict[str, str]:
    """Parse ``path`` as ``media_type``; return its facts or raise ValidationError.

    ``name`` is how the file is named in messages (default: the path's name). Facts
    always include ``design.media_type`` (canonical); meshes add the ``mesh.*``
    figures, the others ``pdf.*``, ``step.*``, ``json.*`` or ``csv.*``.
    """
    path = Path(path)
    shown = name or path.name
    mtype = design_media_type(media_type)
    if mtype is None:
        raise ValidationError(
            f"{shown} declared {media_type[:80]!r}, which is not a design file type "
            f"(accepted: {', '.join(DESIGN_MEDIA_TYPES)})"
        )
    size = path.stat().st_size
    if size == 0:
        raise ValidationError(f"{shown} declared {mtype} but is empty")
    facts = {FACT_MEDIA_TYPE: mtype}
    if mtype in MESH_MEDIA_TYPES:
        figures = mesh_figures(
            path, mtype, name=shown, max_bytes=max_mesh_bytes, max_triangles=max_mesh_triangles
        )
        facts.update(figures_as_facts(figures))
        return facts
    checks = {
        "model/step": (_step, "STEP (ISO 10303-21) file"),
        "application/pdf": (_pdf, "PDF"),
        "application/json": (_json, "JSON parameter file"),
        "text/csv": (_csv, "CSV parameter file"),
    }
    check, what = checks[mtype]
    try:
        facts.update(check(path, size))
    except _Invalid as exc:
        raise ValidationError(
            f"{shown} declared {mtype} but is not a valid {what}: {exc}"
        ) from None
    return facts


class _Invalid(Exception):
    pass


def _step(path: Path, size: int) -> dict[str, str]:
    try:
        return step_facts(path)
    except StepFormatError as exc:
        raise _Invalid(str(exc)) from None


# -- receipt facts: the two hooks ---------------------------------------------------


def design_facts(
    media_type: str,
    store: ObjectStore,
    object_id: str,
    *,
    name: str | None = None,
    spool_dir: Path | None = None,
    max_mesh_bytes: int = DEFAULT_MAX_MESH_BYTES,
    max_mesh_triangles: int = DEFAULT_MAX_TRIANGLES,
) -> dict[str, str]:
    """Facts of a stored design object, for a receipt (``{}`` if not a design type).

    The object is streamed to a temporary file in ``spool_dir`` (default: the
    system's) and validated. A file that fails validation, or a checker that fails
    unexpectedly, gives ``{"design.error": reason}`` instead of raising. Messages name
    the object ``name`` if given, else ``object <SHA-256 prefix>``: pass no name for
    anything that goes into a receipt or a log (file names may carry patient data).
    Only the store's own errors (StorageError, NotFound) propagate: they are transient
    on a receiver, and the sender's retry is the right answer to them, not a refusal.
    """
    if not is_design_media_type(media_type):
        return {}
    shown = name or f"object {object_id[:16]}"
    with tempfile.TemporaryDirectory(dir=spool_dir, prefix="design-check-") as tmp:
        path = Path(tmp) / "object"
        with open(path, "wb") as fh, store.open_read(object_id) as chunks:
            for chunk in chunks:
                fh.write(chunk)
        try:
            return validate_design_file(
                path,
                media_type,
                name=shown,
                max_mesh_bytes=max_mesh_bytes,
                max_mesh_triangles=max_mesh_triangles,
            )
        except ValidationError as exc:
            # the reason names the file only if a name was given: then keep it out of logs
            log.warning(
                "design object %s failed its format check%s",
                object_id,
                "" if name else f": {exc}",
            )
            return {FACT_ERROR: str(exc)[:500]}
        except Exception as exc:  # a checker bug must not break receiving
            log.exception("design object %s: format check failed unexpectedly", object_id)
            return {FACT_ERROR: f"{shown}: format check failed internally ({type(exc).__name__})"}


class DesignFactsCache:
    """:func:`design_facts` remembered per (media type, object id).

    Objects are content-addressed and immutable, so their facts never change: a
    receipt re-issued on Offer (which must answer within the sender's Offer
    timeout), a send attempt re-checked, a receipt checked, each reuse them instead
    of reading the mesh again. Thread-safe; keeps the ``entries`` most recent.
    Errors of the store are not remembered (they propagate, as from design_facts).
    """

    def __init__(
        self,
        *,
        spool_dir: Path | None = None,
        entries: int = 256,
        max_mesh_bytes: int = DEFAULT_MAX_MESH_BYTES,
        max_mesh_triangles: int = DEFAULT_MAX_TRIANGLES,
    ) -> None:
        self.spool_dir = spool_dir
        self.entries = entries
        self.max_mesh_bytes = max_mesh_bytes
        self.max_mesh_triangles = max_mesh_triangles
        self._facts: OrderedDict[tuple[str, str], dict[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, media_type: str, store: ObjectStore, object_id: str) -> dict[str, str]:
        key = (canonical_media_type(media_type), object_id)
        with self._lock:
            if key in self._facts:
                self._facts.move_to_end(key)
                return dict(self._facts[key])
        if self.spool_dir is not None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        facts = design_facts(
            media_type,
            store,
            object_id,
            spool_dir=self.spool_dir,
            max_mesh_bytes=self.max_mesh_bytes,
            max_mesh_triangles=self.max_mesh_triangles,
        )
        with self._lock:
            self._facts[key] = facts
            while len(self._facts) > self.entries:
                self._facts.popitem(last=False)
        return dict(facts)


def check_design_facts(media_type: str, ours: Mapping[str, str], theirs: Mapping[str, str]) -> None:
    """On the sender: raise ReceiptError unless the receiver read the design as we did.

    ``ours`` is :func:`design_facts` of our own copy, ``theirs`` the receipt's facts.
    Does nothing for a media type that is not a design type.
    """
    if not is_design_media_type(media_type):
        return
    if FACT_ERROR in theirs:
        raise ReceiptError(f"the receiver refused the design file: {theirs[FACT_ERROR][:500]}")
    if FACT_ERROR in ours:
        raise ReceiptError(f"our own copy fails its format check: {ours[FACT_ERROR][:500]}")
    differences = compare_facts(ours, theirs)
    if differences:
        raise ReceiptError(
            "the receiver's design facts differ from ours: " + "; ".join(differences[:10])
        )


# -- PDF ------------------------------------------------------------------------------

_PDF_HEADER = re.compile(rb"%PDF-(\d\.\d)[\r\n\t %]")
_XREF_STREAM = re.compile(rb"\d+\s+\d+\s+obj\b")
PDF_TAIL_BYTES = 2048


def _pdf(path: Path, size: int) -> dict[str, str]:
    with open(path, "rb") as fh:
        head = fh.read(1024)
        match = _PDF_HEADER.match(head)
        if match is None:
            raise _Invalid("it does not start with a '%PDF-n.n' header")
        fh.seek(max(0, size - PDF_TAIL_BYTES))
        tail = fh.read()
        eof = tail.rfind(b"%%EOF")
        if eof < 0 or tail[eof + 5 :].strip(b" \t\r\n\x00"):
            raise _Invalid(
                f"it does not end with '%%EOF' (last {PDF_TAIL_BYTES} bytes; truncated?)"
            )
        start = tail.rfind(b"startxref", 0, eof)
        found = re.fullmatch(rb"startxref\s+(\d+)\s*", tail[start:eof]) if start >= 0 else None
        if found is None:
            raise _Invalid("no 'startxref <offset>' before the final '%%EOF'")
        offset = int(found.group(1))
        if offset >= size:
            raise _Invalid(f"startxref points to byte {offset}, beyond the end ({size} bytes)")
        fh.seek(offset)
        probe = fh.read(64).lstrip(b" \t\r\n")
    if probe.startswith(b"xref"):
        kind = "table"
    elif _XREF_STREAM.match(probe):
        kind = "stream"
    else:
        raise _Invalid(
            f"startxref points to byte {offset}, where no cross-reference section starts"
        )
    return {"pdf.version": match.group(1).decode(), "pdf.xref": kind}


# -- parameter files ------------------------------------------------------------------


def _text(path: Path, size: int) -> str:
    if size > MAX_TEXT_BYTES:
        raise _Invalid(f"it is {size} bytes; parameter files may have at most {MAX_TEXT_BYTES}")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Invalid(f"it is not UTF-8 (byte {exc.start})") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Invalid(f"key {key[:40]!r} appears twice in one object")
        seen[key] = value
    return seen


def _no_constant(token: str) -> Any:
    raise _Invalid(f"{token} is not a JSON number")


def _json(path: Path, size: int) -> dict[str, str]:
    text = _text(path, size)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _Invalid("it nests too deeply") from None
    if not isinstance(value, dict):
        raise _Invalid(f"the top level is a {type(value).__name__}, not an object")
    return {"json.keys": str(len(value))}


def _csv(path: Path, size: int) -> dict[str, str]:
    text = _text(path, size)
    rows, width = 0, -1
    try:
        for row in csv.reader(io.StringIO(text, newline=""), strict=True):
            rows += 1
            if width < 0:
                width = len(row)
            elif len(row) != width:
                raise _Invalid(f"row {rows} has {len(row)} columns, row 1 has {width}")
    except csv.Error as exc:
        raise _Invalid(f"row {rows + 1}: {exc}") from None
    if rows == 0 or width == 0:
        raise _Invalid("it has no rows")
    return {"csv.rows": str(rows), "csv.columns": str(width)}
