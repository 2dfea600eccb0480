"""Catalog: metadata of every object and transfer this node holds (SQLite or PostgreSQL,
through :mod:`gateway.db`).

Schema changes are numbered migrations applied in order and recorded in
``PRAGMA user_version`` (SQLite) or ``schema_versions`` (PostgreSQL); a database
newer than this code is refused.
The outbox is the set of outbound transfers in status ``queued``/``sending``:
it lives here, so queued sends survive restarts.

Statuses: outbound ``queued`` → ``sending`` → ``done`` (``sending`` falls back
to ``queued`` on failure or restart); inbound ``receiving`` → ``done``, or
``receiving`` → ``abandoned`` when the sender went quiet for longer than
``transfer.inbound_expiry_seconds`` (its spool file is then deleted; an Offer of
the same transfer starts it again from offset 0).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.db import Conn, Database, Row, SqliteDatabase, open_database
from gateway.errors import CatalogError, NotFound, ValidationError

if TYPE_CHECKING:
    from gateway.config import NodeConfig

log = logging.getLogger(__name__)

MIGRATIONS: Sequence[str] = (
    # 1: objects, transfers (both directions, outbox included), transfer history
    """
    CREATE TABLE objects (
        object_id   TEXT PRIMARY KEY,
        size        INTEGER NOT NULL,
        name        TEXT NOT NULL,
        media_type  TEXT NOT NULL,
        case_id     TEXT NOT NULL DEFAULT '',
        origin_node TEXT NOT NULL,
        labels      TEXT NOT NULL DEFAULT '{}',
        created_at  TEXT NOT NULL
    );
    CREATE INDEX objects_case ON objects(case_id);
    CREATE INDEX objects_created ON objects(created_at);
    CREATE TABLE transfers (
        transfer_id     TEXT NOT NULL,
        direction       TEXT NOT NULL CHECK (direction IN ('outbound', 'inbound')),
        object_id       TEXT NOT NULL,
        peer_node       TEXT NOT NULL,
        status          TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL DEFAULT '',
        last_error      TEXT NOT NULL DEFAULT '',
        bytes_done      INTEGER NOT NULL DEFAULT 0,
        size            INTEGER NOT NULL,
        name            TEXT NOT NULL DEFAULT '',
        case_id         TEXT NOT NULL DEFAULT '',
        header          TEXT NOT NULL DEFAULT '{}',
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        completed_at    TEXT NOT NULL DEFAULT '',
        receipt         BLOB,
        PRIMARY KEY (transfer_id, direction)
    );
    CREATE INDEX transfers_status ON transfers(direction, status, next_attempt_at);
    CREATE INDEX transfers_object ON transfers(object_id);
    CREATE INDEX transfers_peer ON transfers(peer_node, created_at);
    CREATE TABLE transfer_history (
        id          INTEGER PRIMARY KEY,
        transfer_id TEXT NOT NULL,
        direction   TEXT NOT NULL,
        time        TEXT NOT NULL,
        kind        TEXT NOT NULL,
        detail      TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX history_transfer ON transfer_history(transfer_id);
    """,
    # 2: batches (a study or other group of objects sent as one verified exchange with
    # one manifest receipt); every object keeps its own transfer row, tagged with the batch
    """
    CREATE TABLE batches (
        batch_id        TEXT NOT NULL,
        direction       TEXT NOT NULL CHECK (direction IN ('outbound', 'inbound')),
        peer_node       TEXT NOT NULL,
        case_id         TEXT NOT NULL DEFAULT '',
        kind            TEXT NOT NULL DEFAULT '',
        ref             TEXT NOT NULL DEFAULT '',
        status          TEXT NOT NULL,
        sealed          INTEGER NOT NULL DEFAULT 0,
        expected        INTEGER NOT NULL DEFAULT 0,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL DEFAULT '',
        last_error      TEXT NOT NULL DEFAULT '',
        merkle_root     TEXT NOT NULL DEFAULT '',
        created_at      TEXT NOT NULL,
        updated_at      TEXT NOT NULL,
        completed_at    TEXT NOT NULL DEFAULT '',
        receipt         BLOB,
        PRIMARY KEY (batch_id, direction)
    );
    CREATE INDEX batches_status ON batches(direction, status, next_attempt_at);
    CREATE INDEX batches_case ON batches(case_id, created_at);
    ALTER TABLE transfers ADD COLUMN batch_id TEXT NOT NULL DEFAULT '';
    ALTER TABLE transfers ADD COLUMN facts TEXT NOT NULL DEFAULT '{}';
    CREATE INDEX transfers_batch ON transfers(batch_id, direction)
    """,
    # 3: the transfer listing (console /transfers, ListTransfers) pages newest first by
    # created_at: an index on it reads one page instead of sorting the whole table
    """
    CREATE INDEX transfers_created ON transfers(created_at)
    """,
    # 4: replicas of one node share this catalog (PostgreSQL): each outbound send and
    # batch is claimed by one replica (claimed_by), which heartbeats in `replicas`; the
    # sends of a replica that stopped heartbeating are queued again for the others;
    # verified prefixes of inbound transfers copied to the shared store (transfer/shared_prefix.py)
    """
    ALTER TABLE transfers ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
    ALTER TABLE batches ADD COLUMN claimed_by TEXT NOT NULL DEFAULT '';
    CREATE TABLE replicas (
        replica_id   TEXT PRIMARY KEY,
        host         TEXT NOT NULL,
        pid          INTEGER NOT NULL,
        started_at   TEXT NOT NULL,
        heartbeat_at TEXT NOT NULL
    );
    CREATE TABLE inbound_segments (
        transfer_id TEXT NOT NULL,
        start       INTEGER NOT NULL,
        size        INTEGER NOT NULL,
        key         TEXT NOT NULL,
        PRIMARY KEY (transfer_id, start)
    )
    """,
)


DEFAULT_LEASE_SECONDS = 15.0
"""How long a replica may be silent before its claimed sends go to the others
(``[database] replica_lease_seconds``)."""


def iso_utc(when: datetime) -> str:
    """``when`` as ISO-8601 UTC with microseconds and a ``Z``: the one time format of the
    catalog, receipts and audit log (fixed width, so it sorts lexically)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> str:
    """Current time in the :func:`iso_utc` format."""
    return iso_utc(datetime.now(UTC))


@dataclass(frozen=True)
class ObjectRecord:
    object_id: str
    size: int
    name: str
    media_type: str
    case_id: str
    origin_node: str
    labels: dict[str, str]
    created_at: str


@dataclass(frozen=True)
class TransferRecord:
    transfer_id: str
    direction: str
    object_id: str
    peer_node: str
    status: str
    attempts: int
    next_attempt_at: str
    last_error: str
    bytes_done: int
    size: int
    name: str
    case_id: str
    header: dict[str, Any]
    created_at: str
    updated_at: str
    completed_at: str
    receipt: bytes | None
    batch_id: str = ""
    facts: dict[str, str] = field(default_factory=dict)  # receiver's format facts (batches)


@dataclass(frozen=True)
class BatchRecord:
    """A group of objects sent to one peer as one exchange with one manifest receipt.

    Outbound statuses: ``queued`` → ``sending`` → ``done`` (``sending`` falls back to
    ``queued`` on failure or restart; ``failed`` when refused for good). A batch is
    open while objects may still be added (``sealed`` false); it completes only when
    sealed and every object in it is covered by the verified manifest receipt.
    Inbound: ``receiving`` → ``done``."""

    batch_id: str
    direction: str
    peer_node: str
    case_id: str
    kind: str
    ref: str
    status: str
    sealed: bool
    expected: int
    attempts: int
    next_attempt_at: str
    last_error: str
    merkle_root: str
    created_at: str
    updated_at: str
    completed_at: str
    receipt: bytes | None


@dataclass(frozen=True)
class HistoryEntry:
    time: str
    kind: str
    detail: str


class Catalog:
    """Thread-safe access to the node's catalog database (SQLite file or PostgreSQL)."""

    def __init__(self, where: Path | Database) -> None:
        if isinstance(where, Database):
            self.db = where
        else:
            self.db = SqliteDatabase(Path(where), CatalogError, label="catalog")
        self.path = getattr(self.db, "path", None) or Path(self.db.where)
        #: this process among the replicas sharing the database (claims carry it)
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.db.migrate("schema", MIGRATIONS)

    @classmethod
    def open(cls, url: str, path: Path, *, pool_size: int = 8) -> Catalog:
        """The catalog ``[database] url`` names (PostgreSQL, schema ``catalog``), else the
        SQLite file ``path``."""
        return cls(
            open_database(
                url, path, CatalogError, schema="catalog", label="catalog", pool_size=pool_size
            )
        )

    @classmethod
    def for_config(cls, cfg: NodeConfig) -> Catalog:
        """The catalog of the node ``cfg`` configures (``[database]``, ``[catalog]``)."""
        return cls.open(cfg.database.url, cfg.catalog.path, pool_size=cfg.database.pool_size)

    # -- plumbing ---------------------------------------------------------
    def _tx(self, *, serialize: bool = True) -> AbstractContextManager[Conn]:
        return self.db.transaction(serialize=serialize)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self.db.query(sql, params)

    def extend(self, namespace: str, migrations: Sequence[str]) -> None:
        """Apply a role module's own numbered migrations (e.g. ``hospital_node``).

        Each namespace's version is kept in ``schema_versions``; like the core
        schema, a database newer than the code is refused.
        """
        self.db.migrate(namespace, migrations)

    def transaction(self) -> AbstractContextManager[Conn]:
        """A write transaction (serialised with every writer) for role modules' own tables.

        Catalog writes made inside it (e.g. :meth:`add_object`) join it: one commit."""
        return self.db.transaction()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Read rows (for role modules' own tables); errors become CatalogError."""
        return self.db.query(sql, params)

    @property
    def engine(self) -> str:
        return self.db.engine

    @property
    def schema_version(self) -> int:
        version = self.db.user_version()
        return version if version is not None else self.db.version("schema")

    def close(self) -> None:
        self.db.close()

    # -- objects ----------------------------------------------------------
    def add_object(
        self,
        *,
        object_id: str,
        size: int,
        name: str,
        media_type: str,
        case_id: str,
        origin_node: str,
        labels: Mapping[str, str] | None = None,
    ) -> ObjectRecord:
        """Record an object; an object with the same id (same bytes) is kept as first seen."""
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            db.execute(
                "INSERT INTO objects VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    object_id,
                    size,
                    name,
                    media_type,
                    case_id,
                    origin_node,
                    json.dumps(dict(labels or {}), sort_keys=True),
                    utcnow(),
                ),
            )
        return self.get_object(object_id)

    def find_object(self, object_id: str) -> ObjectRecord | None:
        rows = self._query("SELECT * FROM objects WHERE object_id = ?", (object_id,))
        return _object(rows[0]) if rows else None

    def get_object(self, object_id: str) -> ObjectRecord:
        found = self.find_object(object_id)
        if found is None:
            raise NotFound(f"object {object_id} is not in the catalog of this node")
        return found

    def list_objects(
        self,
        *,
        case_id: str = "",
        peer: str = "",
        since: str = "",
        until: str = "",
        limit: int = 100,
    ) -> list[ObjectRecord]:
        sql = "SELECT * FROM objects WHERE 1=1"
        params: list[Any] = []
        if case_id:
            sql += " AND case_id = ?"
            params.append(case_id)
        if peer:
            sql += (
                " AND (origin_node = ? OR object_id IN "
                "(SELECT object_id FROM transfers WHERE peer_node = ?))"
            )
            params += [peer, peer]
        sql, params = _time_filter(sql, params, "created_at", since, until)
        sql += " ORDER BY created_at DESC LIMIT ?"
        params.append(limit)
        return [_object(r) for r in self._query(sql, params)]

    # -- transfers --------------------------------------------------------
    def add_transfer(
        self,
        *,
        transfer_id: str,
        direction: str,
        obj: ObjectRecord | None = None,
        object_id: str = "",
        peer_node: str,
        status: str,
        size: int = 0,
        name: str = "",
        case_id: str = "",
        header: Mapping[str, Any] | None = None,
        batch_id: str = "",
    ) -> TransferRecord:
        now = utcnow()
        if obj is not None:
            object_id, size, name, case_id = obj.object_id, obj.size, obj.name, obj.case_id
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            db.execute(
                "INSERT INTO transfers (transfer_id, direction, object_id, peer_node,"
                " status, size, name, case_id, header, created_at, updated_at, next_attempt_at,"
                " batch_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    transfer_id,
                    direction,
                    object_id,
                    peer_node,
                    status,
                    size,
                    name,
                    case_id,
                    json.dumps(dict(header or {}), sort_keys=True),
                    now,
                    now,
                    now,
                    batch_id,
                ),
            )
            db.execute(
                "INSERT INTO transfer_history (transfer_id, direction, time, kind, detail)"
                " VALUES (?,?,?,?,?)",
                (transfer_id, direction, now, status, f"batch {batch_id}" if batch_id else ""),
            )
        return self.get_transfer(transfer_id, direction)

    def find_transfer(self, transfer_id: str, direction: str) -> TransferRecord | None:
        rows = self._query(
            "SELECT * FROM transfers WHERE transfer_id = ? AND direction = ?",
            (transfer_id, direction),
        )
        return self._manifests([_transfer(rows[0])])[0] if rows else None

    def get_transfer(self, transfer_id: str, direction: str) -> TransferRecord:
        found = self.find_transfer(transfer_id, direction)
        if found is None:
            raise NotFound(f"{direction} transfer {transfer_id} is not in the catalog")
        return found

    def update_transfer(
        self,
        transfer_id: str,
        direction: str,
        *,
        history: tuple[str, str] | None = None,
        **fields: Any,
    ) -> None:
        """Update columns of one transfer; optionally append a history entry (kind, detail)."""
        allowed = {
            "status",
            "attempts",
            "next_attempt_at",
            "last_error",
            "bytes_done",
            "completed_at",
            "receipt",
            "facts",
        }
        bad = set(fields) - allowed
        if bad:
            raise CatalogError(f"cannot update transfer column(s) {sorted(bad)}")
        if "facts" in fields:
            fields["facts"] = json.dumps(dict(fields["facts"]), sort_keys=True)
        now = utcnow()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            cur = db.execute(
                f"UPDATE transfers SET {sets}{', ' if sets else ''}updated_at = ?"
                " WHERE transfer_id = ? AND direction = ?",
                (*fields.values(), now, transfer_id, direction),
            )
            if cur.rowcount != 1:
                raise NotFound(f"{direction} transfer {transfer_id} is not in the catalog")
            if history is not None:
                db.execute(
                    "INSERT INTO transfer_history (transfer_id, direction, time, kind, detail)"
                    " VALUES (?,?,?,?,?)",
                    (transfer_id, direction, now, history[0], history[1]),
                )

    def delivered_by(self, object_id: str, peer_node: str) -> bool:
        """Whether ``peer_node`` delivered ``object_id`` here before (a done inbound transfer)."""
        rows = self._query(
            "SELECT 1 FROM transfers WHERE direction = 'inbound' AND object_id = ?"
            " AND peer_node = ? AND status = 'done' LIMIT 1",
            (object_id, peer_node),
        )
        return bool(rows)

    def open_inbound(self, peer_node: str = "") -> list[TransferRecord]:
        """Inbound transfers still ``receiving`` (of one peer, or of all peers)."""
        sql = "SELECT * FROM transfers WHERE direction = 'inbound' AND status = 'receiving'"
        params: list[Any] = []
        if peer_node:
            sql += " AND peer_node = ?"
            params.append(peer_node)
        return [_transfer(r) for r in self._query(sql + " ORDER BY updated_at", params)]

    def stale_inbound(self, before: str, limit: int = 1000) -> list[TransferRecord]:
        """Inbound transfers ``receiving`` that were last touched before ``before`` (ISO UTC)."""
        rows = self._query(
            "SELECT * FROM transfers WHERE direction = 'inbound' AND status = 'receiving'"
            " AND updated_at < ? ORDER BY updated_at LIMIT ?",
            (before, limit),
        )
        return [_transfer(r) for r in rows]

    def claim_due_outbound(self, now: str, limit: int, exclude: set[str]) -> list[TransferRecord]:
        """Queued outbound transfers whose retry time has come, marked ``sending`` and
        claimed by this replica. On PostgreSQL the rows are locked ``FOR UPDATE SKIP
        LOCKED`` (not the database-wide writer lock): replicas claiming at once each get
        other rows, and a row is sent by exactly one of them."""
        with self.db.transaction(serialize=False) as db:
            rows = list(
                db.execute(
                    "SELECT * FROM transfers WHERE direction = 'outbound' AND status = 'queued'"
                    " AND batch_id = '' AND next_attempt_at <= ?"
                    " ORDER BY next_attempt_at, created_at LIMIT ?" + self.db.skip_locked,
                    (now, limit + len(exclude)),
                )
            )
            picked = [r for r in rows if r["transfer_id"] not in exclude][:limit]
            for row in picked:
                db.execute(
                    "UPDATE transfers SET status = 'sending', claimed_by = ?, updated_at = ?"
                    " WHERE transfer_id = ? AND direction = 'outbound'",
                    (self.replica_id, utcnow(), row["transfer_id"]),
                )
        return [_transfer(r) for r in picked]

    def requeue_interrupted(self, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> int:
        """At start-up: outbound sends and batches left ``sending`` by a stop go back to
        ``queued``. SQLite has one process, so all of them; on a shared database only
        those of replicas no longer alive (see :meth:`take_over_stale`)."""
        if self.db.engine == "sqlite":
            return self._requeue("status = 'sending'", ())
        return self.take_over_stale(lease_seconds)

    def _requeue(self, where: str, params: Sequence[Any]) -> int:
        with self._tx() as db:
            now = utcnow()
            cur = db.execute(
                "UPDATE transfers SET status = 'queued', claimed_by = '', updated_at = ?"
                f" WHERE direction = 'outbound' AND {where}",
                (now, *params),
            )
            batches = db.execute(
                "UPDATE batches SET status = 'queued', claimed_by = '', updated_at = ?"
                f" WHERE direction = 'outbound' AND {where}",
                (now, *params),
            )
            return int(cur.rowcount) + int(batches.rowcount)

    # -- replicas of one node sharing this database ------------------------
    def heartbeat(self) -> None:
        """Say this replica is alive (registers it on first call)."""
        now = utcnow()
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            db.execute(
                "INSERT INTO replicas VALUES (?, ?, ?, ?, ?) ON CONFLICT(replica_id)"
                " DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (self.replica_id, socket.gethostname(), os.getpid(), now, now),
            )

    def take_over_stale(self, lease_seconds: float) -> int:
        """Queue again the sends claimed by replicas silent for ``lease_seconds`` (killed,
        or cut off from the database) and forget those replicas; returns how many sends.
        A send claimed by no registered replica (a stop before this version) counts too."""
        cutoff = iso_utc(datetime.now(UTC) - timedelta(seconds=lease_seconds))
        with self._tx() as db:
            db.execute(
                "DELETE FROM replicas WHERE heartbeat_at < ? AND replica_id <> ?",
                (cutoff, self.replica_id),
            )
            count = self._requeue(
                "status = 'sending' AND claimed_by NOT IN (SELECT replica_id FROM replicas)",
                (),
            )
        if count:
            log.warning(
                "catalog: %d send(s) of replicas silent for %.0f s queued again", count,
                lease_seconds,
            )  # fmt: skip
        return count

    def retire(self) -> int:
        """At a clean stop: this replica's sends go back to the queue for the others, and
        it leaves the replica table."""
        with self._tx() as db:
            count = self._requeue("status = 'sending' AND claimed_by = ?", (self.replica_id,))
            db.execute("DELETE FROM replicas WHERE replica_id = ?", (self.replica_id,))
        return count

    # -- verified prefixes of inbound transfers in the shared store -----------
    def add_segment(self, transfer_id: str, start: int, size: int, key: str) -> None:
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            db.execute(
                "INSERT INTO inbound_segments VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (transfer_id, start, size, key),
            )

    def segments(self, transfer_id: str) -> list[tuple[int, int, str]]:
        """(start, size, store key) of a transfer's shared segments, in order."""
        return [
            (int(r[0]), int(r[1]), str(r[2]))
            for r in self._query(
                "SELECT start, size, key FROM inbound_segments WHERE transfer_id = ?"
                " ORDER BY start",
                (transfer_id,),
            )
        ]

    def drop_segments(self, transfer_id: str) -> None:
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            db.execute("DELETE FROM inbound_segments WHERE transfer_id = ?", (transfer_id,))

    def replicas(self) -> list[tuple[str, str, int, str, str]]:
        """(replica id, host, pid, started, last heartbeat) of the registered replicas."""
        return [
            (r[0], r[1], int(r[2]), r[3], r[4])
            for r in self._query(
                "SELECT replica_id, host, pid, started_at, heartbeat_at FROM replicas"
                " ORDER BY started_at"
            )
        ]

    def next_due_time(self) -> str | None:
        rows = self._query(
            "SELECT MIN(t) FROM (SELECT MIN(next_attempt_at) AS t FROM transfers"
            " WHERE direction = 'outbound' AND status = 'queued' AND batch_id = ''"
            " UNION ALL SELECT MIN(next_attempt_at) FROM batches"
            " WHERE direction = 'outbound' AND status = 'queued') AS due"
        )
        value = rows[0][0] if rows else None
        return str(value) if value else None

    def list_transfers(
        self,
        *,
        case_id: str = "",
        peer: str = "",
        status: str = "",
        direction: str = "",
        object_id: str = "",
        since: str = "",
        until: str = "",
        limit: int = 100,
    ) -> list[TransferRecord]:
        equal = {"case_id": case_id, "peer_node": peer, "status": status}
        equal |= {"direction": direction, "object_id": object_id}
        sql, params = _listing("transfers", equal, since, until, limit)
        return self._manifests([_transfer(r) for r in self._query(sql, params)])

    def _manifests(self, records: list[TransferRecord]) -> list[TransferRecord]:
        """A done object of a batch shows its batch's signed manifest receipt as its receipt
        (kept once, on the batch row, not copied onto every object's row)."""
        batch_ids = {
            (t.batch_id, t.direction) for t in records if t.batch_id and t.status == "done"
        }
        if not batch_ids:
            return records
        receipts: dict[tuple[str, str], bytes | None] = {}
        for batch_id, direction in batch_ids:
            rows = self._query(
                "SELECT receipt FROM batches WHERE batch_id = ? AND direction = ?"
                " AND status = 'done'",
                (batch_id, direction),
            )
            receipts[(batch_id, direction)] = rows[0][0] if rows else None
        return [
            dataclasses.replace(t, receipt=receipts[(t.batch_id, t.direction)])
            if t.batch_id and t.status == "done" and t.receipt is None
            else t
            for t in records
        ]

    # -- batches ----------------------------------------------------------
    def add_batch(
        self,
        *,
        batch_id: str,
        direction: str,
        peer_node: str,
        status: str,
        case_id: str = "",
        kind: str = "",
        ref: str = "",
        expected: int = 0,
        sealed: bool = False,
    ) -> BatchRecord:
        """Record a batch (kept as first recorded if it exists)."""
        now = utcnow()
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            db.execute(
                "INSERT INTO batches (batch_id, direction, peer_node, case_id, kind,"
                " ref, status, sealed, expected, created_at, updated_at, next_attempt_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    batch_id, direction, peer_node, case_id, kind, ref, status,
                    int(sealed), expected, now, now, now,
                ),
            )  # fmt: skip
            db.execute(
                "INSERT INTO transfer_history (transfer_id, direction, time, kind, detail)"
                " VALUES (?,?,?,?,?)",
                (batch_id, direction, now, status, "batch"),
            )
        return self.get_batch(batch_id, direction)

    def find_batch(self, batch_id: str, direction: str) -> BatchRecord | None:
        rows = self._query(
            "SELECT * FROM batches WHERE batch_id = ? AND direction = ?", (batch_id, direction)
        )
        return _batch(rows[0]) if rows else None

    def get_batch(self, batch_id: str, direction: str) -> BatchRecord:
        found = self.find_batch(batch_id, direction)
        if found is None:
            raise NotFound(f"{direction} batch {batch_id} is not in the catalog")
        return found

    def update_batch(
        self,
        batch_id: str,
        direction: str,
        *,
        history: tuple[str, str] | None = None,
        **fields: Any,
    ) -> None:
        """Update columns of one batch; optionally append a history entry (kind, detail)."""
        allowed = {
            "status", "sealed", "expected", "attempts", "next_attempt_at", "last_error",
            "merkle_root", "completed_at", "receipt",
        }  # fmt: skip
        bad = set(fields) - allowed
        if bad:
            raise CatalogError(f"cannot update batch column(s) {sorted(bad)}")
        now = utcnow()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx(serialize=False) as db:  # keyed row writes: row locks suffice
            cur = db.execute(
                f"UPDATE batches SET {sets}{', ' if sets else ''}updated_at = ?"
                " WHERE batch_id = ? AND direction = ?",
                (*fields.values(), now, batch_id, direction),
            )
            if cur.rowcount != 1:
                raise NotFound(f"{direction} batch {batch_id} is not in the catalog")
            if history is not None:
                db.execute(
                    "INSERT INTO transfer_history (transfer_id, direction, time, kind, detail)"
                    " VALUES (?,?,?,?,?)",
                    (batch_id, direction, now, history[0], history[1]),
                )

    def batch_transfers(self, batch_id: str, direction: str) -> list[TransferRecord]:
        """The transfers of one batch, in the order they were added."""
        rows = self._query(
            "SELECT * FROM transfers WHERE batch_id = ? AND direction = ? ORDER BY rowid",
            (batch_id, direction),
        )
        return self._manifests([_transfer(r) for r in rows])

    def claim_due_batch(self, now: str, exclude: set[str]) -> BatchRecord | None:
        """One queued outbound batch whose retry time has come, marked ``sending`` and
        claimed by this replica (row-locked like :meth:`claim_due_outbound`)."""
        with self.db.transaction(serialize=False) as db:
            rows = list(
                db.execute(
                    "SELECT * FROM batches WHERE direction = 'outbound' AND status = 'queued'"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at, created_at LIMIT ?"
                    + self.db.skip_locked,
                    (now, 1 + len(exclude)),
                )
            )
            picked = [r for r in rows if r["batch_id"] not in exclude][:1]
            for row in picked:
                db.execute(
                    "UPDATE batches SET status = 'sending', claimed_by = ?, updated_at = ?"
                    " WHERE batch_id = ? AND direction = 'outbound'",
                    (self.replica_id, utcnow(), row["batch_id"]),
                )
        return _batch(picked[0]) if picked else None

    def list_batches(
        self,
        *,
        case_id: str = "",
        peer: str = "",
        status: str = "",
        direction: str = "",
        since: str = "",
        until: str = "",
        limit: int = 100,
    ) -> list[BatchRecord]:
        equal = {"case_id": case_id, "peer_node": peer, "status": status, "direction": direction}
        sql, params = _listing("batches", equal, since, until, limit)
        return [_batch(r) for r in self._query(sql, params)]

    def batch_counts(self, batch_id: str, direction: str) -> dict[str, int]:
        """How many of a batch's transfers are in each status."""
        rows = self._query(
            "SELECT status, COUNT(*) FROM transfers WHERE batch_id = ? AND direction = ?"
            " GROUP BY status",
            (batch_id, direction),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def history(self, transfer_id: str, direction: str) -> list[HistoryEntry]:
        rows = self._query(
            "SELECT time, kind, detail FROM transfer_history"
            " WHERE transfer_id = ? AND direction = ? ORDER BY id",
            (transfer_id, direction),
        )
        return [HistoryEntry(r["time"], r["kind"], r["detail"]) for r in rows]


def _listing(
    table: str, equal: dict[str, str], since: str, until: str, limit: int
) -> tuple[str, list[Any]]:
    """A listing query of ``table``: the given columns equal to their non-empty values,
    ``created_at`` in [since, until), newest first, at most ``limit`` rows. Column and
    table names come from this module only, never from a caller's input."""
    sql = f"SELECT * FROM {table} WHERE 1=1"
    params: list[Any] = []
    for column, value in equal.items():
        if value:
            sql += f" AND {column} = ?"
            params.append(value)
    sql, params = _time_filter(sql, params, "created_at", since, until)
    sql += " ORDER BY created_at DESC LIMIT ?"
    params.append(limit)
    return sql, params


def _time_filter(
    sql: str, params: list[Any], column: str, since: str, until: str
) -> tuple[str, list[Any]]:
    if since:
        sql += f" AND {column} >= ?"
        params.append(_normalise_time(since))
    if until:
        sql += f" AND {column} < ?"
        params.append(_normalise_time(until))
    return sql, params


def _normalise_time(value: str) -> str:
    """Accept ISO dates/times (naive = UTC) and return the catalog's UTC form."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValidationError(
            f"time {value!r} is not ISO-8601 (e.g. 2026-11-22 or 2026-11-22T08:00:00Z)"
        ) from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return iso_utc(parsed)


def _object(row: Row) -> ObjectRecord:
    return ObjectRecord(
        object_id=row["object_id"],
        size=row["size"],
        name=row["name"],
        media_type=row["media_type"],
        case_id=row["case_id"],
        origin_node=row["origin_node"],
        labels=json.loads(row["labels"]),
        created_at=row["created_at"],
    )


def _transfer(row: Row) -> TransferRecord:
    return TransferRecord(
        transfer_id=row["transfer_id"],
        direction=row["direction"],
        object_id=row["object_id"],
        peer_node=row["peer_node"],
        status=row["status"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        bytes_done=row["bytes_done"],
        size=row["size"],
        name=row["name"],
        case_id=row["case_id"],
        header=json.loads(row["header"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        receipt=row["receipt"],
        batch_id=row["batch_id"],
        facts=json.loads(row["facts"]),
    )


def _batch(row: Row) -> BatchRecord:
    return BatchRecord(
        batch_id=row["batch_id"],
        direction=row["direction"],
        peer_node=row["peer_node"],
        case_id=row["case_id"],
        kind=row["kind"],
        ref=row["ref"],
        status=row["status"],
        sealed=bool(row["sealed"]),
        expected=row["expected"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        merkle_root=row["merkle_root"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        completed_at=row["completed_at"],
        receipt=row["receipt"],
    )
