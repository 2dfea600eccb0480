"""DICOM ingest: one received instance → validated, stored, catalogued, audited.

Domain code (DESIGN.md "Rules of the house"): the SCP (:mod:`hospital_node.wire.scp`)
hands over the bytes exactly as received and maps the outcome to a DIMSE status
(:mod:`hospital_node.wire.dimse`); nothing here imports pynetdicom.

An instance is stored **exactly as received**: the Part-10 object is the 128-byte
preamble, ``DICM``, a File Meta group this node writes (:func:`wrap_dataset`, the
same bytes for the same instance whatever PACS or pynetdicom version sent it) and
the data set bytes as they came off the wire — never decoded and re-encoded,
never transcoded. The object id is the SHA-256 of exactly these bytes.

:meth:`Ingest.ingest` returns only once the object is durable in the object store
(``put_stream`` returned), ``dicom.instance_received`` is in the audit log and the
object and its instance row are in the catalog (one transaction). The SCP does not
wait for all of that: it answers once the instance is durable in the spool
(:mod:`hospital_node.spool`), which then files it with :meth:`Ingest.file`.
:meth:`Ingest.check` raises :class:`UnreadableInstance` (cannot understand) or
:class:`DatasetMismatch` (the data set does not match its SOP class); filing raises
the error of the store, catalog or audit log.
Error messages name UIDs, tags and byte offsets only — never a value from the data
set (pydicom's own messages can quote values, so they are not passed on).
"""

from __future__ import annotations

import io
import logging
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from gateway.audit import DICOM_INSTANCE_RECEIVED, AuditLog
from gateway.catalog import Catalog, utcnow
from gateway.errors import (
    AuditError,
    DatasetMismatch,
    UnreadableInstance,
    ValidationError,
    YigongError,
)
from gateway.fidelity.dicom import PIXEL_DATA_TAGS, geometry_hash, pixel_hash
from gateway.fidelity.dicom_raw import (
    CONTROL,
    PREAMBLE,
    TEXT_VRS,
    UID_BYTES,
    VALUE_SIZES,
    VRS,
    encode_file_meta,
)
from gateway.fidelity.series import SliceGeometry, slice_geometry
from gateway.hashing import sha256_hex
from gateway.storage.base import ObjectStore
from hospital_node.ingest_fast import CHECKED_VR_TAGS, clean_elements, meta_elements
from hospital_node.studies import InstanceRecord, StudyCatalog
from hospital_node.study_identity import IdentitySource, StudyIdentities, identity_source

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/dicom"
MAX_INFLATED_BYTES = 512 * 1024 * 1024
"""Largest data set accepted after inflating Deflated Explicit VR Little Endian."""
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1")
IMPLEMENTATION_VERSION_NAME = "YIGONG_INGEST_1"
"""Fixed, so that the same instance always becomes the same bytes (and object id), even
across pydicom upgrades; change them only with a note in docs/dicom-ingest.md."""

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class Parsed:
    """A validated instance: what the catalog records of it."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str
    geometry: SliceGeometry
    geometry_sha256: str
    pixel_sha256: str  # "" while deferred: see pixel_spans
    burned_in: str
    pixel_spans: tuple[tuple[int, int, int], ...] = ()
    """With ``defer_pixel_hash``: (tag, offset in the Part-10 object, length) of each pixel
    data element, hashed later from the spool file (the filer, off the C-STORE's path)."""
    identity: IdentitySource | None = field(default=None, compare=False, repr=False)
    """Whom the study is of, undecoded (:func:`hospital_node.study_identity.identity_source`):
    hospital-only, kept encrypted, never logged or audited."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _uid_ok(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.fullmatch(value))


def wrap_dataset(
    dataset: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> bytes:
    """The Part-10 object for ``dataset`` (bytes as received) — nothing of it re-encoded.

    The File Meta group is encoded directly (:func:`gateway.fidelity.dicom_raw.encode_file_meta`:
    it is on every C-STORE's path);
    ``tests/test_dicom_ingest.py`` proves it byte-identical to pydicom's
    ``write_file_meta_info`` for the same values."""
    for what, uid in (
        ("Affected SOP Class UID", sop_class_uid),
        ("Affected SOP Instance UID", sop_instance_uid),
        ("transfer syntax", transfer_syntax),
    ):
        if not _uid_ok(uid):
            raise UnreadableInstance(f"the request's {what} is not a valid UID")
    meta = encode_file_meta(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version_name=IMPLEMENTATION_VERSION_NAME,
    )
    return b"".join((PREAMBLE, b"DICM", meta, dataset))


def wrap_dataset_pydicom(
    dataset: bytes, *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str
) -> bytes:
    """:func:`wrap_dataset` done by pydicom (the reference the direct encoding is
    tested against)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue() + dataset


def _split(part10: bytes) -> tuple[FileMetaDataset, bytes]:
    """File Meta group and the data set bytes of a Part-10 object."""
    if len(part10) < 132 or part10[128:132] != b"DICM":
        raise UnreadableInstance("not a DICOM Part-10 object (no 'DICM' after the preamble)")
    fast = meta_elements(part10)  # the same, in one pass, when it is clean
    fp = io.BytesIO(part10)
    fp.seek(132 if fast is None else fast[1])
    try:
        if fast is None:
            meta = read_dataset(fp, False, True, stop_when=lambda tag, _vr, _len: tag.group != 2)
        else:
            meta = Dataset(fast[0])  # type: ignore[arg-type]  # RawDataElements
        syntax = str(meta.get("TransferSyntaxUID", "") or "")
        sop_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    except Exception as exc:  # pydicom raises many types; its messages may quote values
        raise UnreadableInstance(f"File Meta group unreadable ({type(exc).__name__})") from None
    if not (_uid_ok(syntax) and _uid_ok(sop_class) and _uid_ok(sop_instance)):
        raise UnreadableInstance("File Meta group lacks valid SOP Class/Instance/transfer syntax")
    return FileMetaDataset(meta), part10[fp.tell() :]


def _inflate(data: bytes, where: str) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, MAX_INFLATED_BYTES + 1)
    except zlib.error:
        raise UnreadableInstance(
            f"{where}: deflated data set is not a valid deflate stream"
        ) from None
    if len(out) > MAX_INFLATED_BYTES:
        raise UnreadableInstance(f"{where}: deflated data set inflates beyond the limit")
    if not inflater.eof:
        raise UnreadableInstance(f"{where}: deflated data set is truncated")
    return out


def _walk(data: bytes, implicit: bool, little: bool, where: str) -> None:
    """Check the top-level element structure: every element complete, tags ascending and
    legal, explicit VRs known, nothing left over. Values are skipped, not decoded."""
    fp = io.BytesIO(data)
    previous, end = -1, 0
    try:
        for elem in data_element_generator(fp, implicit, little, defer_size=0):
            tag, at = int(elem.tag), fp.tell()
            if at > len(data):
                raise UnreadableInstance(
                    f"{where}: element {_tag(tag)} runs {at - len(data)} bytes past the end"
                )
            if tag <= previous:
                raise UnreadableInstance(f"{where}: element {_tag(tag)} out of order or repeated")
            if tag >> 16 < 0x0008 or tag >> 16 in (0xFFFE, 0xFFFF):
                raise UnreadableInstance(f"{where}: element {_tag(tag)} is not allowed here")
            if not implicit and elem.VR not in VRS:
                raise UnreadableInstance(f"{where}: element {_tag(tag)} has an invalid VR")
            previous, end = tag, at
    except UnreadableInstance:
        raise
    except Exception as exc:
        raise UnreadableInstance(
            f"{where}: structure unreadable near byte {fp.tell()} ({type(exc).__name__})"
        ) from None
    if end != len(data):
        raise UnreadableInstance(f"{where}: {len(data) - end} stray bytes after the last element")


def _check_raw(tag: int, vr: str, value: bytes, where: str) -> None:
    size = VALUE_SIZES.get(vr, 1)
    if len(value) % size:
        raise UnreadableInstance(f"{where}: element {_tag(tag)} ({vr}) has a bad length")
    if vr == "UI" and not UID_BYTES.fullmatch(value):
        raise UnreadableInstance(f"{where}: element {_tag(tag)} (UI) holds bytes a UID cannot")
    if vr in TEXT_VRS and CONTROL.search(value.rstrip(b"\x00")):
        raise UnreadableInstance(f"{where}: element {_tag(tag)} ({vr}) holds control bytes")


def _check_items(ds: Dataset, where: str, depth: int = 0) -> None:
    """Check each element's value bytes against its VR (lengths, UID and text characters)
    and the VR of the elements this node interprets; parse every sequence item. Values
    are not converted: pydicom's warnings about odd values quote them (patient data)."""
    if depth > 16:
        raise UnreadableInstance(f"{where}: sequences nested deeper than 16 levels")
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if raw is None:
            continue
        if depth == 0 and tag in CHECKED_VR_TAGS:
            allowed = dictionary_vr(int(tag)).split(" or ")
            if raw.VR not in (None, "UN", *allowed):
                raise UnreadableInstance(
                    f"{where}: element {_tag(int(tag))} has VR {raw.VR}, not {' or '.join(allowed)}"
                )
        # the dictionary is asked only for implicit-VR elements (its lookup is per element)
        vr = raw.VR or dictionary_vr(int(tag)).split(" or ")[0]
        if vr != "SQ":
            if isinstance(raw.value, bytes):
                _check_raw(int(tag), vr, raw.value, where)
            continue
        try:
            items = ds[tag].value
        except Exception as exc:
            raise UnreadableInstance(
                f"{where}: sequence {_tag(int(tag))} unreadable ({type(exc).__name__})"
            ) from None
        if not isinstance(items, DicomSequence):
            raise UnreadableInstance(f"{where}: element {_tag(int(tag))} is not a sequence")
        for item in items:
            if not isinstance(item, Dataset):
                raise UnreadableInstance(f"{where}: sequence {_tag(int(tag))} has a bad item")
            _check_items(item, where, depth + 1)


def dictionary_vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_pixels(ds: Dataset, sop_class: UID, encapsulated: bool, where: str) -> None:
    has_pixels = any(t in ds for t in (0x7FE00008, 0x7FE00009, _PIXEL_DATA))
    if "Image Storage" in sop_class.name and not has_pixels:
        raise DatasetMismatch(f"{where}: {sop_class.name} instance without Pixel Data")
    if _PIXEL_DATA not in ds:
        return
    dims = {k: _int(ds, k) for k in ("Rows", "Columns", "BitsAllocated")}
    bad = sorted(k for k, v in dims.items() if v is None or v <= 0)
    if bad:
        raise DatasetMismatch(f"{where}: Pixel Data without valid {', '.join(bad)}")
    frames = _int(ds, "NumberOfFrames", 1) or 0
    samples = _int(ds, "SamplesPerPixel", 1) or 0
    if frames < 1 or samples < 1:
        raise DatasetMismatch(f"{where}: invalid Number of Frames or Samples per Pixel")
    elem = ds[_PIXEL_DATA]
    value = elem.value or b""
    if encapsulated:
        if not elem.is_undefined_length:
            raise UnreadableInstance(f"{where}: compressed Pixel Data is not encapsulated")
        try:
            fragments = sum(1 for _ in generate_fragments(value))
        except Exception as exc:
            raise UnreadableInstance(
                f"{where}: encapsulated Pixel Data unreadable ({type(exc).__name__})"
            ) from None
        if fragments < frames:
            raise UnreadableInstance(f"{where}: {fragments} fragments for {frames} frame(s)")
        return
    rows, cols, bits = (int(dims[k] or 0) for k in ("Rows", "Columns", "BitsAllocated"))
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # chroma subsampled: Y Y Cb Cr per pair of pixels (PS3.3 C.7.6.3.1.2)
    expected = (rows * cols * frames * samples * bits + 7) // 8
    if len(value) < expected:
        raise UnreadableInstance(
            f"{where}: Pixel Data holds {len(value)} bytes, the image needs {expected} (truncated?)"
        )


def _burned_in(ds: Dataset) -> str:
    try:
        flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    except Exception:
        return ""
    return flag if flag in ("YES", "NO") else ""


def parse_instance(
    part10: bytes, *, context_sop_class: str = "", defer_pixel_hash: bool = False
) -> Parsed:
    """Parse and validate a Part-10 object; raise UnreadableInstance / DatasetMismatch.

    ``defer_pixel_hash``: where the fast check read the data set, leave ``pixel_sha256``
    empty and give ``pixel_spans`` instead (hashing 512 KiB is 0.3 ms)."""
    try:
        return _parse(part10, context_sop_class, defer_pixel_hash)
    except ValidationError:
        raise
    except Exception as exc:  # never let odd input escape as anything but a refusal
        raise UnreadableInstance(f"data set unreadable ({type(exc).__name__})") from None


def _checked_dataset(data: bytes, implicit: bool, little: bool, where: str) -> Dataset:
    """The data set of ``data`` after every structural and value check (pydicom)."""
    _walk(data, implicit, little, where)
    try:
        ds = read_dataset(io.BytesIO(data), implicit, little)
    except Exception as exc:
        raise UnreadableInstance(f"{where}: data set unreadable ({type(exc).__name__})") from None
    _check_items(ds, where)
    return ds


def _parse(part10: bytes, context_sop_class: str, defer_pixel_hash: bool = False) -> Parsed:
    meta, body = _split(part10)
    syntax = UID(str(meta.TransferSyntaxUID))
    where = f"instance {meta.MediaStorageSOPInstanceUID}"
    try:
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
        deflated, encapsulated = syntax.is_deflated, syntax.is_encapsulated
    except ValueError:
        raise UnreadableInstance(f"{where}: unknown transfer syntax {syntax}") from None
    data = _inflate(body, where) if deflated else body
    clean = clean_elements(data) if syntax == ExplicitVRLittleEndian else None
    spans: tuple[tuple[int, int, int], ...] = ()
    if clean is not None:  # the same checks in one pass (hospital_node.ingest_fast)
        if defer_pixel_hash:
            at = len(part10) - len(data)
            spans = tuple(
                (tag, at + clean[tag].value_tell, clean[tag].length)  # type: ignore[index]
                for tag in PIXEL_DATA_TAGS
                if tag in clean
            )
        ds = Dataset(clean)  # type: ignore[arg-type]  # RawDataElements, as read_dataset
    else:
        ds = _checked_dataset(data, implicit, little, where)
    ds.file_meta = meta
    uids: dict[str, str] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        try:
            value = ds.get(keyword)
        except Exception:
            value = None
        if not _uid_ok(value):
            state = "missing" if value is None or value == "" else "not a valid UID"
            raise DatasetMismatch(f"{where}: {keyword} is {state}")
        uids[keyword] = str(value)
    sop_class = UID(uids["SOPClassUID"])
    if sop_class != meta.MediaStorageSOPClassUID or (
        context_sop_class and sop_class != context_sop_class
    ):
        raise DatasetMismatch(
            f"{where}: SOP Class UID {sop_class} differs from the request's "
            f"{meta.MediaStorageSOPClassUID} / presentation context {context_sop_class or '-'}"
        )
    if uids["SOPInstanceUID"] != meta.MediaStorageSOPInstanceUID:
        raise DatasetMismatch(
            f"{where}: data set's SOP Instance UID {uids['SOPInstanceUID']} differs from the "
            "request's"
        )
    _check_pixels(ds, sop_class, encapsulated, where)
    return Parsed(
        sop_class_uid=str(sop_class),
        sop_instance_uid=uids["SOPInstanceUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax=str(syntax),
        modality=str(ds.get("Modality", "") or "")[:16],
        geometry=slice_geometry(ds),
        geometry_sha256=geometry_hash(ds),
        pixel_sha256="" if spans else pixel_hash(ds),
        burned_in=_burned_in(ds),
        pixel_spans=spans,
        identity=identity_source(ds if clean is None else clean),
    )


@dataclass(frozen=True)
class Filing:
    """One validated instance to file: ``put()`` stores its Part-10 object durably
    (None: the caller has stored it already)."""

    put: Callable[[], object] | None
    object_id: str
    size: int
    parsed: Parsed
    calling_ae: str
    called_ae: str
    received_at: str
    replay: bool = False  # filed again (restart, retry): skip it if already catalogued


_RECORDED = ("sop_instance_uid", "study_uid", "series_uid", "sop_class_uid", "transfer_syntax",
             "modality", "geometry_sha256", "pixel_sha256", "burned_in")  # fmt: skip
"""Facts of a :class:`Parsed` instance that its :class:`InstanceRecord` carries as they are."""


class Ingest:
    """Takes received instances into the node (thread-safe: one call per association).

    Two steps, so that :mod:`hospital_node.spool` can answer the PACS between them:
    :meth:`check` (parse and validate; a refusal is audited) and :meth:`file` (store,
    catalogue, audit). :meth:`ingest` does both at once."""

    def __init__(
        self, store: ObjectStore, catalog: Catalog, studies: StudyCatalog, audit: AuditLog,
        node_id: str, identities: StudyIdentities | None = None,
    ) -> None:  # fmt: skip
        self.store, self.catalog, self.studies = store, catalog, studies
        self.audit, self.node_id = audit, node_id
        self.identities = identities

    def ingest(
        self, part10: bytes, *, calling_ae: str, called_ae: str, context_sop_class: str = ""
    ) -> InstanceRecord:
        """Validate, store durably, catalogue and audit one instance; see the module doc.

        ``context_sop_class``: the presentation context's abstract syntax, if any; the
        data set's SOP Class must be it."""
        object_id = sha256_hex(part10)
        parsed = self.check(
            part10, calling_ae=calling_ae, called_ae=called_ae,
            context_sop_class=context_sop_class,
        )  # fmt: skip
        facts: dict[str, object] = {"calling_ae": calling_ae, "called_ae": called_ae}
        facts.update(size=len(part10), sop_instance_uid=parsed.sop_instance_uid)
        try:
            (rec,) = self.file([Filing(
                lambda: self.store.put_stream(object_id, [part10]), object_id, len(part10),
                parsed, calling_ae, called_ae, utcnow(),
            )])  # fmt: skip
            return rec
        except AuditError:
            raise
        except YigongError as exc:
            self.audit_refusal(object_id, {**facts, "study_uid": parsed.study_uid}, exc)
            raise

    def check(
        self, part10: bytes, *, calling_ae: str, called_ae: str, context_sop_class: str = "",
        defer_pixel_hash: bool = False,
    ) -> Parsed:  # fmt: skip
        """Parse and validate (:func:`parse_instance`); a refused instance is audited
        (object id: the SHA-256 of ``part10``) and its error raised."""
        try:
            return parse_instance(
                part10, context_sop_class=context_sop_class, defer_pixel_hash=defer_pixel_hash
            )
        except YigongError as exc:
            facts = {"calling_ae": calling_ae, "called_ae": called_ae, "size": len(part10)}
            self.audit_refusal(sha256_hex(part10), facts, exc)
            raise

    def file(self, filings: Sequence[Filing]) -> list[InstanceRecord]:
        """Store each filing's Part-10 object durably (``put()``), audit
        ``dicom.instance_received`` for all of them (one audit transaction), then record
        objects and instance rows (one catalog transaction). The audit events come
        first, so a crash between the two leaves instances audited and not catalogued —
        and filing them again (``replay``, from the spool after a restart) finds them
        uncatalogued and files them, never the reverse. With ``replay``, an instance
        already catalogued is left as it is."""
        todo: list[tuple[Filing, InstanceRecord, bool]] = []
        done: list[InstanceRecord] = []
        seen: dict[str, set[str]] = {}  # SOP Instance UID -> object ids, this batch included
        for f in filings:
            p = f.parsed
            existing = self.studies.find_instance(p.sop_instance_uid, f.object_id)
            stored_already = self.store.exists(f.object_id)
            if f.replay and existing is not None and stored_already:
                done.append(existing)
                continue
            if f.put is not None and (existing is None or not stored_already):
                f.put()  # durable when it returns
            ids = seen.setdefault(p.sop_instance_uid, self.studies.object_ids(p.sop_instance_uid))
            resent = existing is not None or f.object_id in ids
            rec = InstanceRecord(
                **{k: getattr(p, k) for k in _RECORDED},
                object_id=f.object_id, size=f.size, calling_ae=f.calling_ae,
                called_ae=f.called_ae, received_at=f.received_at,
                instance_number=p.geometry.instance_number,
                duplicate=existing.duplicate if existing else bool(ids - {f.object_id}),
            )  # fmt: skip
            ids.add(f.object_id)
            todo.append((f, existing or rec, resent))
        with self.audit.batch():
            for f, rec, resent in todo:
                details: dict[str, str | int | bool] = {k: getattr(rec, k) for k in _RECORDED[:-3]}
                details.update(
                    pixel_sha256=rec.pixel_sha256, geometry_sha256=rec.geometry_sha256,
                    calling_ae=f.calling_ae, called_ae=f.called_ae, size=f.size,
                    resent_identical=resent, duplicate_uid_other_bytes=rec.duplicate,
                )  # fmt: skip
                if f.replay:
                    details["replayed"] = True
                self.audit.record(
                    DICOM_INSTANCE_RECEIVED, actor=f"dicom-ae:{f.calling_ae}",
                    object_id=f.object_id, details=details,
                )  # fmt: skip
        with self.catalog.transaction():
            added = [self._catalogue(f.parsed, rec) for f, rec, _ in todo]
            if self.identities is not None:
                for f, rec, _ in todo:
                    self.identities.record(rec.study_uid, f.parsed.identity)
        for (f, rec, _), new in zip(todo, added, strict=True):
            if rec.duplicate and new:
                log.warning(
                    "instance %s of study %s received again with different bytes (object %s); "
                    "both kept and flagged in the study report",
                    rec.sop_instance_uid, rec.study_uid, f.object_id,
                )  # fmt: skip
            log.debug("instance %s stored as %s", rec.sop_instance_uid, f.object_id)
            done.append(rec)
        return done

    def _catalogue(self, p: Parsed, rec: InstanceRecord) -> bool:
        self.catalog.add_object(
            object_id=rec.object_id, size=rec.size, name=f"{p.sop_instance_uid}.dcm",
            media_type=MEDIA_TYPE, case_id="", origin_node=self.node_id,
            labels={"source": "dicom-scp"},
        )  # fmt: skip
        return self.studies.add_instance(rec, p.geometry)

    def audit_refusal(self, object_id: str, facts: dict[str, object], exc: Exception) -> None:
        """Audit ``dicom.instance_received`` with outcome failure and the reason."""
        details = {k: v for k, v in facts.items() if isinstance(v, str | int)}
        details["reason"] = str(exc)[:1000]
        details["error"] = type(exc).__name__
        try:
            self.audit.record(
                DICOM_INSTANCE_RECEIVED,
                actor=f"dicom-ae:{facts.get('calling_ae', '')}",
                outcome="failure",
                object_id=object_id,
                details=details,
            )
        except YigongError as audit_exc:  # the refusal still stands; say why it is unaudited
            log.error("could not audit a refused instance: %s", audit_exc)
