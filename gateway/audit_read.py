"""Reading and verifying an audit log without writing to it: from its SQLite file, its
PostgreSQL schema, or a node's configuration (gateway/audit.py documents the log)."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from gateway.audit_format import (
    _COLUMNS,
    _PG_TRIGGERS,
    _TRIGGERS,
    EVENT_TYPES,
    PROGRESS_EVERY,
    REORDER_WINDOW,
    AuditEvent,
    Checkpoint,
    Progress,
    Verifier,
    VerifyReport,
    _fmt_time,
    _safe_hash,
    genesis_hash,
)
from gateway.db import Database, open_database, redact_url
from gateway.errors import AuditError, ValidationError

if TYPE_CHECKING:
    from gateway.config import NodeConfig

log = logging.getLogger(__name__)


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


Query = Callable[[str, Sequence[Any]], list[Any]]
"""Rows of one read: ``Database.query``, or a read on an open snapshot connection."""


def _select_events(
    query: Query,
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
        rows = list(query(sql, (*args, limit)))
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
        return _select_events(lambda sql, p: conn.execute(sql, p).fetchall(), name, **filters)


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
