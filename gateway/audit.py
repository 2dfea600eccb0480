"""The one audit writer of yigong-gateway: an append-only, hash-chained, signed event log.

Format
    A separate SQLite file (WAL, ``synchronous=FULL``; schema version in
    ``PRAGMA user_version``) or, with ``[database] url``, schema ``audit`` of the node's
    PostgreSQL database (:mod:`gateway.db`; version in ``schema_versions``), shared by
    every replica of the node: one chain, each append reading the head inside the
    database-wide writer lock (``pg_advisory_xact_lock``), so concurrent writers in
    several processes extend it one after the other. Table ``events`` holds one row per
    event::

        seq, time, event, actor, outcome, object_id, transfer_id, peer, case_id,
        details, prev_hash, entry_hash

    ``time`` is ISO-8601 UTC with microseconds (``2025-01-31T08:15:02.123456Z``);
    ``details`` is canonical JSON (``sort_keys``, separators ``(',', ':')``,
    ``ensure_ascii=False``) of a flat object, ``{}`` when there are none.
    ``entry_hash = sha256_hex(prev_hash + "\\n" + canonical_json([seq, time, event,
    actor, outcome, object_id, transfer_id, peer, case_id, details]))`` where
    ``details`` is the stored JSON *text* (so every stored byte is covered). The
    first entry's ``prev_hash`` is ``sha256_hex("yigong-audit-genesis:" + node_id)``.
    Table ``checkpoints(seq, time, head_hash, signature)`` holds signatures of
    :func:`checkpoint_signing_bytes` over the chain head at ``seq``.

Guarantees
    * an entry :meth:`AuditLog.record` returned a seq for is durable;
    * :meth:`AuditLog.verify` detects an edited, deleted, inserted or reordered
      entry, and truncation below a checkpoint; signatures make checkpoints
      unforgeable without the node key. Triggers (SQLite, or PL/pgSQL on PostgreSQL)
      refuse UPDATE and DELETE (and inserts that do not extend the chain) as defence
      in depth, and a missing or disabled one is restored with an alert; verification
      never relies on them. Someone with write access who rewrites the whole chain
      *and* drops the checkpoints is only caught by a checkpoint exported earlier
      (:meth:`AuditLog.export_checkpoint`, kept by the peer or a security officer,
      checked with :meth:`AuditLog.check_against_checkpoint`) or by the checkpoints
      the node's peers witnessed (:mod:`gateway.audit_witness`); a node with a signer
      signs a checkpoint when it opens the log, so a crash leaves no unsigned entries
      behind once the node restarts. A malformed checkpoint row is named, never a crash.

What must never go in it
    Patient data. Callers pass UIDs, hashes, case ids and pseudonyms only; never
    names, patient ids, birth dates, addresses or free text copied from a DICOM
    header. ``details`` values must be flat scalars and a denylist of identifying
    keys is refused with :class:`~gateway.errors.AuditError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from gateway.db import Conn, Database, SqliteDatabase, open_database, redact_url
from gateway.errors import AuditError, ValidationError
from gateway.hashing import sha256_hex

if TYPE_CHECKING:
    from gateway.config import NodeConfig

log = logging.getLogger(__name__)

# --- event types ----------------------------------------------------------------------------
NODE_START: Final = "node.start"
NODE_STOP: Final = "node.stop"
CONFIG_LOADED: Final = "config.loaded"
AUTH_REFUSED: Final = "auth.refused"  # certificate refused
AUTHZ_REFUSED: Final = "authz.refused"  # identity known, role not allowed
TRANSFER_QUEUED: Final = "transfer.queued"
TRANSFER_BEGUN: Final = "transfer.begun"
TRANSFER_COMPLETED: Final = "transfer.completed"
TRANSFER_FAILED: Final = "transfer.failed"
TRANSFER_RECEIVED: Final = "transfer.received"
TRANSFER_INTEGRITY_FAILED: Final = "transfer.integrity_failed"
OBJECT_STORED: Final = "object.stored"
QUERY: Final = "query"  # a listing / metadata lookup
OBJECT_DOWNLOADED: Final = "object.downloaded"
RESIDENCY_REFUSED: Final = "residency.refused"
DICOM_ASSOCIATION_ACCEPTED: Final = "dicom.association_accepted"
DICOM_ASSOCIATION_REFUSED: Final = "dicom.association_refused"
DICOM_INSTANCE_RECEIVED: Final = "dicom.instance_received"
DEID_APPLIED: Final = "deid.applied"
CASE_CONFIRMATION: Final = "case.confirmation"
CASE_RECORD: Final = "case.record"  # a signed case document (order, design, delivery, ...)
FIDELITY_RESULT: Final = "fidelity.result"
SECURITY_ALERT: Final = "security.alert"
DESIGN_EXPORTED: Final = "design.exported"  # an approved design stored in the hospital's PACS
TRANSFER_REFUSED: Final = "transfer.refused"  # a peer's Offer/Push refused, or a receipt withheld
TRANSFER_ABANDONED: Final = "transfer.abandoned"  # an inbound transfer expired; its spool deleted
TRANSFER_BATCH_OPENED: Final = "transfer.batch.opened"  # a batch (study) transfer opened
TRANSFER_BATCH_BEGUN: Final = "transfer.batch.begun"  # one send attempt of a batch
TRANSFER_BATCH_COMPLETED: Final = "transfer.batch.completed"  # manifest receipt verified
TRANSFER_BATCH_FAILED: Final = "transfer.batch.failed"  # an attempt failed or was refused
TRANSFER_BATCH_RECEIVED: Final = "transfer.batch.received"  # receiver signed the manifest

EVENT_TYPES: Final[frozenset[str]] = frozenset({
    NODE_START, NODE_STOP, CONFIG_LOADED, AUTH_REFUSED, AUTHZ_REFUSED, TRANSFER_QUEUED,
    TRANSFER_BEGUN, TRANSFER_COMPLETED, TRANSFER_FAILED, TRANSFER_RECEIVED,
    TRANSFER_INTEGRITY_FAILED, OBJECT_STORED, QUERY, OBJECT_DOWNLOADED, RESIDENCY_REFUSED,
    DICOM_ASSOCIATION_ACCEPTED, DICOM_ASSOCIATION_REFUSED, DICOM_INSTANCE_RECEIVED,
    DEID_APPLIED, CASE_CONFIRMATION, CASE_RECORD, FIDELITY_RESULT, SECURITY_ALERT,
    DESIGN_EXPORTED, TRANSFER_REFUSED, TRANSFER_ABANDONED, TRANSFER_BATCH_OPENED,
    TRANSFER_BATCH_BEGUN, TRANSFER_BATCH_COMPLETED, TRANSFER_BATCH_FAILED,
    TRANSFER_BATCH_RECEIVED,
})  # fmt: skip

OUTCOMES: Final = frozenset({"success", "failure"})
SCHEMA_VERSION: Final = 1
CHECKPOINT_FORMAT: Final = "yigong-audit-checkpoint/1"
MAX_DETAIL_KEYS: Final = 32
MAX_DETAIL_CHARS: Final = 4096
REORDER_WINDOW: Final = 1000
"""How far (in seqs) verification looks for the true position of a misplaced entry."""

Scalar = str | int | float | bool | None
Signer = Callable[[bytes], bytes]
"""Signs checkpoint bytes with the node key (ECDSA P-256 / SHA-256 in the federation)."""
Verifier = Callable[[bytes, bytes], None]
Progress = Callable[[int], None]
PROGRESS_EVERY: Final = 10_000  # entries between progress reports of a verification
"""``verify(data, signature)``; raises (e.g. BadSignature) when the signature does not verify."""

_DENIED_KEYS: Final = frozenset(
    """name fullname firstname lastname givenname familyname birthname patient patientname
    patientsname patientid patientsid otherpatientids otherpatientnames birthdate dateofbirth
    dob patientbirthdate patientsbirthdate address patientaddress patientsaddress phone
    telephone phonenumber patienttelephonenumbers mobile email idcard idnumber nationalid ssn
    mrn medicalrecordnumber insurancenumber 姓名 患者姓名 病人姓名 身份证 身份证号 出生日期 住址
    地址 电话 手机 手机号 病历号 住院号 医保号""".split()
)
"""Keys (lowercased, punctuation and ``_`` removed) that name patient data."""

_COLUMNS: Final = (
    "seq, time, event, actor, outcome, object_id, transfer_id, peer, case_id, details, "
    "prev_hash, entry_hash"
)
_HEAD_SQL: Final = "SELECT seq, entry_hash FROM events ORDER BY seq DESC LIMIT 1"
_TABLES: Final = ("events", "checkpoints", "meta")
_TRIGGERS: Final = (
    "events_append_only",
    *(f"{t}_no_{o}" for t in _TABLES for o in ("update", "delete")),
)
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, event TEXT NOT NULL, actor TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('success', 'failure')), object_id TEXT,
    transfer_id TEXT, peer TEXT, case_id TEXT, details TEXT NOT NULL,
    prev_hash TEXT NOT NULL, entry_hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE INDEX IF NOT EXISTS events_event ON events(event);
CREATE INDEX IF NOT EXISTS events_object ON events(object_id);
CREATE INDEX IF NOT EXISTS events_transfer ON events(transfer_id);
CREATE INDEX IF NOT EXISTS events_case ON events(case_id);
CREATE INDEX IF NOT EXISTS events_actor ON events(actor);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, head_hash TEXT NOT NULL,
    signature BLOB NOT NULL);
"""
_TRIGGER_SQL: Final = "".join(
    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op} BEFORE {op.upper()} ON {table} BEGIN "
    f"SELECT RAISE(ABORT, 'audit log is append-only: {op.upper()} of {table} is not allowed'); "
    "END;\n"
    for table in _TABLES
    for op in ("update", "delete")
) + (
    "CREATE TRIGGER IF NOT EXISTS events_append_only BEFORE INSERT ON events WHEN "
    "NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM events) OR NEW.prev_hash IS NOT "
    "COALESCE((SELECT entry_hash FROM events WHERE seq = NEW.seq - 1), "
    "(SELECT value FROM meta WHERE key = 'genesis')) BEGIN "
    "SELECT RAISE(ABORT, 'audit log is append-only: a new entry must extend the chain'); END;\n"
)


_PG_TRIGGERS: Final = (*_TRIGGERS, *(f"{t}_no_truncate" for t in _TABLES))
_PG_TRIGGER_SQL: Final = (
    "CREATE OR REPLACE FUNCTION audit_refuse() RETURNS trigger LANGUAGE plpgsql "
    "SET search_path FROM CURRENT AS $$ BEGIN "
    "RAISE EXCEPTION 'audit log is append-only: % of % is not allowed', TG_OP, TG_TABLE_NAME; "
    "END $$",
    "CREATE OR REPLACE FUNCTION audit_extend() RETURNS trigger LANGUAGE plpgsql "
    "SET search_path FROM CURRENT AS $$ BEGIN "  # the log's schema, whoever's session
    "IF NEW.seq IS DISTINCT FROM (SELECT COALESCE(MAX(seq), 0) + 1 FROM events) "
    "OR NEW.prev_hash IS DISTINCT FROM COALESCE((SELECT entry_hash FROM events "
    "WHERE seq = NEW.seq - 1), (SELECT value FROM meta WHERE key = 'genesis')) THEN "
    "RAISE EXCEPTION 'audit log is append-only: a new entry must extend the chain'; "
    "END IF; RETURN NEW; END $$",
    *(
        f"CREATE OR REPLACE TRIGGER {table}_no_{op} BEFORE {op.upper()} ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION audit_refuse()"
        for table in _TABLES
        for op in ("update", "delete")
    ),
    "CREATE OR REPLACE TRIGGER events_append_only BEFORE INSERT ON events "
    "FOR EACH ROW EXECUTE FUNCTION audit_extend()",
    *(  # TRUNCATE skips row triggers: a statement trigger each
        f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse()"
        for table in _TABLES
    ),
    *(f"ALTER TABLE {table} ENABLE TRIGGER ALL" for table in _TABLES),
)
"""The same rules on PostgreSQL (``CREATE OR REPLACE``: re-run at every start, which also
restores a dropped trigger; ``ENABLE``: a disabled one counts as missing)."""


# --- pure functions: the format -------------------------------------------------------------
def canonical_json(value: Any) -> str:
    """The canonical JSON text used for ``details`` and for hashing."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def genesis_hash(node_id: str) -> str:
    """``prev_hash`` of the first entry of ``node_id``'s log."""
    return sha256_hex(f"yigong-audit-genesis:{node_id}".encode())


def entry_hash(prev_hash: str, fields: Sequence[Any]) -> str:
    """Hash of one entry; ``fields`` = [seq, time, event, actor, outcome, object_id,
    transfer_id, peer, case_id, details-json-text]."""
    return sha256_hex(f"{prev_hash}\n{canonical_json(list(fields))}".encode())


def checkpoint_signing_bytes(node_id: str, seq: int, head_hash: str) -> bytes:
    """The exact bytes a checkpoint signature covers."""
    return f"yigong-audit-checkpoint\n{node_id}\n{seq}\n{head_hash}".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fmt_time(when: datetime) -> str:
    if when.tzinfo is None:
        raise AuditError(f"audit time filter {when.isoformat()} has no time zone; pass UTC")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _safe_hash(prev_hash: object, fields: Sequence[Any]) -> str | None:
    """:func:`entry_hash` of a stored row, or None when the row holds foreign types."""
    if not isinstance(prev_hash, str):
        return None
    try:
        return entry_hash(prev_hash, fields)
    except (TypeError, ValueError):
        return None


def _check_details(details: Mapping[str, Scalar] | None) -> str:
    if details is None:
        return "{}"
    if not isinstance(details, Mapping):
        raise AuditError(f"audit details must be a mapping, not {type(details).__name__}")
    if len(details) > MAX_DETAIL_KEYS:
        raise AuditError(f"audit details have {len(details)} keys; at most {MAX_DETAIL_KEYS}")
    for key, value in details.items():
        if not isinstance(key, str) or not key:
            raise AuditError(f"audit details key {key!r} must be a non-empty string")
        if re.sub(r"[\W_]", "", key.lower()) in _DENIED_KEYS:
            raise AuditError(
                f"audit details key {key!r} is not allowed: it names patient data; "
                "record UIDs, hashes, case ids or pseudonyms instead"
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise AuditError(
                f"audit details[{key!r}] is a {type(value).__name__}: values must be flat "
                "scalars (str, int, float, bool or None), never nested structures"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise AuditError(f"audit details[{key!r}] is {value}: only finite numbers")
        if isinstance(value, str) and len(value) > MAX_DETAIL_CHARS:
            raise AuditError(f"audit details[{key!r}] is longer than {MAX_DETAIL_CHARS} chars")
    return canonical_json(dict(details))


# --- records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditEvent:
    """One row of ``events``; ``details`` parsed to a dict."""

    seq: int
    time: str
    event: str
    actor: str | None
    outcome: str
    object_id: str | None
    transfer_id: str | None
    peer: str | None
    case_id: str | None
    details: dict[str, Scalar] = field(hash=False)
    prev_hash: str
    entry_hash: str

    @property
    def timestamp(self) -> datetime:
        return datetime.fromisoformat(self.time)


@dataclass(frozen=True)
class Checkpoint:
    """A signature by the node over the chain head at ``seq``.

    ``source`` says where a checkpoint checked against the log came from (empty: the
    log's own table; ``"exported"``; ``"witnessed by factory-1"``); it is not signed."""

    node_id: str
    seq: int
    time: str
    head_hash: str
    signature: bytes
    source: str = field(default="", compare=False)

    def signing_bytes(self) -> bytes:
        return checkpoint_signing_bytes(self.node_id, self.seq, self.head_hash)

    def label(self) -> str:
        """``checkpoint at entry 17`` or ``checkpoint at entry 17 (witnessed by factory-1)``."""
        return f"checkpoint at entry {self.seq}" + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "source"}
        return {"format": CHECKPOINT_FORMAT, **data, "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        try:
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
            seq, head = data["seq"], data["head_hash"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError(f"seq {seq!r} is not a positive integer")
            if not isinstance(head, str) or not re.fullmatch(r"[0-9a-f]{64}", head):
                raise ValueError("head_hash is not 64 lowercase hex digits")
            return cls(
                str(data["node_id"]),
                seq,
                str(data["time"]),
                head,
                bytes.fromhex(data["signature"]),
                "exported",
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AuditError(f"exported audit checkpoint is malformed: {exc}") from exc


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a verification; ``reason`` names the first bad entry and what is wrong.

    ``entries`` and ``checkpoints`` count what the log holds (including any exported
    checkpoint checked against it)."""

    ok: bool
    entries: int
    checkpoints: int
    first_bad_seq: int | None
    reason: str
    last_checkpoint: int = 0
    """Newest entry a checkpoint (of the log or given) covers; entries after it are
    proven by nothing but the chain itself."""


# --- verification ---------------------------------------------------------------------------
def _missing_triggers(conn: Any) -> list[str]:
    """The append-only triggers absent (or, on PostgreSQL, disabled) in ``conn``'s log."""
    if isinstance(conn, sqlite3.Connection):
        sql = "SELECT name FROM sqlite_master WHERE type='trigger'"
    else:
        sql = (
            "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND NOT t.tgisinternal AND t.tgenabled <> 'D'"
        )
    present = {r[0] for r in conn.execute(sql)}
    names = _TRIGGERS if isinstance(conn, sqlite3.Connection) else _PG_TRIGGERS
    return [name for name in names if name not in present]


def _rows(conn: Any, sql: str) -> Iterable[Sequence[Any]]:
    """A long scan: streamed by a server-side cursor on PostgreSQL, SQLite's own cursor."""
    stream = getattr(conn, "stream", None)
    return stream(sql) if stream is not None else conn.execute(sql)


def _true_seq(row: Sequence[Any]) -> int | None:
    """The seq a misplaced row's hash was computed for, searched near its current seq."""
    seq = row[0]
    for delta in range(1, REORDER_WINDOW + 1):
        for cand in (seq + delta, seq - delta):
            if cand >= 1 and _safe_hash(row[10], (cand, *row[1:10])) == row[11]:
                return cand
    return None


def _chain_fault(row: Sequence[Any], expected_seq: int) -> tuple[int, str]:
    """(first bad seq, reason) for the first row that does not continue the chain."""
    seq, prev_seq = row[0], expected_seq - 1
    if seq != expected_seq:
        single = seq == expected_seq + 1
        what = f"entry {expected_seq}" if single else f"entries {expected_seq}-{seq - 1}"
        after = f"previous entry is {prev_seq}" if prev_seq else "log starts there"
        return expected_seq, f"{what}: missing (deleted) — entry {seq} follows, {after}"
    if _safe_hash(row[10], row[:10]) != row[11]:
        true = _true_seq(row)
        if true is None:
            return seq, f"entry {seq}: content does not match its hash (edited)"
        if true > seq:
            return seq, f"entry {seq}: holds the entry recorded as {true} (reordered)"
        return true, f"entry {true}: inserted — the entry recorded as {true} now sits at {seq}"
    if seq == 1:
        return 1, "entry 1: does not start from this node's genesis hash (rewritten)"
    return prev_seq, f"entry {prev_seq}: rewritten — entry {seq} does not link to its hash"


def _checkpoint_fault(
    cps: Sequence[Checkpoint], node_id: str, verify_signature: Verifier | None
) -> tuple[int, str] | None:
    for cp in cps:
        if cp.node_id != node_id:
            return cp.seq, f"{cp.label()} belongs to node {cp.node_id!r}"
        if verify_signature is not None:
            try:
                if not isinstance(cp.signature, bytes):
                    raise TypeError("signature is not bytes")
                verify_signature(cp.signing_bytes(), cp.signature)
            except Exception as exc:
                why = type(exc).__name__
                return cp.seq, f"{cp.label()}: signature does not verify ({why})"
    return None


def _stored_checkpoints(
    conn: Any, node_id: str
) -> tuple[list[Checkpoint], tuple[int | None, str] | None]:
    """The ``checkpoints`` table, and (seq, reason) naming the first malformed row."""
    out: list[Checkpoint] = []
    rows = conn.execute("SELECT rowid, seq, time, head_hash, signature FROM checkpoints")
    for rowid, seq, when, head, sig in rows:
        what = f"checkpoint row {rowid} (seq {seq!r})"
        if not isinstance(seq, int) or seq < 1:
            why = "seq is not a positive integer"
        elif not isinstance(head, str) or not re.fullmatch(r"[0-9a-f]{64}", head):
            why = "head_hash is not 64 lowercase hex digits"
        elif not isinstance(sig, bytes | memoryview) or not sig:
            why = "signature is not a non-empty blob"
        elif not isinstance(when, str):
            why = "time is not text"
        else:
            out.append(Checkpoint(node_id, seq, when, head, bytes(sig)))
            continue
        bad = seq if isinstance(seq, int) and seq >= 1 else None
        return out, (bad, f"{what}: malformed — {why} (edited outside the gateway)")
    return sorted(out, key=lambda c: c.seq), None


def _chain_fault_after(
    rows: Iterable[Sequence[Any]],
    prev: str,
    last: int,
    cps: Sequence[Checkpoint] = (),
    progress: Progress | None = None,
) -> tuple[int, str] | None:
    """First fault in ``rows`` (entries after ``last``, whose hash is ``prev``), or None.
    ``progress(entries_checked)`` is called every PROGRESS_EVERY entries."""
    heads: dict[int, list[Checkpoint]] = {}
    for cp in cps:
        heads.setdefault(cp.seq, []).append(cp)
    for row in rows:
        if row[0] != last + 1 or row[10] != prev or _safe_hash(prev, row[:10]) != row[11]:
            return _chain_fault(row, last + 1)
        prev, last = row[11], row[0]
        if progress is not None and last % PROGRESS_EVERY == 0:
            progress(last)
        for cp in heads.get(last, ()):
            if cp.head_hash != prev:
                return (
                    last,
                    f"{cp.label()}: signed head hash does not match the log "
                    "(rewritten after it was signed)",
                )
    if cps and (newest := max(cps, key=lambda c: c.seq)).seq > last:
        ends = f"log ends at entry {last}" if last else "log is empty"
        return last + 1, f"log truncated: {newest.label()} but {ends}"
    return None


def _select_events(
    conn: Any,
    path: Path | str,
    *,
    event: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    object_id: str | None = None,
    transfer_id: str | None = None,
    peer: str | None = None,
    case_id: str | None = None,
    before_seq: int | None = None,
    after_seq: int | None = None,
    limit: int = 1000,
    newest: bool = False,
) -> list[AuditEvent]:
    """Matching events, oldest first: the first ``limit`` ones, or with ``newest`` the
    last ``limit`` ones."""
    if event is not None and event not in EVENT_TYPES:
        raise AuditError(f"unknown audit event type {event!r}; see gateway.audit.EVENT_TYPES")
    if not 1 <= limit <= 100_000:
        raise AuditError(f"audit query limit must be 1-100000, not {limit}")
    where: list[str] = ["1 = 1"]
    args: list[str | int] = []
    equal = dict(event=event, actor=actor, object_id=object_id, transfer_id=transfer_id)
    for column, value in (*equal.items(), ("peer", peer), ("case_id", case_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("time >= ?")
        args.append(_fmt_time(since))
    if until is not None:
        where.append("time < ?")
        args.append(_fmt_time(until))
    if after_seq is not None:
        where.append("seq > ?")
        args.append(int(after_seq))
    if before_seq is not None:
        where.append("seq < ?")
        args.append(int(before_seq))
    order = "DESC" if newest else "ASC"
    sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?"
    try:
        rows = list(conn.execute(sql, (*args, limit)).fetchall())
        if newest:
            rows.reverse()
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read audit log {path}: {exc}") from exc
    out = []
    for r in rows:
        try:
            details = json.loads(r[9])
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit entry {r[0]}: details are not JSON; verify()") from exc
        out.append(AuditEvent(*(*r[:9], details, *r[10:])))
    return out


def parse_when(value: str | None, name: str = "") -> datetime | None:
    """A ``since``/``until`` filter given as text (ISO-8601; UTC unless it says): None
    when empty, ValidationError naming the value otherwise."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        what = f"{name} {value!r}" if name else repr(value)
        raise ValidationError(
            f"{what} is not a date/time; use ISO-8601, e.g. 2026-12-04 or 2026-12-04T15:30"
        ) from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


AuditSource: TypeAlias = "Path | Database | NodeConfig"
"""Where a log is read from: its SQLite file, the :class:`~gateway.db.Database` (schema
``audit``) that holds it, or a node's configuration (whichever of the two it names)."""


@contextmanager
def reading(source: AuditSource) -> Iterator[tuple[Any, str]]:
    """(a read-only connection seeing one snapshot of the log, the log's name)."""
    if not isinstance(source, Path | str | Database):  # a node's configuration
        with audit_source(source) as opened, reading(opened) as got:
            yield got
        return
    if isinstance(source, Database):
        with source.snapshot() as conn:
            yield conn, source.where
        return
    path = Path(source)
    if not path.exists():
        raise AuditError(f"audit log {path} does not exist")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        conn.execute("BEGIN")  # one snapshot for checkpoints and events
    except sqlite3.Error as exc:
        raise AuditError(f"cannot open audit log {path}: {exc}") from exc
    try:
        yield conn, f"audit log {path}"
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read audit log {path}: {exc}") from exc
    finally:
        conn.close()


def describe(cfg: NodeConfig) -> str:
    """The audit log of ``cfg``'s node, named for people (file or database, no password)."""
    if cfg.database.url:
        return f"audit log {redact_url(cfg.database.url)} (schema audit)"
    return f"audit log {cfg.audit.path}"


def open_audit_database(cfg: NodeConfig) -> Path | Database:
    """Where ``cfg``'s node keeps its audit log, for reading: the SQLite file, or (with
    ``[database] url``) a PostgreSQL database the caller closes (:func:`close_source`)."""
    if not cfg.database.url:
        return cfg.audit.path
    return open_database(
        cfg.database.url, cfg.audit.path, AuditError, schema="audit", label="audit log",
        pool_size=1,
    )  # fmt: skip


def close_source(source: Path | Database) -> None:
    if isinstance(source, Database):
        source.close()


@contextmanager
def audit_source(cfg: NodeConfig) -> Iterator[Path | Database]:
    """:func:`open_audit_database` for the length of a block."""
    source = open_audit_database(cfg)
    try:
        yield source
    finally:
        close_source(source)


def read_events(source: AuditSource, **filters: Any) -> list[AuditEvent]:
    """:meth:`AuditLog.events` on a log, read-only (safe while the node runs)."""
    with reading(source) as (conn, name):
        return _select_events(conn, name, **filters)


def latest_checkpoint(source: AuditSource) -> Checkpoint | None:
    """The newest signed checkpoint of a log, read-only (to hand to an officer)."""
    with reading(source) as (conn, name):
        row = conn.execute(
            "SELECT seq, time, head_hash, signature FROM checkpoints ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        node = conn.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
    if row is None:
        return None
    if not isinstance(row[3], bytes | memoryview) or not isinstance(row[2], str):
        raise AuditError(
            f"{name}: checkpoint row at entry {row[0]!r} is malformed; "
            "run 'yigong audit verify' to see what was changed"
        )
    return Checkpoint(node[0] if node else "", int(row[0]), row[1], row[2], bytes(row[3]))


def verify_log(
    source: AuditSource,
    node_id: str,
    *,
    verify_signature: Verifier | None = None,
    extra_checkpoints: Sequence[Checkpoint] = (),
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Verify the audit log at ``source`` (read-only, one snapshot; safe while writers
    run).

    ``progress(entries_checked, entries_total)`` reports a long verification.

    Recomputes the chain from genesis; compares every checkpoint's head hash with
    the recomputed hash at its seq; verifies each checkpoint signature with
    ``verify_signature(data, signature)`` (which raises when it does not verify)
    if given. Without ``verify_signature`` checkpoints are consistency checks only.
    """
    with reading(source) as (conn, name):
        if missing := _missing_triggers(conn):
            log.warning("%s: append-only triggers missing: %s", name, missing)
        stored, malformed = _stored_checkpoints(conn, node_id)
        cps = sorted([*stored, *extra_checkpoints], key=lambda c: c.seq)
        n_entries = int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        if malformed is not None:
            return VerifyReport(False, n_entries, len(cps), malformed[0], malformed[1])

        fault = _checkpoint_fault(cps, node_id, verify_signature) or _chain_fault_after(
            _rows(conn, f"SELECT {_COLUMNS} FROM events ORDER BY seq"),
            genesis_hash(node_id),
            0,
            cps,
            None if progress is None else lambda done: progress(done, n_entries),
        )
        newest = cps[-1].seq if cps else 0
        if fault is not None:
            return VerifyReport(False, n_entries, len(cps), fault[0], fault[1], newest)
        reason = f"ok: {n_entries} entries, {len(cps)} checkpoints verified"
        return VerifyReport(True, n_entries, len(cps), None, reason, newest)


class _QueryConn:
    """A Database read through the execute/fetchall shape the query helpers take."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Fetched:
        return _Fetched(self.db.query(sql, params))


class _Fetched:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchall(self) -> list[Any]:
        return self.rows

    def fetchone(self) -> Any:
        return self.rows[0] if self.rows else None


# --- the writer -----------------------------------------------------------------------------
class AuditLog:
    """The one writer of a node's audit log. Thread-safe; one instance per process (on
    PostgreSQL, several processes — replicas — write one chain)."""

    def __init__(
        self,
        path: Path | Database,
        node_id: str,
        *,
        signer: Signer | None = None,
        checkpoint_every: int = 1000,
        database: Database | None = None,
    ) -> None:
        if not node_id or not isinstance(node_id, str) or "\n" in node_id:
            raise AuditError(f"invalid audit node id {node_id!r}")
        if checkpoint_every < 1:
            raise AuditError(f"checkpoint_every must be >= 1, not {checkpoint_every}")
        # ``database=``: this log's own store (closed with it); a Database given in place
        # of the path stays the caller's (not closed: it may outlive this object)
        self._owns_db = not isinstance(path, Database)
        if isinstance(path, Database):
            database, path = path, getattr(path, "path", Path("audit.sqlite"))
        self.path = Path(path)
        self.node_id = node_id
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._lock = threading.RLock()
        self._batch: Conn | None = None  # open batch() transaction
        self._genesis = genesis_hash(node_id)
        self._closed = False
        try:
            if database is None:
                new_file = not self.path.exists()
                database = SqliteDatabase(self.path, AuditError, label="audit log")
                if new_file:
                    os.chmod(self.path, 0o600)
            self.db: Database = database
            self._open_schema()
        except OSError as exc:
            self._close_conn()
            raise AuditError(f"cannot open audit log {self.path}: {exc}") from exc
        except AuditError:
            self._close_conn()
            raise
        if signer is not None:
            self._startup_checkpoint()

    @classmethod
    def for_config(
        cls, cfg: NodeConfig, *, signer: Signer | None = None, checkpoint_every: int = 1000
    ) -> AuditLog:
        """The audit log of the node ``cfg`` configures: ``[audit] path`` (SQLite) or,
        with ``[database] url``, schema ``audit`` of that PostgreSQL database."""
        database = open_audit_database(cfg)
        return cls(
            cfg.audit.path, cfg.node.id, signer=signer, checkpoint_every=checkpoint_every,
            database=database if isinstance(database, Database) else None,
        )  # fmt: skip

    @property
    def where(self) -> str:
        """The log's name in messages ("audit log /data/audit.sqlite", or the database)."""
        db = getattr(self, "db", None)
        return db.where if db is not None else f"audit log {self.path}"

    @property
    def source(self) -> AuditSource:
        """What the read-only functions (:func:`verify_log`, ...) read this log from."""
        return self.db if self.db.engine != "sqlite" else self.path

    def _startup_checkpoint(self) -> None:
        """Sign whatever the previous run left unsigned (a crash, a kill -9): from now
        on cutting those entries contradicts a signature (and, once witnessed, a peer)."""
        with self._lock:
            try:
                self._checkpoint_locked()
            except AuditError as exc:
                log.error("%s: start-up checkpoint refused: %s", self.where, exc)
                alert: dict[str, Scalar] = {"reason": "start-up checkpoint refused"}
                self.record(SECURITY_ALERT, outcome="failure", details=alert)

    def _open_schema(self) -> None:
        sqlite = self.db.engine == "sqlite"
        if sqlite:
            version = int(self.db.query("PRAGMA user_version")[0][0])
        else:
            version = self.db.version("audit")
        if version > SCHEMA_VERSION:
            raise AuditError(
                f"{self.where} has schema version {version}; this "
                f"gateway reads up to {SCHEMA_VERSION}: upgrade the gateway"
            )
        with self._tx() as c:
            existed = version == SCHEMA_VERSION
            if sqlite:
                missing = _missing_triggers(c) if existed else []
                statements = [s for s in (_SCHEMA + _TRIGGER_SQL).split(";\n") if s.strip()]
            else:
                missing = _missing_triggers(c) if existed else []
                schema = [self.db.ddl(s) for s in _SCHEMA.split(";\n") if s.strip()]
                statements = [*schema, *_PG_TRIGGER_SQL]
            for stmt in statements:
                c.execute(stmt)
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('node_id', ?) ON CONFLICT DO NOTHING",
                (self.node_id,),
            )
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('genesis', ?) ON CONFLICT DO NOTHING",
                (self._genesis,),
            )
            owner = c.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()[0]
            if owner != self.node_id:
                raise AuditError(f"{self.where} belongs to node {owner!r}, not {self.node_id!r}")
            if sqlite:
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            else:
                c.execute(
                    "INSERT INTO schema_versions VALUES ('audit', ?) ON CONFLICT(namespace)"
                    " DO UPDATE SET version = excluded.version",
                    (SCHEMA_VERSION,),
                )
            row = c.execute("SELECT MAX(seq) FROM checkpoints").fetchone()
            self._last_checkpoint = row[0] or 0
        if missing:
            log.error("%s: restored missing triggers %s", self.where, missing)
            alert: dict[str, Scalar] = {
                "reason": "audit triggers missing",
                "restored": len(missing),
            }
            self.record(SECURITY_ALERT, outcome="failure", details=alert)

    # -- plumbing --
    def _db(self) -> Database:
        if self._closed:
            raise AuditError(f"{self.where} is closed")
        return self.db

    def _tx(self) -> AbstractContextManager[Conn]:
        """One write transaction, serialised with every writer of this log (in every
        process: SQLite's file lock, PostgreSQL's advisory lock)."""
        return self._db().transaction()

    def _close_conn(self) -> None:
        db = getattr(self, "db", None)
        if db is not None and not self._closed and self._owns_db:
            db.close()
        self._closed = True

    # -- writing --
    def record(
        self,
        event: str,
        *,
        actor: str | None = None,
        outcome: str = "success",
        object_id: str | None = None,
        transfer_id: str | None = None,
        peer: str | None = None,
        case_id: str | None = None,
        details: Mapping[str, Scalar] | None = None,
    ) -> int:
        """Append one event durably and return its seq.

        Pass UIDs, hashes, case ids and pseudonyms only — never patient names, ids,
        birth dates, addresses or free text from a DICOM header. ``details`` must be
        a flat mapping of str keys to str/int/float/bool/None; nested values and
        identifying keys (``patient_name``, ``patient_id``, ``birth_date``, ``name``,
        ``address``, ...) raise :class:`AuditError`, as do unknown event types.
        """
        if event not in EVENT_TYPES:
            raise AuditError(f"unknown audit event type {event!r}; see gateway.audit.EVENT_TYPES")
        if outcome not in OUTCOMES:
            raise AuditError(f"audit outcome must be 'success' or 'failure', not {outcome!r}")
        refs = (actor, outcome, object_id, transfer_id, peer, case_id)
        if any(value is not None and not isinstance(value, str) for value in refs):
            kinds = ", ".join(type(value).__name__ for value in refs)
            raise AuditError(f"audit reference fields must be str or None, got {kinds}")
        details_json = _check_details(details)
        try:
            canonical_json([event, *refs, details_json]).encode()
        except UnicodeEncodeError as exc:
            raise AuditError(f"audit fields are not valid Unicode text: {exc.reason}") from exc
        with self._lock:
            if self._batch is not None:
                seq = self._append(self._batch, event, refs, details_json)
            else:
                with self._tx() as conn:
                    seq = self._append(conn, event, refs, details_json)
                self._maybe_checkpoint(seq)
            log.debug("audit %s seq=%d outcome=%s", event, seq, outcome)
        return seq

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Events :meth:`record`-ed inside are committed together (one fsync) when the
        block ends, or none of them if it raises; other threads' events wait."""
        with self._lock:
            if self._batch is not None:
                raise AuditError("audit batches do not nest")
            with self._tx() as conn:
                self._batch = conn
                try:
                    yield
                finally:
                    self._batch = None
            head = self.db.query(_HEAD_SQL)
            if head:
                self._maybe_checkpoint(head[0][0])

    def _append(
        self, conn: Conn, event: str, refs: tuple[str | None, ...], details: str
    ) -> int:
        head = conn.execute(_HEAD_SQL).fetchone()
        seq, prev = (head[0] + 1, head[1]) if head else (1, self._genesis)
        fields = (seq, _now(), event, *refs, details)
        conn.execute(
            f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*fields, prev, entry_hash(prev, fields)),
        )
        return int(seq)

    def _maybe_checkpoint(self, seq: int) -> None:
        if self._signer is None or seq - self._last_checkpoint < self._checkpoint_every:
            return
        if self.db.engine != "sqlite":  # another replica may have signed meanwhile
            newest = self.db.query("SELECT MAX(seq) FROM checkpoints")[0][0] or 0
            self._last_checkpoint = max(self._last_checkpoint, int(newest))
        if seq - self._last_checkpoint >= self._checkpoint_every:
            try:
                self._checkpoint_locked()
            except AuditError:
                log.exception("%s: checkpoint at %d failed", self.where, seq)

    def checkpoint(self) -> Checkpoint | None:
        """Sign the current chain head; None when no signer is configured or the log is empty.

        Returns the existing checkpoint when the head is already covered."""
        with self._lock:
            self._db()
            return self._checkpoint_locked() if self._signer is not None else None

    def _checkpoint_locked(self) -> Checkpoint | None:
        assert self._signer is not None
        with self._tx() as conn:
            head = conn.execute(_HEAD_SQL).fetchone()
            if head is None:
                return None
            seq, head_hash = head
            row = conn.execute(
                "SELECT time, head_hash, signature FROM checkpoints WHERE seq = ?", (seq,)
            ).fetchone()
            if row is not None:
                return Checkpoint(self.node_id, seq, row[0], row[1], bytes(row[2]))
            # never sign over a chain that does not extend the last signed head
            last_seq, last_head = conn.execute(
                "SELECT seq, head_hash FROM checkpoints ORDER BY seq DESC LIMIT 1"
            ).fetchone() or (0, self._genesis)
            sql = f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq"
            rows = conn.execute(sql, (last_seq,)).fetchall()
            fault = _chain_fault_after(rows, last_head, last_seq)
            if fault is not None or last_seq > seq:
                why = fault[1] if fault else f"log truncated below checkpoint {last_seq}"
                raise AuditError(f"{self.where}: refusing to sign a checkpoint: {why}")
            try:
                signature = self._signer(checkpoint_signing_bytes(self.node_id, seq, head_hash))
            except Exception as exc:
                raise AuditError(f"audit checkpoint at entry {seq}: signing failed: {exc}") from exc
            if not isinstance(signature, bytes | bytearray) or not signature:
                raise AuditError(f"audit checkpoint at entry {seq}: signer returned no bytes")
            cp = Checkpoint(self.node_id, seq, _now(), head_hash, bytes(signature))
            conn.execute(
                "INSERT INTO checkpoints (seq, time, head_hash, signature) VALUES (?, ?, ?, ?)",
                (cp.seq, cp.time, cp.head_hash, cp.signature),
            )
        self._last_checkpoint = seq
        log.info("%s: checkpoint at entry %d", self.where, seq)
        return cp

    def export_checkpoint(self) -> dict[str, Any]:
        """Checkpoint the current head and return it JSON-serialisable (hex signature).

        Hand it to someone who does not share this node's storage (the peer, a
        security officer); :meth:`check_against_checkpoint` later proves the log
        still contains exactly what it covered."""
        if self._signer is None:
            raise AuditError("cannot export an audit checkpoint: no signer is configured")
        cp = self.checkpoint()
        if cp is None:
            raise AuditError("cannot export an audit checkpoint: the audit log is empty")
        return cp.to_dict()

    # -- reading --
    def events(
        self,
        *,
        event: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        object_id: str | None = None,
        transfer_id: str | None = None,
        peer: str | None = None,
        case_id: str | None = None,
        before_seq: int | None = None,
        after_seq: int | None = None,
        limit: int = 1000,
        newest: bool = False,
    ) -> list[AuditEvent]:
        """The first ``limit`` matching events with ``after_seq`` < seq < ``before_seq``,
        oldest first (with ``newest``: the last ``limit`` ones, still oldest first).

        ``since`` is inclusive, ``until`` exclusive; page forwards with
        ``after_seq=last.seq``, backwards with ``before_seq=first.seq, newest=True``."""
        with self._lock:
            return _select_events(
                _QueryConn(self._db()),
                self.where,
                event=event,
                actor=actor,
                since=since,
                until=until,
                object_id=object_id,
                transfer_id=transfer_id,
                peer=peer,
                case_id=case_id,
                before_seq=before_seq,
                after_seq=after_seq,
                limit=limit,
                newest=newest,
            )

    def checkpoints(self, *, after_seq: int = 0, limit: int = 500) -> list[Checkpoint]:
        """Signed checkpoints at entries after ``after_seq``, oldest first."""
        with self._lock:
            rows = self._db().query(
                "SELECT seq, time, head_hash, signature FROM checkpoints WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after_seq, limit),
            )
        return [Checkpoint(self.node_id, int(r[0]), r[1], r[2], bytes(r[3])) for r in rows]

    def verify(self, verify_signature: Verifier | None = None) -> VerifyReport:
        """Recompute the whole chain and check every checkpoint; see :func:`verify_log`."""
        return verify_log(self.source, self.node_id, verify_signature=verify_signature)

    def check_against_checkpoint(
        self,
        cp: Mapping[str, Any],
        verify_signature: Verifier | None = None,
    ) -> VerifyReport:
        """Verify the log and that an exported checkpoint still matches it."""
        exported = Checkpoint.from_dict(cp)
        report = verify_log(
            self.source, self.node_id, verify_signature=verify_signature,
            extra_checkpoints=[exported],
        )  # fmt: skip
        if report.ok:
            reason = f"ok: matches the exported checkpoint at entry {exported.seq}; {report.reason}"
            return dataclasses.replace(report, reason=reason)
        return report

    def close(self) -> None:
        """Checkpoint entries not yet covered (if a signer is configured) and close."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._signer is not None:
                    self._checkpoint_locked()
            except AuditError:
                log.exception("%s: final checkpoint failed", self.where)
            finally:
                self._close_conn()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
