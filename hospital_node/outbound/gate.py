"""The hospital's one outbound decision point for everything that is not DICOM.

:class:`hospital_node.guard.OutgoingGuard` calls :meth:`OutboundGate.check` for every
object that is not DICOM, on submission (whoever submits: clinician, engineer, the
node itself) and before every send attempt. What may leave:

- case records (:data:`gateway.cases.records.CASE_MEDIA_TYPE`) that are records of
  this node's case chains;
- files of :data:`ALLOWED_MEDIA_TYPES` — clinical documents and design-review files —
  whose content is what their type says and in which none of the identifiers of the
  case's patient (:mod:`hospital_node.outbound.identifiers`) is found, in the file's
  bytes or in any place a reader of that format shows (:mod:`.scanners`);
- archives (ZIP, tar, gzip, bzip2, xz) whose every member is itself such a file,
  checked recursively within the bounds of :class:`OutboundLimits`.

DICOM anywhere (also renamed, without preamble, inside an archive or a PDF) is refused
naming its door, ``yigong study confirm``. Every refusal is an
:class:`~gateway.errors.OutboundRefused` whose message names the file (or, when its
name itself identifies the patient, its object id), where the problem is and what to
do, never an identifier's value; ``check`` says which rule refused it (for the audit).
Passes are remembered per (object, type, name, case, identifiers) so re-checks before
send attempts do not read a large file again; the object id is the SHA-256 of the bytes
checked (the gate hashes what it scans and refuses a stored copy that no longer matches),
so a changed object is a new key and is checked in full. A local store's file is
scanned where it is, not copied first.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway.cases.records import CASE_MEDIA_TYPE
from gateway.catalog import ObjectRecord
from gateway.errors import OutboundRefused, ValidationError
from gateway.fidelity.sniff import (
    OCTET_STREAM,
    Sniffed,
    agrees,
    canonical,
    describe,
    media_type_for_name,
    sniff_file,
)
from gateway.hashing import StreamHasher
from gateway.storage import ObjectStore
from gateway.storage.filesystem import FilesystemStore
from hospital_node.outbound.archives import Counter, members
from hospital_node.outbound.identifiers import IdentifierMatcher
from hospital_node.outbound.scanners import (
    BINARY_PLACES,
    Budget,
    Unscannable,
    jpeg_views,
    pdf_views,
    png_views,
    raw_views,
    stl_views,
    text_mesh_views,
    threemf_metadata_views,
)

log = logging.getLogger(__name__)

DICOM_DOOR = (
    "DICOM leaves the hospital only through 'yigong study confirm' (de-identified, after "
    "a clinician's confirmation)"
)
ALLOWED_MEDIA_TYPES: dict[str, str] = {
    "application/pdf": "PDF",
    "model/stl": "STL",
    "model/3mf": "3MF",
    "model/obj": "OBJ",
    "model/x-ply": "PLY",
    "model/step": "STEP",
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "application/json": "JSON",
    "text/csv": "CSV",
    "application/zip": "ZIP",
    "application/x-tar": "tar",
    "application/gzip": "gzip",
    "application/x-bzip2": "bzip2",
    "application/x-xz": "xz",
}
"""What may leave a hospital (besides confirmed DICOM and case records)."""
ARCHIVES = {
    "application/zip": "zip",
    "application/x-tar": "tar",
    "application/gzip": "gzip",
    "application/x-bzip2": "bzip2",
    "application/x-xz": "xz",
    "model/3mf": "3mf",
}
_TEXT_FORMATS = frozenset({"model/obj", "application/json", "text/csv"})
_TEXT_PLACES = _TEXT_FORMATS | {"model/step"}  # whose bytes are text: every pattern counts
_ALLOWED_LIST = ", ".join(ALLOWED_MEDIA_TYPES.values())


@dataclass(frozen=True)
class OutboundLimits:
    max_expanded_bytes: int = 512 * 1024 * 1024
    max_archive_members: int = 10_000
    max_archive_depth: int = 5


@dataclass
class _Run:
    matcher: IdentifierMatcher
    budget: Budget
    counter: Counter
    scratch: Path


class OutboundGate:
    def __init__(
        self,
        identifiers: Callable[[str], IdentifierMatcher],
        is_case_record: Callable[[str], bool],
        scratch_dir: Path,
        limits: OutboundLimits | None = None,
        format_check: Callable[[Path, str, str], None] | None = None,
        remember: int = 512,
    ) -> None:
        self.identifiers = identifiers
        self.is_case_record = is_case_record
        self.scratch_dir = scratch_dir
        self.limits = limits or OutboundLimits()
        self.format_check = format_check
        self._passed: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    def check(self, obj: ObjectRecord, store: ObjectStore, peer: str) -> None:
        """Raise OutboundRefused unless ``obj`` (not DICOM) may leave for ``peer``."""
        oid = obj.object_id
        if canonical(obj.media_type) == CASE_MEDIA_TYPE:
            if self.is_case_record(oid):
                return
            raise OutboundRefused(
                f"object {oid[:16]} is declared a case record but is not a record of this "
                f"node's cases; not sent to {peer}. Case records leave only through "
                "'yigong case' commands",
                check="case-record",
            )
        matcher = self.identifiers(obj.case_id)
        key = (oid, canonical(obj.media_type), obj.name, obj.case_id, matcher.fingerprint)
        with self._lock:
            if key in self._passed:
                self._passed.move_to_end(key)
                return
        hit = matcher.search_text(obj.name)
        shown = f"object {oid[:16]}" if hit else repr(obj.name[:120])
        if hit:
            raise OutboundRefused(
                f"{shown} is not sent to {peer}: its file name holds {hit}. Rename it "
                "(case id or pseudonym only) and send it again",
                check="identifier",
            )
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.scratch_dir, prefix="outbound-") as tmp:
            scratch = Path(tmp)
            run = _Run(
                matcher,
                Budget(self.limits.max_expanded_bytes),
                Counter(self.limits.max_archive_members),
                scratch,
            )
            try:
                path = _local_copy(store, oid, scratch / "object")
                declared = obj.media_type
                if canonical(declared) in ("", OCTET_STREAM):
                    declared = media_type_for_name(obj.name)
                self._file(run, path, obj.name, declared, "", 0)
            except Unscannable as exc:
                log.warning("outbound gate refused object %s for %s (%s)", oid, peer, exc.check)
                raise OutboundRefused(
                    f"{shown} is not sent to {peer}: {exc}", check=exc.check
                ) from None
        with self._lock:
            self._passed[key] = None
            while len(self._passed) > self._remember:
                self._passed.popitem(last=False)

    # -- one file (the object, or an archive member) ---------------------------------

    def _file(
        self, run: _Run, path: Path, name: str, declared: str, where: str, depth: int
    ) -> None:
        it = where or "it"
        found = sniff_file(path)
        if found.kind == "dicom":
            raise Unscannable(f"{it} is DICOM. {DICOM_DOOR}", "dicom")
        if found.kind == "7z":
            raise Unscannable(
                f"{it} is a 7-Zip archive, which cannot be looked into; send its files "
                "one by one or as a ZIP",
                "archive-type",
            )
        mtype = self._type_of(found, declared, it)
        if mtype not in ALLOWED_MEDIA_TYPES:
            raise Unscannable(
                f"{it} is {mtype or 'of unknown type'}, which may not leave the hospital "
                f"(allowed: {_ALLOWED_LIST}, and archives of them). {DICOM_DOOR}; case "
                "records leave through 'yigong case' commands",
                "type-not-allowed",
            )
        if mtype in ARCHIVES:
            self._archive(run, path, name, ARCHIVES[mtype], where, depth)
        else:
            self._search(run, self._views(run, path, mtype, it), where)
        if run.matcher:
            text = mtype in _TEXT_PLACES or (mtype == "model/stl" and not found.strong)
            self._search(run, raw_views(path, run.matcher.overlap), where, text=text)

    def _type_of(self, found: Sniffed, declared: str, it: str) -> str:
        mtype = canonical(declared)
        if mtype == OCTET_STREAM:
            mtype = ""
        if not agrees(mtype, found):
            raise Unscannable(
                f"{it} is declared {mtype} but its content is {describe(found.kind)}",
                "type-mismatch",
            )
        if not mtype:
            return found.media_type if found.strong else ""
        if found.strong and mtype == "application/zip" and found.kind == "3mf":
            return "model/3mf"
        needs = {"model/stl": "stl", "model/obj": "", **{v: k for k, v in _STRONG.items()}}
        wanted = needs.get(mtype)
        if wanted and found.kind != wanted:
            raise Unscannable(
                f"{it} is declared {mtype} but its content is {describe(found.kind)}",
                "type-mismatch",
            )
        return mtype

    def _archive(
        self, run: _Run, path: Path, name: str, kind: str, where: str, depth: int
    ) -> None:
        if depth >= self.limits.max_archive_depth:
            raise Unscannable(
                f"{where or 'it'} nests archives deeper than outbound.max_archive_depth "
                f"({self.limits.max_archive_depth})",
                "depth-limit",
            )
        for label, member, mpath in members(
            path, kind, name, run.scratch, run.budget, run.counter
        ):
            inner = f"{where}, {label}" if where else label
            hit = run.matcher.search_text(member)
            if hit:
                raise Unscannable(f"the name of {inner} holds {hit}", "identifier")
            inner = f"{inner} ({_printable(member)})"
            if kind == "3mf":
                self._part(run, mpath, member, inner)
            else:
                self._file(run, mpath, member, media_type_for_name(member), inner, depth + 1)

    def _part(self, run: _Run, path: Path, member: str, where: str) -> None:
        """A part of a 3MF package: any type but DICOM; metadata, images and bytes searched."""
        found = sniff_file(path)
        if found.kind == "dicom":
            raise Unscannable(f"{where} is DICOM. {DICOM_DOOR}", "dicom")
        if member.lower().endswith(".model"):
            self._search(run, threemf_metadata_views(path.read_bytes(), _printable(member)), "")
        elif found.kind in ("png", "jpeg"):
            self._search(run, self._views(run, path, found.media_type, where), where)
        if run.matcher:
            self._search(run, raw_views(path, run.matcher.overlap), where)

    def _views(self, run: _Run, path: Path, mtype: str, it: str) -> Iterator[tuple[str, bytes]]:
        if mtype in _TEXT_FORMATS and self.format_check is not None:
            try:
                self.format_check(path, mtype, it)
            except ValidationError as exc:
                raise Unscannable(str(exc), "format") from None
        if mtype == "application/pdf":
            return pdf_views(path, run.budget)
        if mtype == "image/png":
            return png_views(path, run.budget)
        if mtype == "image/jpeg":
            return jpeg_views(path)
        if mtype == "model/stl":
            return stl_views(path)
        if mtype in ("model/obj", "model/x-ply"):
            return text_mesh_views(path, "ply" if mtype == "model/x-ply" else "obj")
        return iter(())

    @staticmethod
    def _search(
        run: _Run, views: Iterator[tuple[str, bytes]], where: str, *, text: bool = False
    ) -> None:
        """Search each view; ``text``: the file is text, its bytes are a text place."""
        if not run.matcher:
            for _ in views:  # still read to the end: unreadable content does not leave
                pass
            return
        for location, data in views:
            binary = not text and location.endswith(BINARY_PLACES)
            hit = run.matcher.search(data, binary=binary)
            if hit:
                place = f"{where}, {location}" if where else location
                raise Unscannable(
                    f"{hit} was found in {place}. Remove it and send the file again",
                    "identifier",
                )


_STRONG = {
    "pdf": "application/pdf",
    "png": "image/png",
    "jpeg": "image/jpeg",
    "zip": "application/zip",
    "tar": "application/x-tar",
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "3mf": "model/3mf",
    "ply": "model/x-ply",
    "step": "model/step",
}


def _local_copy(store: ObjectStore, oid: str, copy: Path) -> Path:
    """A file holding the object's bytes for the scanners: the store's own file when
    the store is a local filesystem (content-addressed, never rewritten: no copy of a
    large object is written just to be read), else a copy at ``copy``. Either way its
    bytes are hashed here and must be the object's SHA-256 (``oid``): a verdict is
    remembered under that digest, so it must be about exactly those bytes."""
    hasher = StreamHasher()
    if isinstance(store, FilesystemStore):
        path = store.path_for(oid)
        with store.open_read(oid) as chunks:
            for chunk in chunks:
                hasher.update(chunk)
    else:
        path = copy
        with open(path, "wb") as fh, store.open_read(oid) as chunks:
            for chunk in chunks:
                hasher.update(chunk)
                fh.write(chunk)
    if hasher.hexdigest() != oid:
        raise Unscannable(
            "its stored copy no longer matches its SHA-256 (changed or damaged in "
            f"{store.describe()}); restore the object or submit it again",
            "integrity",
        )
    return path


def _printable(name: str) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in name)
    return repr(shown[:80] + ("…" if len(shown) > 80 else ""))
