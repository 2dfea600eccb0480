"""Tables of the release: signed confirmations and what happened to each instance.

Namespace ``hospital_release`` of the node's catalog (:meth:`Catalog.extend`):

- ``hospital_confirmations``: one row per confirmation (study, case, destination;
  unique together), who confirmed it (label, certificate serial and fingerprint), the
  canonical record and the node's signature over it.
- ``hospital_releases``: one row per instance and confirmation: the source object,
  the original SOP Instance UID (local only: never on anything that leaves), the
  status (``pending`` while the release de-identifies it, then ``released`` | ``held``
  | ``refused`` | ``failed``) with its reason, the
  de-identified object, its new SOP Instance UID, geometry and pixel hashes (compared
  with the receiver's receipt facts) and the outbound transfer.
- ``hospital_auto_forward``: when each auto-forward rule was first seen, so turning
  a rule on never releases studies that became complete before it.
- ``hospital_release_progress``: per confirmation released by the pipelined release,
  its state (``releasing`` → ``sealed`` once its outbox batch is sealed → ``done`` once
  ``case.confirmation`` is audited) and the outbox batch its instances go into. A
  confirmation without a row (made before it existed) is done.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.catalog import Catalog, utcnow
from gateway.db import Row

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hospital_confirmations (
        confirmation_id  TEXT PRIMARY KEY,
        study_uid        TEXT NOT NULL,
        case_id          TEXT NOT NULL,
        destination      TEXT NOT NULL,
        actor            TEXT NOT NULL,
        cert_serial      TEXT NOT NULL,
        cert_fingerprint TEXT NOT NULL,
        auto             INTEGER NOT NULL,
        allow_burned_in  INTEGER NOT NULL,
        record           TEXT NOT NULL,
        signature        BLOB NOT NULL,
        created_at       TEXT NOT NULL,
        UNIQUE (study_uid, case_id, destination)
    );
    CREATE INDEX hospital_confirmations_study ON hospital_confirmations(study_uid);
    CREATE TABLE hospital_releases (
        confirmation_id       TEXT NOT NULL,
        source_object_id      TEXT NOT NULL,
        sop_instance_uid      TEXT NOT NULL,
        series_uid            TEXT NOT NULL,
        instance_number       INTEGER,
        status                TEXT NOT NULL,
        reason                TEXT NOT NULL DEFAULT '',
        deid_object_id        TEXT NOT NULL DEFAULT '',
        deid_sop_instance_uid TEXT NOT NULL DEFAULT '',
        geometry_sha256       TEXT NOT NULL DEFAULT '',
        pixel_sha256          TEXT NOT NULL DEFAULT '',
        transfer_id           TEXT NOT NULL DEFAULT '',
        created_at            TEXT NOT NULL,
        PRIMARY KEY (confirmation_id, source_object_id)
    );
    CREATE INDEX hospital_releases_deid ON hospital_releases(deid_object_id);
    CREATE TABLE hospital_auto_forward (
        called_ae   TEXT NOT NULL,
        destination TEXT NOT NULL,
        since       TEXT NOT NULL,
        PRIMARY KEY (called_ae, destination)
    )
    """,
    # 2: where a pipelined release stands (releasing -> done), and its outbox batch
    """
    CREATE TABLE hospital_release_progress (
        confirmation_id TEXT PRIMARY KEY,
        state           TEXT NOT NULL CHECK (state IN ('releasing', 'sealed', 'done')),
        batch_id        TEXT NOT NULL DEFAULT '',
        updated_at      TEXT NOT NULL
    )
    """,
    # 3: replicas sharing a PostgreSQL catalog — which replica works on
    # an unfinished release, so that a replica starting (or finding one whose owner went
    # silent) takes only releases nobody alive is working on
    """
    CREATE TABLE hospital_release_owner (
        confirmation_id TEXT PRIMARY KEY,
        replica_id      TEXT NOT NULL,
        claimed_at      TEXT NOT NULL
    )
    """,
)
PENDING = "pending"
"""Status of an instance row recorded with its confirmation, not yet de-identified."""


@dataclass(frozen=True)
class Confirmation:
    confirmation_id: str
    study_uid: str
    case_id: str
    destination: str
    actor: str
    cert_serial: str
    cert_fingerprint: str
    auto: bool
    allow_burned_in: bool
    record: str
    signature: bytes
    created_at: str


@dataclass(frozen=True)
class InstanceRelease:
    source_object_id: str
    sop_instance_uid: str
    series_uid: str
    instance_number: int | None
    status: str
    reason: str = ""
    deid_object_id: str = ""
    deid_sop_instance_uid: str = ""
    geometry_sha256: str = ""
    pixel_sha256: str = ""
    transfer_id: str = ""
    confirmation_id: str = ""
    created_at: str = ""

    def replace(self, **changes: object) -> InstanceRelease:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ReleasedFacts:
    """What this node sent for a de-identified object (checked against receipts)."""

    object_id: str
    case_id: str
    sop_instance_uid: str
    geometry_sha256: str
    pixel_sha256: str
    destinations: frozenset[str]


@dataclass(frozen=True)
class ReleaseView:
    """One instance's release under one confirmation, with its transfer's state."""

    release: InstanceRelease
    destination: str
    transfer_status: str
    transfer_error: str


@dataclass(frozen=True)
class StudyView:
    """A study as the Hospital service shows it."""

    summary: Any  # hospital_node.studies.StudySummary
    confirmations: list[Confirmation]
    instances: list[Any]  # hospital_node.studies.InstanceRecord
    releases: dict[str, list[ReleaseView]]  # by source object id
    listing: StudyListing | None = None  # identity (if the caller may see it) and cases


@dataclass(frozen=True)
class StudyCase:
    """A case a study was confirmed for, as the hospital's clinicians see it."""

    case_id: str
    pseudonym: str  # the vault's pseudonym of the case ("" if none)
    destination: str
    confirmation_id: str
    deid_study_uid: str


@dataclass(frozen=True)
class StudyListing:
    """A study with whom it is of: ``identity`` is None unless the caller may see it
    (``withheld``), or when none was kept for the study."""

    summary: Any  # hospital_node.studies.StudySummary
    identity: Any  # hospital_node.study_identity.StudyIdentity | None
    withheld: bool
    modalities: tuple[str, ...]
    cases: tuple[StudyCase, ...]


_CONFIRMATION_COLS = ", ".join(f.name for f in dataclasses.fields(Confirmation))
_RELEASE_COLS = ", ".join(f.name for f in dataclasses.fields(InstanceRelease))


def _confirmation(row: Row) -> Confirmation:
    values = dict(row)
    values["auto"] = bool(values["auto"])
    values["allow_burned_in"] = bool(values["allow_burned_in"])
    values["signature"] = bytes(values["signature"])
    return Confirmation(**values)


def _release(row: Row) -> InstanceRelease:
    return InstanceRelease(**dict(row))


class ReleaseStore:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.extend("hospital_release", MIGRATIONS)

    def add(
        self, c: Confirmation, rows: Sequence[InstanceRelease], *, releasing: bool = False
    ) -> None:
        """Store a confirmation and its instance rows in one transaction (``releasing``:
        with a progress row, the instances still ``pending``; on a shared database the
        release is owned by this replica from the same transaction on)."""
        now = utcnow()
        with self.catalog.transaction() as db:
            if releasing and self.shared:
                db.execute(
                    "INSERT INTO hospital_release_owner VALUES (?, ?, ?)",
                    (c.confirmation_id, self.catalog.replica_id, now),
                )
            if releasing:
                db.execute(
                    "INSERT INTO hospital_release_progress VALUES (?, 'releasing', '', ?)",
                    (c.confirmation_id, now),
                )
            db.execute(
                f"INSERT INTO hospital_confirmations ({_CONFIRMATION_COLS})"
                f" VALUES ({', '.join('?' * 12)})",
                dataclasses.astuple(c),
            )
            for r in rows:
                r = r.replace(confirmation_id=c.confirmation_id, created_at=now)
                db.execute(
                    f"INSERT INTO hospital_releases ({_RELEASE_COLS})"
                    f" VALUES ({', '.join('?' * 13)})",
                    dataclasses.astuple(r),
                )

    def find_confirmation(
        self, study_uid: str, case_id: str, destination: str
    ) -> Confirmation | None:
        rows = self.catalog.query(
            f"SELECT {_CONFIRMATION_COLS} FROM hospital_confirmations"
            " WHERE study_uid = ? AND case_id = ? AND destination = ?",
            (study_uid, case_id, destination),
        )
        return _confirmation(rows[0]) if rows else None

    def confirmations(self, study_uid: str) -> list[Confirmation]:
        rows = self.catalog.query(
            f"SELECT {_CONFIRMATION_COLS} FROM hospital_confirmations WHERE study_uid = ?"
            " ORDER BY created_at",
            (study_uid,),
        )
        return [_confirmation(r) for r in rows]

    def confirmations_for_case(self, case_id: str, destination: str) -> list[Confirmation]:
        """The confirmations of a case to one manufacturer, oldest first."""
        rows = self.catalog.query(
            f"SELECT {_CONFIRMATION_COLS} FROM hospital_confirmations"
            " WHERE case_id = ? AND destination = ? ORDER BY created_at, confirmation_id",
            (case_id, destination),
        )
        return [_confirmation(r) for r in rows]

    def study_uids_for_case(self, case_id: str) -> list[str]:
        """The studies confirmed for a case (any destination), for the outbound scan."""
        rows = self.catalog.query(
            "SELECT DISTINCT study_uid FROM hospital_confirmations WHERE case_id = ?"
            " ORDER BY study_uid",
            (case_id,),
        )
        return [str(r[0]) for r in rows]

    def has_confirmation(self, study_uid: str) -> bool:
        return bool(
            self.catalog.query(
                "SELECT 1 FROM hospital_confirmations WHERE study_uid = ? LIMIT 1", (study_uid,)
            )
        )

    def releases(self, confirmation_id: str) -> list[InstanceRelease]:
        rows = self.catalog.query(
            f"SELECT {_RELEASE_COLS} FROM hospital_releases WHERE confirmation_id = ?"
            " ORDER BY series_uid, instance_number NULLS FIRST, sop_instance_uid",
            (confirmation_id,),
        )
        return [_release(r) for r in rows]

    def unfinished(self) -> list[Confirmation]:
        """Confirmations with an instance not yet de-identified, a released instance that
        was never queued, or a pipelined release not marked done; oldest first."""
        rows = self.catalog.query(
            f"SELECT {_CONFIRMATION_COLS} FROM hospital_confirmations WHERE confirmation_id IN"
            " (SELECT confirmation_id FROM hospital_releases"
            "  WHERE (status = 'released' AND transfer_id = '') OR status = 'pending'"
            "  UNION SELECT confirmation_id FROM hospital_release_progress WHERE state != 'done')"
            " ORDER BY created_at, confirmation_id"
        )
        return [_confirmation(r) for r in rows]

    @property
    def shared(self) -> bool:
        """Replicas may share this catalog (PostgreSQL): releases have owners."""
        return self.catalog.engine != "sqlite"

    def claim(self, confirmation_id: str) -> bool:
        """Make this replica the owner of an unfinished release unless a live replica
        (one in the catalog's ``replicas`` table) owns it; True when this replica may work
        on it. Always True on SQLite (one process)."""
        if not self.shared:
            return True
        me = self.catalog.replica_id
        with self.catalog.transaction() as db:
            row = db.execute(
                "SELECT o.replica_id, r.replica_id FROM hospital_release_owner o"
                " LEFT JOIN replicas r ON r.replica_id = o.replica_id"
                " WHERE o.confirmation_id = ?",
                (confirmation_id,),
            ).fetchone()
            if row is not None and (row[0] == me or row[1] is not None):
                return bool(row[0] == me)
            db.execute(
                "INSERT INTO hospital_release_owner VALUES (?, ?, ?) ON CONFLICT(confirmation_id)"
                " DO UPDATE SET replica_id = excluded.replica_id, claimed_at = excluded.claimed_at",
                (confirmation_id, me, utcnow()),
            )
        return True

    def release_owner(self, confirmation_id: str) -> None:
        """The release is done: nobody owns it any more."""
        if self.shared:
            with self.catalog.transaction() as db:
                db.execute(
                    "DELETE FROM hospital_release_owner WHERE confirmation_id = ?",
                    (confirmation_id,),
                )

    def progress(self, confirmation_id: str) -> tuple[str, str]:
        """(state, outbox batch id) of a confirmation's release; ("done", "") if untracked."""
        rows = self.catalog.query(
            "SELECT state, batch_id FROM hospital_release_progress WHERE confirmation_id = ?",
            (confirmation_id,),
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else ("done", "")

    def set_progress(self, confirmation_id: str, *, state: str = "", batch_id: str = "") -> None:
        with self.catalog.transaction() as db:
            if state:
                db.execute(
                    "UPDATE hospital_release_progress SET state = ?, updated_at = ?"
                    " WHERE confirmation_id = ?",
                    (state, utcnow(), confirmation_id),
                )
            if batch_id:
                db.execute(
                    "UPDATE hospital_release_progress SET batch_id = ?, updated_at = ?"
                    " WHERE confirmation_id = ?",
                    (batch_id, utcnow(), confirmation_id),
                )

    def update_release(self, confirmation_id: str, r: InstanceRelease) -> None:
        """Record what became of a ``pending`` instance (status, reason, output facts)."""
        with self.catalog.transaction() as db:
            db.execute(
                "UPDATE hospital_releases SET status = ?, reason = ?, deid_object_id = ?,"
                " deid_sop_instance_uid = ?, geometry_sha256 = ?, pixel_sha256 = ?"
                " WHERE confirmation_id = ? AND source_object_id = ?",
                (
                    r.status, r.reason[:2000], r.deid_object_id, r.deid_sop_instance_uid,
                    r.geometry_sha256, r.pixel_sha256, confirmation_id, r.source_object_id,
                ),
            )  # fmt: skip

    def set_transfer(self, confirmation_id: str, source_object_id: str, transfer_id: str) -> None:
        with self.catalog.transaction() as db:
            db.execute(
                "UPDATE hospital_releases SET transfer_id = ?"
                " WHERE confirmation_id = ? AND source_object_id = ?",
                (transfer_id, confirmation_id, source_object_id),
            )

    def set_status(
        self, confirmation_id: str, source_object_id: str, status: str, reason: str
    ) -> None:
        with self.catalog.transaction() as db:
            db.execute(
                "UPDATE hospital_releases SET status = ?, reason = ?"
                " WHERE confirmation_id = ? AND source_object_id = ?",
                (status, reason[:2000], confirmation_id, source_object_id),
            )

    def released_facts(self, object_id: str) -> ReleasedFacts | None:
        """What was released as de-identified object ``object_id``, or None."""
        rows = self.catalog.query(
            "SELECT r.deid_sop_instance_uid, r.geometry_sha256, r.pixel_sha256, c.case_id,"
            " c.destination FROM hospital_releases r JOIN hospital_confirmations c"
            " ON r.confirmation_id = c.confirmation_id"
            " WHERE r.deid_object_id = ? AND r.status = 'released'",
            (object_id,),
        )
        if not rows:
            return None
        first = rows[0]
        return ReleasedFacts(
            object_id=object_id,
            case_id=first["case_id"],
            sop_instance_uid=first["deid_sop_instance_uid"],
            geometry_sha256=first["geometry_sha256"],
            pixel_sha256=first["pixel_sha256"],
            destinations=frozenset(r["destination"] for r in rows),
        )

    def auto_forward_since(self, called_ae: str, destination: str) -> str:
        """When the rule (called AE → destination) was first seen; recorded now if new."""
        with self.catalog.transaction() as db:
            db.execute(
                "INSERT INTO hospital_auto_forward VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (called_ae, destination, utcnow()),
            )
            row = db.execute(
                "SELECT since FROM hospital_auto_forward WHERE called_ae = ? AND destination = ?",
                (called_ae, destination),
            ).fetchone()
        return str(row[0])
