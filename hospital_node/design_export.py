"""An approved design into the hospital's own PACS, as a DICOM Encapsulated STL instance.

Only inside the hospital: here the case is mapped back to the real patient (an original,
identified instance of the confirmed study, checked against the pseudonym vault), and the
instance carries the patient's identity, so it goes to the configured PACS and nowhere
else. :meth:`DesignExporter.export_design` refuses, naming case and object (never patient
data), unless, in this order: the caller is a clinician of this node; ``[pacs] host`` is
set; the case's chain verifies and its design confirmation stage is complete (clinical
*and* production confirmation of the current design); the object is a file of that
confirmed design output (or design change), held here for the case, hashing to its id,
``model/stl`` and a binary STL; it was not exported before (unless ``again``); the case has
a data confirmation here to its manufacturer; one original instance of the chosen series
reads back; and the vault's patient of the case is that instance's patient.

**Which series.** The factory designed in the de-identified series, whose Frame of
Reference UID the de-identifier replaced by a keyed mapping (geometry untouched); the
model is in the coordinates of the *original* series, whose Frame of Reference UID is
exported. With several released series: the one named in the design output's
``parameters`` (:data:`SERIES_KEYS`, the de-identified UID the factory saw or the
original), else the first whose frame is named there (:data:`FRAME_KEYS`), else the first
(confirmation order, then Series Instance UID) with a Frame of Reference UID;
:data:`STUDY_KEYS` narrows to one study. A named UID that was not released for the case
refuses the export: nothing is guessed into a patient's record.

The C-STORE is the injected ``send`` (:func:`hospital_node.wire.pacs_scu.send_to_pacs` in the
node; this module imports no network library). A success is recorded in
``design_exports`` and audited as ``design.exported``; a refusal or failed C-STORE is
audited as a failed ``design.exported`` and nothing is recorded.
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway import authz
from gateway.audit import DESIGN_EXPORTED, QUERY, SECURITY_ALERT, AuditLog
from gateway.cases.records import check_case_id
from gateway.cases.schema import is_hex64
from gateway.cases.workflow import SIDE_OF_ROLE, needs
from gateway.catalog import Catalog, utcnow
from gateway.config import PacsSection
from gateway.errors import (
    ConfigError,
    IntegrityError,
    NotFound,
    ValidationError,
    YigongError,
)
from gateway.fidelity.mesh import canonical_media_type
from gateway.hashing import sha256_hex
from gateway.identity import Identity
from gateway.storage import ObjectStore
from hospital_node.guard import read_object
from hospital_node.release_store import ReleaseStore
from hospital_node.stl_export import (
    STL_MIME_TYPE,
    Equipment,
    binary_stl_problem,
    build_encapsulated_stl,
)
from hospital_node.vault import PseudonymVault, patient_of

if TYPE_CHECKING:
    from gateway.cases import CaseService
    from gateway.cases.chain import ChainReport
    from gateway.cases.records import Record

log = logging.getLogger(__name__)

Sender = Callable[[Dataset, str, int, str, str, float], int]
"""``send(ds, host, port, called_ae, calling_ae, timeout) -> C-STORE status``."""

SERIES_KEYS = ("source_series_uid", "series_instance_uid")
FRAME_KEYS = ("frame_of_reference_uid",)
STUDY_KEYS = ("source_study_uid", "study_instance_uid")
_UID = re.compile(r"[0-9.]{1,64}")

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE design_exports (
        sop_instance_uid TEXT PRIMARY KEY,  -- of the new instance
        case_id TEXT NOT NULL, object_id TEXT NOT NULL, design_hash TEXT NOT NULL,
        study_uid TEXT NOT NULL,  -- the patient's original study (hospital-local)
        series_uid TEXT NOT NULL, source_series_uid TEXT NOT NULL,
        pacs TEXT NOT NULL, status INTEGER NOT NULL, actor TEXT NOT NULL,
        exported_at TEXT NOT NULL
    );
    CREATE INDEX design_exports_design ON design_exports(case_id, object_id);
    """,
)


@dataclass(frozen=True)
class ExportResult:
    sop_instance_uid: str  # the new instance ("" for a dry run)
    series_uid: str  # its new series ("" for a dry run)
    study_uid: str  # the patient's original study it joins
    pacs: str  # AE@host:port
    status: int  # C-STORE status (0 for a dry run)
    source_series_uid: str = ""  # the original series whose frame of reference it uses
    exported_at: str = ""


@dataclass(frozen=True, repr=False)  # the instance identifies the patient: no repr
class _Source:
    study_uid: str
    series_uid: str
    frame_uid: str
    instance: Dataset  # an original instance of the series (no pixel data)
    data: bytes  # its bytes


@dataclass(frozen=True, repr=False)
class _Plan:
    case_id: str
    object_id: str
    design_hash: str  # record hash of the confirmed design output / change
    stl: bytes
    source: _Source


def _shown(uid: str) -> str:
    return uid if _UID.fullmatch(uid) else "(not a UID)"


class DesignExporter:
    """Exports approved designs of this hospital's cases into its PACS."""

    def __init__(
        self,
        *,
        node_id: str,
        pacs: Callable[[], PacsSection],
        calling_ae: str,
        catalog: Catalog,
        store: ObjectStore,
        audit: AuditLog,
        vault: PseudonymVault,
        releases: ReleaseStore,
        cases: CaseService,
        uid_map: Callable[[str, str, str], str],
        send: Sender,
        equipment: Equipment | None = None,
    ) -> None:
        self.node_id = node_id
        self._pacs, self._calling_ae = pacs, calling_ae
        self.catalog, self.store, self.audit = catalog, store, audit
        self.vault, self.releases, self._cases = vault, releases, cases
        self._uid_map, self._send = uid_map, send
        self.equipment = equipment
        self._lock = threading.Lock()
        catalog.extend("design_export", MIGRATIONS)

    # -- the export ----------------------------------------------------------------------
    def export_design(
        self,
        case_id: str,
        object_id: str,
        *,
        caller: Identity,
        again: bool = False,
        dry_run: bool = False,
    ) -> ExportResult:
        """Export ``object_id`` of ``case_id``'s approved design to the PACS (or, with
        ``dry_run``, run every check and say where it would go)."""
        where = ""
        try:
            authz.authorize(
                caller, authz.DESIGN_EXPORT, authz.NodeSelf(self.node_id, authz.HOSPITAL)
            )
            check_case_id(case_id)
            if not is_hex64(object_id):
                raise ValidationError(
                    "the object must be named by its SHA-256 (64 lowercase hex digits)"
                )
            pacs, calling_ae, where = self._destination()
            with self._lock:
                plan = self._plan(case_id, object_id, again)
                src = plan.source
                result = (
                    ExportResult("", "", src.study_uid, where, 0, src.series_uid)
                    if dry_run
                    else self._export(plan, pacs, calling_ae, where, caller)
                )
        except YigongError as exc:
            self._audit_failure(caller, case_id, object_id, where, exc, dry_run)
            raise
        if dry_run:
            self.audit.record(
                QUERY,
                actor=caller.label(),
                object_id=object_id,
                case_id=case_id,
                details={"query": "hospital.export_design_check", "pacs": where},
            )
            return result
        self.audit.record(
            DESIGN_EXPORTED,
            actor=caller.label(),
            object_id=object_id,
            case_id=case_id,
            details={
                "sop_instance_uid": result.sop_instance_uid,
                "study_instance_uid": result.study_uid,
                "design_hash": plan.design_hash,
                "pacs": where,
                "status": result.status,
                "again": again,
            },
        )
        log.info(
            "case %s: design file %s exported to PACS %s as instance %s (status 0x%04X)",
            case_id, object_id[:16], where, result.sop_instance_uid, result.status,
        )  # fmt: skip
        return result

    def exports(self, case_id: str) -> list[ExportResult]:
        """What was exported for ``case_id`` (oldest first)."""
        rows = self.catalog.query(
            "SELECT sop_instance_uid, series_uid, study_uid, pacs, status, source_series_uid,"
            " exported_at FROM design_exports WHERE case_id = ? ORDER BY exported_at, rowid",
            (case_id,),
        )
        return [ExportResult(*tuple(r)) for r in rows]

    def _destination(self) -> tuple[PacsSection, str, str]:
        pacs = self._pacs()
        if not pacs.host.strip():
            raise ConfigError(
                f"node {self.node_id} has no PACS to export designs to: set [pacs] host "
                "(and port, called_ae) in the node's configuration"
            )
        where = f"{pacs.called_ae}@{pacs.host}:{pacs.port}"
        return pacs, pacs.calling_ae or self._calling_ae, where

    def _export(
        self, plan: _Plan, pacs: PacsSection, calling_ae: str, where: str, caller: Identity
    ) -> ExportResult:
        src = plan.source
        ds = build_encapsulated_stl(
            plan.stl,
            original_study=src.instance,
            frame_of_reference_uid=src.frame_uid,
            case_id=plan.case_id,
            equipment=self.equipment,
        )
        status = self._send(ds, pacs.host, pacs.port, pacs.called_ae, calling_ae,
                            pacs.timeout_seconds)  # fmt: skip
        result = ExportResult(
            str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), src.study_uid, where,
            int(status), src.series_uid, utcnow(),
        )  # fmt: skip
        with self.catalog.transaction() as db:
            db.execute(
                "INSERT INTO design_exports VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (result.sop_instance_uid, plan.case_id, plan.object_id, plan.design_hash,
                 src.study_uid, result.series_uid, src.series_uid, where, result.status,
                 caller.label(), result.exported_at),
            )  # fmt: skip
        return result

    def _audit_failure(
        self, caller: Identity, case_id: str, object_id: str, where: str, exc: YigongError,
        dry_run: bool,
    ) -> None:  # fmt: skip
        valid_case = True
        try:
            check_case_id(case_id)
        except ValidationError:
            valid_case = False  # it might be anything a person typed: left out
        self.audit.record(
            DESIGN_EXPORTED,
            actor=caller.label(),
            outcome="failure",
            object_id=object_id if is_hex64(object_id) else None,
            case_id=case_id if valid_case else None,
            details={"pacs": where, "error": type(exc).__name__, "dry_run": dry_run},
        )
        log.warning("design export (case %s) refused: %s", case_id if valid_case else "?", exc)

    # -- the checks ----------------------------------------------------------------------
    def _plan(self, case_id: str, object_id: str, again: bool) -> _Plan:
        cases = self._cases
        case = cases.case(case_id)
        design_hash, design = self._approved_design(case_id, cases.intact(case))
        files = [str(f["object_id"]) for f in design.data.get("files", ())]
        if object_id not in files:
            raise ValidationError(
                f"case {case_id}: object {object_id[:16]}… is not a file of the confirmed "
                f"design ({design.type}, record {design.seq}); its files: "
                + ", ".join(f"{f[:16]}…" for f in files)
            )
        stl = self._stl(case_id, object_id)
        if not again:
            self._check_not_exported(case_id, object_id)
        params = design.data.get("parameters", {})
        source = self._source(case_id, case.manufacturer, params)
        patient = self.vault.lookup(case_id)
        if not patient.same_patient(patient_of(source.data)):
            self.audit.record(
                SECURITY_ALERT,
                actor=f"node:{self.node_id}",
                outcome="failure",
                case_id=case_id,
                details={"reason": "vault mismatch", "action": "design export refused",
                         "study_uid": source.study_uid},
            )  # fmt: skip
            raise ValidationError(
                f"case {case_id}: the original study {source.study_uid} does not belong to the "
                "patient the pseudonym vault holds for this case (Patient ID / Issuer differ); "
                "nothing was exported"
            )
        return _Plan(case_id, object_id, design_hash, stl, source)

    def _approved_design(self, case_id: str, report: ChainReport) -> tuple[str, Record]:
        state = report.state
        if not state.design or state.confirmed != frozenset(SIDE_OF_ROLE.values()):
            if state.stage == "design_confirmation":
                why = f"stage 'design_confirmation' is not complete (needs {needs(state)})"
            else:
                why = (
                    f"the case is at stage '{state.stage}' (needs {needs(state)}), not past "
                    "a complete stage 'design_confirmation'"
                )
            raise ValidationError(
                f"case {case_id}: the design is not approved: {why}; only a design confirmed "
                "by the clinician and by production (§5.3.6.3) is exported"
            )
        for check in report.checks:
            if check.envelope_hash == state.design and check.record is not None:
                return state.design, check.record
        raise ValidationError(f"case {case_id}: the confirmed design record is not in the chain")

    def _stl(self, case_id: str, object_id: str) -> bytes:
        obj = self.catalog.find_object(object_id)
        if obj is None or self.store.size(object_id) != obj.size:
            raise NotFound(
                f"case {case_id}: design file {object_id[:16]}… is not held by node "
                f"{self.node_id}; the manufacturer sends it with the design (yigong send "
                f"--case {case_id} --to {self.node_id}); export it once it has arrived"
            )
        if obj.case_id not in ("", case_id):
            raise ValidationError(
                f"case {case_id}: design file {object_id[:16]}… belongs to case {obj.case_id}"
            )
        media_type = canonical_media_type(obj.media_type)
        if media_type != STL_MIME_TYPE:
            raise ValidationError(
                f"case {case_id}: design file {object_id[:16]}… has media type "
                f"{media_type[:60]!r}; only {STL_MIME_TYPE} is exported as Encapsulated STL"
            )
        data = read_object(self.store, object_id)
        if sha256_hex(data) != object_id:
            raise IntegrityError(
                f"case {case_id}: design file {object_id[:16]}… in the store does not match "
                "its SHA-256; not exported"
            )
        problem = binary_stl_problem(data)
        if problem:
            raise ValidationError(
                f"case {case_id}: design file {object_id[:16]}… is not a binary STL ({problem}); "
                "the Encapsulated STL IOD holds binary STL only, and it is never converted"
            )
        return data

    def _check_not_exported(self, case_id: str, object_id: str) -> None:
        rows = self.catalog.query(
            "SELECT sop_instance_uid, pacs, exported_at FROM design_exports"
            " WHERE case_id = ? AND object_id = ? ORDER BY exported_at DESC LIMIT 1",
            (case_id, object_id),
        )
        if rows:
            uid, pacs, at = tuple(rows[0])
            raise ValidationError(
                f"case {case_id}: design file {object_id[:16]}… was exported already "
                f"(instance {uid} to {pacs} at {at}); export it again only on purpose (--again)"
            )

    # -- the original study --------------------------------------------------------------
    def _source(self, case_id: str, manufacturer: str, params: Mapping[str, Any]) -> _Source:
        """The original series the design was made from, and one original instance of it."""
        rows = [
            (c.confirmation_id, c.study_uid)
            for c in ReleaseStore(self.catalog).confirmations_for_case(case_id, manufacturer)
        ]
        if not rows:
            raise NotFound(
                f"case {case_id} has no data confirmation to {manufacturer} at node "
                f"{self.node_id} (yigong study confirm): the patient's original study is not "
                "known, so the design cannot be linked to it"
            )
        first: dict[tuple[str, str], str] = {}  # (study, series) → first original released
        for confirmation_id, study in rows:
            for r in self.releases.releases(confirmation_id):
                if r.status == "released":
                    first.setdefault((study, r.series_uid), r.source_object_id)
        candidates = [(study, series, oid) for (study, series), oid in first.items()]
        for keys, at in ((STUDY_KEYS, 0), (SERIES_KEYS, 1)):
            key, named = _named(params, keys)
            if named:
                candidates = [
                    c for c in candidates if self._is(named, c[at], case_id, manufacturer)
                ]
                if not candidates:
                    raise ValidationError(
                        f"case {case_id}: the design output names {key} {_shown(named)}, which "
                        "is not among the series released for this case; nothing was exported"
                    )
        frame_key, named_frame = _named(params, FRAME_KEYS)
        for study, series, object_id in candidates:
            ds, data = self._original(case_id, study, series, object_id)
            frame = str(ds.get("FrameOfReferenceUID", "") or "").strip()
            if frame and (
                not named_frame or self._is(named_frame, frame, case_id, manufacturer)
            ):
                return _Source(study, series, frame, ds, data)
        if named_frame:
            raise ValidationError(
                f"case {case_id}: the design output names {frame_key} {_shown(named_frame)}, "
                "which is not the frame of any series released for this case"
            )
        raise ValidationError(
            f"case {case_id}: no series released for this case has a Frame of Reference UID "
            "(or none was released); the model cannot be placed in the patient's study"
        )

    def _original(
        self, case_id: str, study: str, series: str, object_id: str
    ) -> tuple[Dataset, bytes]:
        """An original instance (header) and its bytes, as recorded at its release."""
        data = read_object(self.store, object_id)
        try:
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as exc:
            raise ValidationError(
                f"case {case_id}: original instance {object_id[:16]}… cannot be read "
                f"({type(exc).__name__})"
            ) from exc
        if (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")) != (study, series):
            raise IntegrityError(
                f"case {case_id}: original instance {object_id[:16]}… is not of study {study} "
                f"series {series} as recorded at its release"
            )
        return ds, data

    def _is(self, named: str, original_uid: str, case_id: str, manufacturer: str) -> bool:
        """Whether a UID from the design output is ``original_uid`` or its keyed mapping
        (as the manufacturer received it for this case: per patient and destination)."""
        return named in (original_uid, self._uid_map(case_id, manufacturer, original_uid))


def _named(params: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, str]:
    """The first of ``keys`` the design parameters set, and its value ("" if none)."""
    for key in keys:
        value = params.get(key)
        if isinstance(value, str) and value.strip():
            return key, value.strip()
    return "", ""
