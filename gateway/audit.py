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
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.audit_format import (  # noqa: F401  (re-exported: the log's one import path)
    _COLUMNS,
    _HEAD_SQL,
    _PG_TRIGGER_SQL,
    _SCHEMA,
    _TRIGGER_SQL,
    AUTH_REFUSED,
    AUTHZ_REFUSED,
    CASE_CONFIRMATION,
    CASE_RECORD,
    CHECKPOINT_FORMAT,
    CONFIG_LOADED,
    DEID_APPLIED,
    DESIGN_EXPORTED,
    DICOM_ASSOCIATION_ACCEPTED,
    DICOM_ASSOCIATION_REFUSED,
    DICOM_INSTANCE_RECEIVED,
    EVENT_TYPES,
    FIDELITY_RESULT,
    MAX_DETAIL_CHARS,
    MAX_DETAIL_KEYS,
    NODE_START,
    NODE_STOP,
    OBJECT_DOWNLOADED,
    OBJECT_STORED,
    OUTCOMES,
    PROGRESS_EVERY,
    QUERY,
    REORDER_WINDOW,
    RESIDENCY_REFUSED,
    SCHEMA_VERSION,
    SECURITY_ALERT,
    TRANSFER_ABANDONED,
    TRANSFER_BATCH_BEGUN,
    TRANSFER_BATCH_COMPLETED,
    TRANSFER_BATCH_FAILED,
    TRANSFER_BATCH_OPENED,
    TRANSFER_BATCH_RECEIVED,
    TRANSFER_BEGUN,
    TRANSFER_COMPLETED,
    TRANSFER_FAILED,
    TRANSFER_INTEGRITY_FAILED,
    TRANSFER_QUEUED,
    TRANSFER_RECEIVED,
    TRANSFER_REFUSED,
    AuditEvent,
    Checkpoint,
    Progress,
    Scalar,
    Signer,
    Verifier,
    VerifyReport,
    _check_details,
    _now,
    canonical_json,
    checkpoint_signing_bytes,
    entry_hash,
    genesis_hash,
)
from gateway.audit_read import (  # noqa: F401  (re-exported)
    AuditSource,
    _chain_fault_after,
    _missing_triggers,
    _select_events,
    audit_source,
    close_source,
    describe,
    latest_checkpoint,
    open_audit_database,
    parse_when,
    read_events,
    reading,
    verify_log,
)
from gateway.db import Conn, Database, SqliteDatabase
from gateway.errors import AuditError

if TYPE_CHECKING:
    from gateway.config import NodeConfig

log = logging.getLogger(__name__)


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
            missing = _missing_triggers(c) if version == SCHEMA_VERSION else []
            if sqlite:
                statements = [s for s in (_SCHEMA + _TRIGGER_SQL).split(";\n") if s.strip()]
            else:
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

    def _append(self, conn: Conn, event: str, refs: tuple[str | None, ...], details: str) -> int:
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
                self._db().query,
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
