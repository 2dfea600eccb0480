"""Case tables in the node's catalog (namespace ``cases``).

- ``case_cases``: one row per case: its two nodes, when and by whom it was opened.
- ``case_records``: the chain: (case_id, seq) → canonical envelope bytes and their
  SHA-256. Only :meth:`CaseStore.append` writes it, and only at the next seq.
- ``case_pending``: verified envelopes from the peer that arrived before an earlier
  record of their case (transfers may overtake each other); applied when the gap closes.
- ``case_rejected``: envelopes that are not (or no longer) in the chain, with why:
  refused from the peer, or displaced by a concurrent record of the hospital.
- ``case_identifiers``: batch/serial numbers and UDIs, unique across this node's cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.cases.records import ChainError
from gateway.cases.workflow import Parties
from gateway.catalog import Catalog, utcnow
from gateway.db import Row
from gateway.errors import CatalogError

if TYPE_CHECKING:
    from gateway.cases.chain import Verified

MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE case_cases (
        case_id      TEXT PRIMARY KEY,
        hospital     TEXT NOT NULL,
        manufacturer TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        created_by   TEXT NOT NULL
    );
    CREATE TABLE case_records (
        case_id       TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        record_type   TEXT NOT NULL,
        author        TEXT NOT NULL,
        node_id       TEXT NOT NULL,
        record_time   TEXT NOT NULL,
        envelope_hash TEXT NOT NULL UNIQUE,
        envelope      BLOB NOT NULL,
        origin        TEXT NOT NULL CHECK (origin IN ('local', 'remote')),
        stored_at     TEXT NOT NULL,
        PRIMARY KEY (case_id, seq)
    );
    CREATE TABLE case_pending (
        envelope_hash TEXT PRIMARY KEY,
        case_id       TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        envelope      BLOB NOT NULL,
        received_at   TEXT NOT NULL
    );
    CREATE INDEX case_pending_case ON case_pending(case_id, seq);
    CREATE TABLE case_rejected (
        envelope_hash TEXT PRIMARY KEY,
        case_id       TEXT NOT NULL,
        seq           INTEGER NOT NULL,
        kind          TEXT NOT NULL CHECK (kind IN ('refused', 'displaced')),
        reason        TEXT NOT NULL,
        envelope      BLOB NOT NULL,
        at            TEXT NOT NULL
    );
    CREATE INDEX case_rejected_case ON case_rejected(case_id, seq);
    CREATE TABLE case_identifiers (
        kind    TEXT NOT NULL,
        value   TEXT NOT NULL,
        case_id TEXT NOT NULL,
        seq     INTEGER NOT NULL,
        PRIMARY KEY (kind, value)
    );
    """,
)


@dataclass(frozen=True)
class CaseRow:
    case_id: str
    hospital: str
    manufacturer: str
    created_at: str
    created_by: str

    @property
    def parties(self) -> Parties:
        return Parties(self.case_id, self.hospital, self.manufacturer)


@dataclass(frozen=True)
class StoredRecord:
    case_id: str
    seq: int
    envelope_hash: str
    envelope: bytes
    origin: str
    stored_at: str


class CaseStore:
    """The case tables of one node's catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        catalog.extend("cases", MIGRATIONS)

    # -- cases ------------------------------------------------------------
    def add_case(self, case: CaseRow) -> bool:
        """Insert ``case``; False when a case with that id already exists."""
        with self.catalog.transaction() as db:
            cur = db.execute(
                "INSERT INTO case_cases VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (case.case_id, case.hospital, case.manufacturer, case.created_at, case.created_by),
            )
            return cur.rowcount == 1

    def find_case(self, case_id: str) -> CaseRow | None:
        rows = self.catalog.query("SELECT * FROM case_cases WHERE case_id = ?", (case_id,))
        return _case(rows[0]) if rows else None

    def list_cases(self, limit: int) -> list[CaseRow]:
        rows = self.catalog.query(
            "SELECT * FROM case_cases ORDER BY created_at DESC LIMIT ?", (limit,)
        )
        return [_case(r) for r in rows]

    # -- the chain --------------------------------------------------------
    def records(self, case_id: str) -> list[StoredRecord]:
        rows = self.catalog.query(
            "SELECT case_id, seq, envelope_hash, envelope, origin, stored_at FROM case_records"
            " WHERE case_id = ? ORDER BY seq",
            (case_id,),
        )
        return [StoredRecord(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def find_record(self, envelope_hash: str) -> StoredRecord | None:
        rows = self.catalog.query(
            "SELECT case_id, seq, envelope_hash, envelope, origin, stored_at FROM case_records"
            " WHERE envelope_hash = ?",
            (envelope_hash,),
        )
        if not rows:
            return None
        r = rows[0]
        return StoredRecord(r[0], r[1], r[2], bytes(r[3]), r[4], r[5])

    def append(self, v: Verified, origin: str, identifiers: Sequence[tuple[str, str]]) -> None:
        """Store ``v`` at the next seq of its case, with its unique identifiers."""
        r = v.record
        with self.catalog.transaction() as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM case_records WHERE case_id = ?", (r.case_id,)
            ).fetchone()
            if count != r.seq:
                raise CatalogError(f"case {r.case_id}: record {r.seq} is not the next ({count})")
            for kind, value in identifiers:
                owner = db.execute(
                    "SELECT case_id, seq FROM case_identifiers WHERE kind = ? AND value = ?",
                    (kind, value),
                ).fetchone()
                if owner is not None:
                    raise ChainError(
                        f"case {r.case_id}: cannot record {r.type}: its {kind} is already used "
                        f"by case {owner[0]} record {owner[1]}; it must be unique"
                    )
                db.execute(
                    "INSERT INTO case_identifiers VALUES (?,?,?,?)", (kind, value, r.case_id, r.seq)
                )
            db.execute(
                "INSERT INTO case_records VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    r.case_id,
                    r.seq,
                    r.type,
                    r.author.label(),
                    v.envelope.node_id,
                    r.time,
                    v.hash,
                    v.envelope.to_bytes(),
                    origin,
                    utcnow(),
                ),
            )
            db.execute("DELETE FROM case_pending WHERE envelope_hash = ?", (v.hash,))

    def displace(self, case_id: str, from_seq: int, reason: str) -> int:
        """Move records ``from_seq``.. of ``case_id`` out of the chain; returns how many."""
        now = utcnow()
        with self.catalog.transaction() as db:
            rows = list(
                db.execute(
                    "SELECT envelope_hash, seq, envelope FROM case_records"
                    " WHERE case_id = ? AND seq >= ?",
                    (case_id, from_seq),
                )
            )
            for h, seq, env in rows:
                db.execute(
                    "INSERT INTO case_rejected VALUES (?,?,?,?,?,?,?) ON CONFLICT(envelope_hash)"
                    " DO UPDATE SET case_id = excluded.case_id, seq = excluded.seq,"
                    " kind = excluded.kind, reason = excluded.reason,"
                    " envelope = excluded.envelope, at = excluded.at",
                    (h, case_id, seq, "displaced", reason, env, now),
                )
            db.execute(
                "DELETE FROM case_records WHERE case_id = ? AND seq >= ?", (case_id, from_seq)
            )
            db.execute(
                "DELETE FROM case_identifiers WHERE case_id = ? AND seq >= ?", (case_id, from_seq)
            )
        return len(rows)

    # -- pending and rejected ---------------------------------------------
    def add_pending(self, case_id: str, seq: int, envelope_hash: str, envelope: bytes) -> None:
        with self.catalog.transaction() as db:
            db.execute(
                "INSERT INTO case_pending VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                (envelope_hash, case_id, seq, envelope, utcnow()),
            )

    def pending(self, case_id: str) -> list[tuple[int, str, bytes]]:
        rows = self.catalog.query(
            "SELECT seq, envelope_hash, envelope FROM case_pending WHERE case_id = ?"
            " ORDER BY seq, received_at",
            (case_id,),
        )
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def drop_pending(self, envelope_hash: str) -> None:
        with self.catalog.transaction() as db:
            db.execute("DELETE FROM case_pending WHERE envelope_hash = ?", (envelope_hash,))

    def add_rejected(
        self, case_id: str, seq: int, envelope_hash: str, envelope: bytes, reason: str
    ) -> None:
        with self.catalog.transaction() as db:
            db.execute(
                "INSERT INTO case_rejected VALUES (?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (envelope_hash, case_id, seq, "refused", reason[:1000], envelope, utcnow()),
            )
            db.execute("DELETE FROM case_pending WHERE envelope_hash = ?", (envelope_hash,))

    def rejected(self, case_id: str) -> list[tuple[int, str, str, str]]:
        """(seq, envelope_hash, kind, reason) of records not in the chain."""
        rows = self.catalog.query(
            "SELECT seq, envelope_hash, kind, reason FROM case_rejected WHERE case_id = ?"
            " ORDER BY seq, at",
            (case_id,),
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


def _case(row: Row) -> CaseRow:
    return CaseRow(
        row["case_id"], row["hospital"], row["manufacturer"], row["created_at"], row["created_by"]
    )
