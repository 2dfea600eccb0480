"""The factory node's tables: received DICOM instances per case and study, and the
results of the suitability check (standard §9.3.4).

Both tables live in the node's catalog (``Catalog.extend("factory_node", ...)``).
Rows hold UIDs, case ids, object ids and slice geometry only — never patient data
(instances arrive de-identified, and nothing from a header but UIDs and geometry is
kept here).

- ``factory_instances``: one row per received object and case (the same bytes sent
  for two cases are two rows). ``seq`` increases with every new row, so a check
  result records the newest row it saw and can tell whether it is still current.
  Objects that do not parse as DICOM are kept with ``parse_error`` set.
- ``factory_suitability``: every check result, newest last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gateway.catalog import Catalog, utcnow
from gateway.db import Row
from gateway.errors import NotFound, ValidationError
from gateway.fidelity.series import SliceGeometry

log = logging.getLogger(__name__)

NAMESPACE = "factory_node"

MIGRATIONS: Sequence[str] = (
    # 1: received instances grouped per case and study; suitability results
    """
    CREATE TABLE factory_instances (
        seq              INTEGER PRIMARY KEY AUTOINCREMENT,
        object_id        TEXT NOT NULL,
        case_id          TEXT NOT NULL DEFAULT '',
        study_uid        TEXT NOT NULL DEFAULT '',
        series_uid       TEXT NOT NULL DEFAULT '',
        sop_instance_uid TEXT NOT NULL DEFAULT '',
        geometry         TEXT NOT NULL DEFAULT '{}',
        parse_error      TEXT NOT NULL DEFAULT '',
        received_at      TEXT NOT NULL,
        UNIQUE (case_id, object_id)
    );
    CREATE INDEX factory_instances_study ON factory_instances(case_id, study_uid);
    CREATE INDEX factory_instances_study_uid ON factory_instances(study_uid);
    CREATE TABLE factory_suitability (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        case_id        TEXT NOT NULL,
        study_uid      TEXT NOT NULL,
        checked_at     TEXT NOT NULL,
        passed         INTEGER NOT NULL,
        thresholds     TEXT NOT NULL,
        findings       TEXT NOT NULL,
        instance_count INTEGER NOT NULL,
        last_seq       INTEGER NOT NULL
    );
    CREATE INDEX factory_suitability_study ON factory_suitability(case_id, study_uid, id);
    """,
)


@dataclass(frozen=True)
class ReceivedInstance:
    """One received DICOM instance (or an object that did not parse as one)."""

    seq: int
    object_id: str
    case_id: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    geometry: SliceGeometry | None
    parse_error: str
    received_at: str


@dataclass(frozen=True)
class SuitabilityRecord:
    """One recorded result of the suitability check of a study."""

    case_id: str
    study_uid: str
    checked_at: str
    passed: bool
    thresholds: dict[str, Any]
    findings: tuple[str, ...]
    instance_count: int
    last_seq: int


@dataclass(frozen=True)
class StudySummary:
    """A received study within one case."""

    case_id: str
    study_uid: str
    instance_count: int  # distinct SOP Instance UIDs
    series_count: int
    first_received_at: str
    last_received_at: str
    last_seq: int
    latest: SuitabilityRecord | None

    @property
    def result_current(self) -> bool:
        """Whether the latest check saw every instance received so far."""
        return self.latest is not None and self.latest.last_seq >= self.last_seq


def geometry_to_json(g: SliceGeometry) -> str:
    return json.dumps(asdict(g), sort_keys=True)


def geometry_from_json(text: str) -> SliceGeometry | None:
    data = json.loads(text or "{}")
    if not data:
        return None

    def tup(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    return SliceGeometry(
        sop_instance_uid=str(data.get("sop_instance_uid", "")),
        series_uid=str(data.get("series_uid", "")),
        position=tup(data.get("position")),
        orientation=tup(data.get("orientation")),
        pixel_spacing=tup(data.get("pixel_spacing")),
        slice_thickness=data.get("slice_thickness"),
        rows=int(data.get("rows") or 0),
        columns=int(data.get("columns") or 0),
        gantry_tilt=data.get("gantry_tilt"),
        instance_number=data.get("instance_number"),
    )


class StudyStore:
    """Access to the factory tables in the node's catalog (thread-safe via the catalog)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.extend(NAMESPACE, MIGRATIONS)

    # -- instances --------------------------------------------------------
    def record_instance(
        self,
        *,
        object_id: str,
        case_id: str,
        study_uid: str = "",
        series_uid: str = "",
        sop_instance_uid: str = "",
        geometry: SliceGeometry | None = None,
        parse_error: str = "",
    ) -> bool:
        """Record a received object for ``case_id``; False if it was already recorded."""
        with self.catalog.transaction() as db:
            cur = db.execute(
                "INSERT INTO factory_instances (object_id, case_id, study_uid,"
                " series_uid, sop_instance_uid, geometry, parse_error, received_at)"
                " VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    object_id,
                    case_id,
                    study_uid,
                    series_uid,
                    sop_instance_uid,
                    geometry_to_json(geometry) if geometry is not None else "{}",
                    parse_error,
                    utcnow(),
                ),
            )
            return cur.rowcount == 1

    def instances(self, case_id: str, study_uid: str) -> list[ReceivedInstance]:
        """The study's parsed instances, one per SOP Instance UID (the latest received)."""
        rows = self.catalog.query(
            "SELECT * FROM factory_instances WHERE case_id = ? AND study_uid = ?"
            " AND parse_error = '' ORDER BY seq",
            (case_id, study_uid),
        )
        latest: dict[str, ReceivedInstance] = {}
        for row in rows:
            inst = _instance(row)
            latest[inst.sop_instance_uid or inst.object_id] = inst
        return sorted(latest.values(), key=lambda i: i.seq)

    def instance_of(self, object_id: str) -> ReceivedInstance | None:
        """The parsed instance received as object ``object_id`` (None: not one)."""
        rows = self.catalog.query(
            "SELECT * FROM factory_instances WHERE object_id = ? AND parse_error = ''"
            " ORDER BY seq DESC LIMIT 1",
            (object_id,),
        )
        return _instance(rows[0]) if rows else None

    def unparsed(self, case_id: str = "") -> list[ReceivedInstance]:
        """Objects received as DICOM that did not parse."""
        sql = "SELECT * FROM factory_instances WHERE parse_error != ''"
        params: list[Any] = []
        if case_id:
            sql += " AND case_id = ?"
            params.append(case_id)
        return [_instance(r) for r in self.catalog.query(sql + " ORDER BY seq", params)]

    # -- studies ----------------------------------------------------------
    def list_studies(
        self, case_id: str = "", limit: int = 100, offset: int = 0
    ) -> list[StudySummary]:
        """Received studies (newest activity first), optionally of one case; ``offset``
        skips that many (a page of a listing)."""
        return self._summaries(case_id, "", limit, offset)

    def _summaries(
        self, case_id: str, study_uid: str, limit: int, offset: int = 0
    ) -> list[StudySummary]:
        sql = (
            "SELECT case_id, study_uid, COUNT(DISTINCT sop_instance_uid) AS instances,"
            " COUNT(DISTINCT series_uid) AS series, MIN(received_at) AS first,"
            " MAX(received_at) AS last, MAX(seq) AS last_seq"
            " FROM factory_instances WHERE parse_error = ''"
        )
        params: list[Any] = []
        for column, value in (("case_id", case_id), ("study_uid", study_uid)):
            if value:
                sql += f" AND {column} = ?"
                params.append(value)
        sql += " GROUP BY case_id, study_uid ORDER BY MAX(seq) DESC LIMIT ? OFFSET ?"
        params.extend((limit, max(offset, 0)))
        return [
            StudySummary(
                case_id=r["case_id"],
                study_uid=r["study_uid"],
                instance_count=int(r["instances"]),
                series_count=int(r["series"]),
                first_received_at=r["first"],
                last_received_at=r["last"],
                last_seq=int(r["last_seq"]),
                latest=self.latest_result(r["case_id"], r["study_uid"]),
            )
            for r in self.catalog.query(sql, params)
        ]

    def study(self, study_uid: str, case_id: str = "") -> StudySummary:
        """One study; ``case_id`` is needed only when the study was received for several."""
        if not study_uid:
            raise ValidationError("say which study: a Study Instance UID is required")
        cases = [
            str(r[0])
            for r in self.catalog.query(
                "SELECT DISTINCT case_id FROM factory_instances"
                " WHERE study_uid = ? AND parse_error = '' ORDER BY case_id",
                (study_uid,),
            )
        ]
        if case_id:
            cases = [c for c in cases if c == case_id]
        if not cases:
            where = f" in case {case_id!r}" if case_id else ""
            raise NotFound(f"study {study_uid} has not been received by this node{where}")
        if len(cases) > 1:
            raise ValidationError(
                f"study {study_uid} was received for cases {', '.join(cases)}; say which case"
            )
        (summary,) = self._summaries(cases[0], study_uid, 1)
        return summary

    # -- suitability results ------------------------------------------------
    def record_result(self, result: SuitabilityRecord) -> None:
        with self.catalog.transaction() as db:
            db.execute(
                "INSERT INTO factory_suitability (case_id, study_uid, checked_at, passed,"
                " thresholds, findings, instance_count, last_seq) VALUES (?,?,?,?,?,?,?,?)",
                (
                    result.case_id,
                    result.study_uid,
                    result.checked_at,
                    int(result.passed),
                    json.dumps(result.thresholds, sort_keys=True),
                    json.dumps(list(result.findings)),
                    result.instance_count,
                    result.last_seq,
                ),
            )

    def latest_result(self, case_id: str, study_uid: str) -> SuitabilityRecord | None:
        rows = self.catalog.query(
            "SELECT * FROM factory_suitability WHERE case_id = ? AND study_uid = ?"
            " ORDER BY id DESC LIMIT 1",
            (case_id, study_uid),
        )
        return _result(rows[0]) if rows else None

    def results(self, case_id: str, study_uid: str) -> list[SuitabilityRecord]:
        """Every recorded result of the study, oldest first."""
        rows = self.catalog.query(
            "SELECT * FROM factory_suitability WHERE case_id = ? AND study_uid = ? ORDER BY id",
            (case_id, study_uid),
        )
        return [_result(r) for r in rows]


def _instance(row: Row) -> ReceivedInstance:
    return ReceivedInstance(
        seq=int(row["seq"]),
        object_id=row["object_id"],
        case_id=row["case_id"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        geometry=geometry_from_json(row["geometry"]),
        parse_error=row["parse_error"],
        received_at=row["received_at"],
    )


def _result(row: Row) -> SuitabilityRecord:
    return SuitabilityRecord(
        case_id=row["case_id"],
        study_uid=row["study_uid"],
        checked_at=row["checked_at"],
        passed=bool(row["passed"]),
        thresholds=json.loads(row["thresholds"]),
        findings=tuple(json.loads(row["findings"])),
        instance_count=int(row["instance_count"]),
        last_seq=int(row["last_seq"]),
    )
