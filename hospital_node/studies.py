"""Study assembly: which instances of which study arrived, and is the study complete?

Tables (catalog extension ``hospital_node``, see :meth:`gateway.catalog.Catalog.extend`):

``dicom_instances``
    One row per stored object of an instance, keyed by (SOP Instance UID, object id).
    The same UID received again with identical bytes adds nothing; with *different*
    bytes both objects are kept, the later row has ``duplicate = 1`` and the study's
    report lists the UID under ``duplicates`` (nothing is lost, a person decides).
``dicom_studies``
    One row per Study Instance UID: ``receiving`` while instances arrive; ``received``
    once :meth:`StudyCatalog.tick` finds no new instance for the quiet period. The
    completeness report is computed then and stored with its SHA-256 (over its
    canonical JSON). A new instance for a ``received`` study re-opens it
    (``receiving``, report cleared) until it is quiet again.

The report: ``{"study_uid", "series": [SeriesReport.to_dict() per series, by series
UID], "duplicates": [{"sop_instance_uid", "series_uid", "object_ids"}]}`` — the series
analysis (:func:`gateway.fidelity.series.analyse_series`) uses the first object
received for each SOP Instance UID.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.audit import canonical_json
from gateway.catalog import Catalog, iso_utc
from gateway.db import Conn, Row
from gateway.errors import NotFound, ValidationError
from gateway.fidelity.series import SliceGeometry, analyse_series
from gateway.hashing import sha256_hex

log = logging.getLogger(__name__)

NAMESPACE = "hospital_node"
MIGRATIONS: Sequence[str] = (
    # 1: received instances and studies
    """
    CREATE TABLE dicom_instances (
        sop_instance_uid TEXT NOT NULL,
        object_id        TEXT NOT NULL,
        study_uid        TEXT NOT NULL,
        series_uid       TEXT NOT NULL,
        sop_class_uid    TEXT NOT NULL,
        transfer_syntax  TEXT NOT NULL,
        modality         TEXT NOT NULL DEFAULT '',
        size             INTEGER NOT NULL,
        calling_ae       TEXT NOT NULL,
        called_ae        TEXT NOT NULL,
        received_at      TEXT NOT NULL,
        instance_number  INTEGER,
        geometry         TEXT NOT NULL DEFAULT '{}',
        geometry_sha256  TEXT NOT NULL,
        pixel_sha256     TEXT NOT NULL,
        burned_in        TEXT NOT NULL DEFAULT '' CHECK (burned_in IN ('YES', 'NO', '')),
        duplicate        INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sop_instance_uid, object_id)
    );
    CREATE INDEX dicom_instances_study ON dicom_instances(study_uid, series_uid);
    CREATE INDEX dicom_instances_object ON dicom_instances(object_id);
    CREATE TABLE dicom_studies (
        study_uid         TEXT PRIMARY KEY,
        status            TEXT NOT NULL CHECK (status IN ('receiving', 'received')),
        first_received_at TEXT NOT NULL,
        last_received_at  TEXT NOT NULL,
        instance_count    INTEGER NOT NULL DEFAULT 0,
        series_count      INTEGER NOT NULL DEFAULT 0,
        report_json       TEXT NOT NULL DEFAULT '',
        report_sha256     TEXT NOT NULL DEFAULT '',
        received_at       TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX dicom_studies_status ON dicom_studies(status, last_received_at);
    """,
)

STATUSES = ("receiving", "received")


@dataclass(frozen=True)
class InstanceRecord:
    """One stored object of a received instance (UIDs and hashes; no patient data)."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    object_id: str
    size: int
    calling_ae: str
    called_ae: str
    received_at: str
    instance_number: int | None
    geometry_sha256: str
    pixel_sha256: str
    burned_in: str
    duplicate: bool


@dataclass(frozen=True)
class StudySummary:
    study_uid: str
    status: str
    first_received_at: str
    last_received_at: str
    received_at: str
    instance_count: int
    series_count: int
    report: dict[str, Any]
    report_sha256: str


def geometry_to_json(geometry: SliceGeometry) -> str:
    return json.dumps(dataclasses.asdict(geometry), sort_keys=True)


def geometry_from_json(text: str) -> SliceGeometry:
    raw = json.loads(text)

    def tup(key: str) -> Any:
        value = raw.get(key)
        return tuple(value) if isinstance(value, list) else None

    return SliceGeometry(
        sop_instance_uid=raw.get("sop_instance_uid", ""),
        series_uid=raw.get("series_uid", ""),
        position=tup("position"),
        orientation=tup("orientation"),
        pixel_spacing=tup("pixel_spacing"),
        slice_thickness=raw.get("slice_thickness"),
        rows=int(raw.get("rows") or 0),
        columns=int(raw.get("columns") or 0),
        gantry_tilt=raw.get("gantry_tilt"),
        instance_number=raw.get("instance_number"),
    )


def report_digest(report: dict[str, Any]) -> str:
    """SHA-256 of the report's canonical JSON (what a confirmation signs)."""
    return sha256_hex(canonical_json(report).encode())


class StudyCatalog:
    """The hospital's study tables in the node catalog (thread-safe via the catalog)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.extend(NAMESPACE, MIGRATIONS)

    # -- writing ----------------------------------------------------------
    def add_instance(self, rec: InstanceRecord, geometry: SliceGeometry) -> bool:
        """Record ``rec``; False when this exact object of this UID is already recorded.

        ``rec.duplicate`` is decided here (another object under the same UID)."""
        with self.catalog.transaction() as db:
            seen = [
                r["object_id"]
                for r in db.execute(
                    "SELECT object_id FROM dicom_instances WHERE sop_instance_uid = ?",
                    (rec.sop_instance_uid,),
                )
            ]
            if rec.object_id in seen:
                return False
            db.execute(
                "INSERT INTO dicom_instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.sop_instance_uid, rec.object_id, rec.study_uid, rec.series_uid,
                    rec.sop_class_uid, rec.transfer_syntax, rec.modality, rec.size,
                    rec.calling_ae, rec.called_ae, rec.received_at, rec.instance_number,
                    geometry_to_json(geometry), rec.geometry_sha256, rec.pixel_sha256,
                    rec.burned_in, 1 if seen else 0,
                ),
            )  # fmt: skip
            self._touch_study(db, rec.study_uid, rec.received_at)
        return True

    def _touch_study(self, db: Conn, study_uid: str, when: str) -> None:
        row = db.execute(
            "SELECT status FROM dicom_studies WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        counts = db.execute(
            "SELECT COUNT(DISTINCT sop_instance_uid), COUNT(DISTINCT series_uid)"
            " FROM dicom_instances WHERE study_uid = ?",
            (study_uid,),
        ).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO dicom_studies (study_uid, status, first_received_at,"
                " last_received_at, instance_count, series_count) VALUES (?,?,?,?,?,?)",
                (study_uid, "receiving", when, when, counts[0], counts[1]),
            )
            return
        if row["status"] == "received":
            log.info("study %s re-opened: a new instance arrived after it was received", study_uid)
        db.execute(
            "UPDATE dicom_studies SET status = 'receiving',"
            " last_received_at = CASE WHEN last_received_at > ? THEN last_received_at ELSE ?"
            " END, instance_count = ?, series_count = ?,"
            " report_json = '', report_sha256 = '', received_at = '' WHERE study_uid = ?",
            (when, when, counts[0], counts[1], study_uid),
        )

    def tick(self, now: datetime, quiet_period_seconds: float) -> list[str]:
        """Mark ``receiving`` studies quiet for ``quiet_period_seconds`` as ``received``
        (computing and storing their reports); return their UIDs."""
        cutoff = iso_utc(now - timedelta(seconds=quiet_period_seconds))
        due = self.catalog.query(
            "SELECT study_uid, last_received_at FROM dicom_studies"
            " WHERE status = 'receiving' AND last_received_at <= ? ORDER BY last_received_at",
            (cutoff,),
        )
        done: list[str] = []
        for row in due:
            study_uid, last = row["study_uid"], row["last_received_at"]
            report = self.build_report(study_uid)
            with self.catalog.transaction() as db:
                cur = db.execute(
                    "UPDATE dicom_studies SET status = 'received', report_json = ?,"
                    " report_sha256 = ?, received_at = ? WHERE study_uid = ?"
                    " AND status = 'receiving' AND last_received_at = ?",
                    (canonical_json(report), report_digest(report), iso_utc(now), study_uid, last),
                )
            if cur.rowcount == 1:  # else an instance arrived meanwhile: next tick
                done.append(study_uid)
                log.info(
                    "study %s received: %d series, %d duplicate UID(s)",
                    study_uid, len(report["series"]), len(report["duplicates"]),
                )  # fmt: skip
        return done

    def receiving_counts(self) -> tuple[int, int]:
        """The instance count of the largest study still ``receiving`` and of all of
        them together ((0, 0): none)."""
        rows = self.catalog.query(
            "SELECT MAX(instance_count) AS n, SUM(instance_count) AS total"
            " FROM dicom_studies WHERE status = 'receiving'"
        )
        return (int(rows[0]["n"] or 0), int(rows[0]["total"] or 0)) if rows else (0, 0)

    def build_report(self, study_uid: str) -> dict[str, Any]:
        """The completeness report of ``study_uid`` from what is recorded now."""
        rows = self.catalog.query(
            "SELECT sop_instance_uid, series_uid, object_id, geometry FROM dicom_instances"
            " WHERE study_uid = ? ORDER BY received_at, rowid",
            (study_uid,),
        )
        by_series: dict[str, list[SliceGeometry]] = defaultdict(list)
        objects: dict[str, list[str]] = defaultdict(list)
        series_of: dict[str, str] = {}
        for r in rows:
            uid = r["sop_instance_uid"]
            if uid not in objects:
                by_series[r["series_uid"]].append(geometry_from_json(r["geometry"]))
                series_of[uid] = r["series_uid"]
            objects[uid].append(r["object_id"])
        return {
            "study_uid": study_uid,
            "series": [analyse_series(by_series[s]).to_dict() for s in sorted(by_series)],
            "duplicates": [
                {"sop_instance_uid": uid, "series_uid": series_of[uid], "object_ids": ids}
                for uid, ids in sorted(objects.items())
                if len(ids) > 1
            ],
        }

    # -- reading ----------------------------------------------------------
    def list_studies(
        self, *, status: str = "", limit: int = 100, before: tuple[str, str] | None = None
    ) -> list[StudySummary]:
        """Newest first (by last instance received); ``before``: the page after the study
        ``(last_received_at, study_uid)`` (a cursor: the last row of the previous page)."""
        if status and status not in STATUSES:
            raise ValidationError(f"study status must be one of {STATUSES}, not {status!r}")
        where: list[str] = []
        params: list[object] = []
        if status:
            where.append("status = ?")
            params.append(status)
        if before is not None:
            where.append("(last_received_at < ? OR (last_received_at = ? AND study_uid < ?))")
            params += [before[0], before[0], before[1]]
        sql = "SELECT * FROM dicom_studies"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY last_received_at DESC, study_uid DESC LIMIT ?"
        return [_study(r) for r in self.catalog.query(sql, (*params, limit))]

    def get_study(self, study_uid: str) -> StudySummary:
        rows = self.catalog.query("SELECT * FROM dicom_studies WHERE study_uid = ?", (study_uid,))
        if not rows:
            raise NotFound(f"study {study_uid} has not been received by this node")
        return _study(rows[0])

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        rows = self.catalog.query(
            "SELECT * FROM dicom_instances WHERE study_uid = ?"
            " ORDER BY series_uid, instance_number NULLS FIRST, sop_instance_uid, received_at",
            (study_uid,),
        )
        return [_instance(r) for r in rows]

    def modalities(self, study_uid: str) -> tuple[str, ...]:
        """The distinct modalities of the study's instances, sorted."""
        rows = self.catalog.query(
            "SELECT DISTINCT modality FROM dicom_instances WHERE study_uid = ? AND modality != ''"
            " ORDER BY modality",
            (study_uid,),
        )
        return tuple(str(r["modality"]) for r in rows)

    def find_instance(self, sop_instance_uid: str, object_id: str) -> InstanceRecord | None:
        rows = self.catalog.query(
            "SELECT * FROM dicom_instances WHERE sop_instance_uid = ? AND object_id = ?",
            (sop_instance_uid, object_id),
        )
        return _instance(rows[0]) if rows else None

    def object_ids(self, sop_instance_uid: str) -> set[str]:
        """Every object recorded under this SOP Instance UID."""
        rows = self.catalog.query(
            "SELECT object_id FROM dicom_instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        return {str(r["object_id"]) for r in rows}

    def geometry(self, sop_instance_uid: str, object_id: str) -> SliceGeometry | None:
        rows = self.catalog.query(
            "SELECT geometry FROM dicom_instances WHERE sop_instance_uid = ? AND object_id = ?",
            (sop_instance_uid, object_id),
        )
        return geometry_from_json(rows[0]["geometry"]) if rows else None


def _instance(r: Row) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=r["sop_instance_uid"],
        study_uid=r["study_uid"],
        series_uid=r["series_uid"],
        sop_class_uid=r["sop_class_uid"],
        transfer_syntax=r["transfer_syntax"],
        modality=r["modality"],
        object_id=r["object_id"],
        size=r["size"],
        calling_ae=r["calling_ae"],
        called_ae=r["called_ae"],
        received_at=r["received_at"],
        instance_number=r["instance_number"],
        geometry_sha256=r["geometry_sha256"],
        pixel_sha256=r["pixel_sha256"],
        burned_in=r["burned_in"],
        duplicate=bool(r["duplicate"]),
    )


def _study(r: Row) -> StudySummary:
    return StudySummary(
        study_uid=r["study_uid"],
        status=r["status"],
        first_received_at=r["first_received_at"],
        last_received_at=r["last_received_at"],
        received_at=r["received_at"],
        instance_count=r["instance_count"],
        series_count=r["series_count"],
        report=json.loads(r["report_json"]) if r["report_json"] else {},
        report_sha256=r["report_sha256"],
    )
