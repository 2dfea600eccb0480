"""Peer witnessing of audit checkpoints: a cut or re-signed log is caught by the other side.

A node's own signed checkpoints prove its log unaltered only against someone
without the node key — and the key lives on the same host as the log. So every
node hands each checkpoint it signs to its peers (as transparency logs gossip
their tree heads), and each peer keeps them:

:class:`WitnessStore` (the peer's side)
    Table ``witnessed`` in the peer's own audit database (append-only triggers).
    A checkpoint is accepted only from the node that signed it (the caller's mTLS
    node certificate, already verified against the federation CA and CRL by the
    gatekeeper), only when the signature verifies against that certificate, and
    never when the peer already holds a *different* head hash for the same entry of
    the same node: that is evidence of a rewritten log, refused and audited as a
    ``security.alert``. Re-sent checkpoints are accepted silently (idempotent).
    Receiving is not audited (every audited entry would be checkpointed and
    witnessed in turn: an endless ping-pong); refusals and reads are.

:class:`WitnessSender` (the node's side)
    One background thread. Every ``checkpoint_seconds`` it signs a checkpoint when
    the chain head moved (time-based checkpoints; the count-based ones are signed by
    :class:`~gateway.audit.AuditLog` itself) and sends each peer the checkpoints it
    does not hold yet (it asks the peer for the newest it holds first, so a restart
    or an outage is back-filled). Failures are logged and retried on the next tick;
    nothing here touches the data path. :meth:`WitnessSender.stop` signs the final
    checkpoint and makes one last bounded attempt to hand it over.

What it proves, and what not (README, Officer's guide): ``yigong audit verify
--with-peers`` checks the local log against every checkpoint the peers hold — a
log cut below, or rewritten before, the newest witnessed checkpoint fails, even
when re-signed with the node key. Entries after the newest witnessed checkpoint
(at most ``checkpoint_seconds`` of a running node, and the tail of a node that
crashed and never restarted) are proven by nothing but the chain itself.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography import x509

from gateway import authz
from gateway.audit import QUERY, SECURITY_ALERT, AuditLog, AuditSource, Checkpoint
from gateway.audit import reading as audit_reading
from gateway.authz import RequestContext
from gateway.errors import ValidationError, YigongError
from gateway.pki import verify_signature

log = logging.getLogger(__name__)

MAX_BATCH = 500
"""Checkpoints per Witness call."""
MAX_READ = 10_000
"""Checkpoints per GetWitnessed call."""

_TABLE = """
CREATE TABLE IF NOT EXISTS witnessed (
    node_id TEXT NOT NULL, seq INTEGER NOT NULL, time TEXT NOT NULL, head_hash TEXT NOT NULL,
    signature BLOB NOT NULL, certificate BLOB NOT NULL, received_at TEXT NOT NULL,
    PRIMARY KEY (node_id, seq))"""
_SQLITE_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS witnessed_no_update BEFORE UPDATE ON witnessed BEGIN "
    "SELECT RAISE(ABORT, 'witnessed checkpoints are append-only: UPDATE is not allowed'); END",
    "CREATE TRIGGER IF NOT EXISTS witnessed_no_delete BEFORE DELETE ON witnessed BEGIN "
    "SELECT RAISE(ABORT, 'witnessed checkpoints are append-only: DELETE is not allowed'); END",
)
_PG_TRIGGERS = tuple(
    f"CREATE OR REPLACE TRIGGER witnessed_no_{op} BEFORE {op.upper()} ON witnessed "
    "FOR EACH ROW EXECUTE FUNCTION audit_refuse()"  # defined by the audit log's schema
    for op in ("update", "delete")
)


class _Conflict(Exception):
    """Control flow inside :meth:`WitnessStore._store`: the transaction is rolled back,
    then the alert is written and the ValidationError raised."""

    def __init__(self, cp: Checkpoint, held: str) -> None:
        super().__init__(cp.seq)
        self.cp, self.held = cp, held


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Witnessed:
    """A checkpoint of another node held by this one."""

    checkpoint: Checkpoint
    received_at: str
    certificate_pem: bytes


class WitnessStore:
    """The checkpoints of other nodes this node witnessed (in its own audit database)."""

    def __init__(self, path: Path, audit: AuditLog) -> None:
        self.path = Path(path)
        self.audit = audit
        self.db = audit.db  # the audit log's own database (file or PostgreSQL schema)
        self._lock = threading.Lock()
        triggers = _SQLITE_TRIGGERS if self.db.engine == "sqlite" else _PG_TRIGGERS
        with self.db.transaction() as conn:
            for stmt in (self.db.ddl(_TABLE), *triggers):
                conn.execute(stmt)

    def close(self) -> None:
        """Nothing of its own to close: the database is the audit log's."""

    def witness(self, ctx: RequestContext, checkpoints: Sequence[Checkpoint]) -> tuple[int, int]:
        """Keep the calling node's checkpoints; returns (newly stored, newest seq held).

        All or nothing: a checkpoint of another node, one whose signature does not
        verify with the caller's certificate or one that contradicts a held checkpoint
        refuses the whole batch (the latter two are audited as security alerts)."""
        caller, cert_pem = ctx.identity, ctx.cert_pem
        authz.authorize(ctx, authz.AUDIT_WITNESS)
        if len(checkpoints) > MAX_BATCH:
            raise ValidationError(
                f"{len(checkpoints)} checkpoints in one Witness call; at most {MAX_BATCH}"
            )
        node = caller.subject_id
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as exc:
            raise ValidationError(f"certificate of {caller.label()} is unreadable") from exc
        for cp in checkpoints:
            authz.authorize(ctx, authz.AUDIT_HAND_OVER, resource=cp.node_id, entry=str(cp.seq))
            try:
                verify_signature(cert, cp.signing_bytes(), cp.signature)
            except YigongError as exc:
                self._alert(node, cp, "witnessed checkpoint signature does not verify", "")
                raise ValidationError(
                    f"audit checkpoint of {node} at entry {cp.seq}: signature does not verify "
                    f"against its node certificate ({exc}); refused"
                ) from exc
        with self._lock:
            try:
                return self._store(node, cert_pem, checkpoints)
            except _Conflict as c:
                self._alert(node, c.cp, "conflicting witnessed checkpoint", c.held)
                raise ValidationError(
                    f"audit checkpoint of {node} at entry {c.cp.seq} has head hash "
                    f"{c.cp.head_hash[:16]}…, but this node witnessed {c.held[:16]}… for the "
                    "same entry: the log was rewritten; refused and alerted"
                ) from None

    def _store(
        self, node: str, cert_pem: bytes, checkpoints: Sequence[Checkpoint]
    ) -> tuple[int, int]:
        with self.db.transaction() as conn:
            accepted = 0
            for cp in checkpoints:
                held = conn.execute(
                    "SELECT head_hash FROM witnessed WHERE node_id = ? AND seq = ?", (node, cp.seq)
                ).fetchone()
                if held is not None and held[0] == cp.head_hash:
                    continue
                if held is not None:
                    raise _Conflict(cp, str(held[0]))  # rolls the whole batch back
                conn.execute(
                    "INSERT INTO witnessed (node_id, seq, time, head_hash, signature,"
                    " certificate, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (node, cp.seq, cp.time, cp.head_hash, cp.signature, cert_pem, _now()),
                )
                accepted += 1
            newest = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM witnessed WHERE node_id = ?", (node,)
            ).fetchone()[0]
        if accepted:
            log.debug("witnessed %d audit checkpoint(s) of %s, newest %d", accepted, node, newest)
        return accepted, int(newest)

    def _alert(self, node: str, cp: Checkpoint, reason: str, held: str) -> None:
        log.error("audit checkpoint of %s at entry %d: %s", node, cp.seq, reason)
        try:
            self.audit.record(
                SECURITY_ALERT,
                actor=f"node:{node}",
                outcome="failure",
                peer=node,
                details={
                    "reason": reason,
                    "checkpoint_seq": cp.seq,
                    "offered_head": cp.head_hash,
                    "held_head": held,
                },
            )
        except YigongError:
            log.exception("could not audit a refused checkpoint of %s", node)

    def witnessed(
        self, ctx: RequestContext, node_id: str, *, after_seq: int = 0, limit: int = 0
    ) -> list[Witnessed]:
        """``node_id``'s checkpoints held here, oldest first; a peer may read only its own."""
        caller = ctx.identity
        authz.authorize(ctx, authz.AUDIT_READ_WITNESSED, resource=node_id)
        if not node_id:
            raise ValidationError("GetWitnessed needs the node_id whose checkpoints to return")
        limit = limit or 1000
        if not 1 <= limit <= MAX_READ:
            raise ValidationError(f"GetWitnessed limit must be 1-{MAX_READ}, not {limit}")
        with self._lock:
            rows = self.db.query(
                "SELECT seq, time, head_hash, signature, received_at, certificate "
                "FROM witnessed WHERE node_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (node_id, after_seq, limit),
            )
        self.audit.record(
            QUERY,
            actor=caller.label(),
            peer=node_id,
            details={"query": "witnessed_checkpoints", "after_seq": after_seq, "found": len(rows)},
        )
        return [
            Witnessed(Checkpoint(node_id, r[0], r[1], r[2], bytes(r[3])), r[4], bytes(r[5]))
            for r in rows
        ]


def count_witnessed(source: AuditSource, node_id: str) -> int:
    """How many checkpoints of ``node_id`` the audit log at ``source`` holds (read-only)."""
    with audit_reading(source) as (conn, _name):
        try:
            row = conn.execute(
                "SELECT COUNT(*) FROM witnessed WHERE node_id = ?", (node_id,)
            ).fetchone()
        except sqlite3.OperationalError:  # no such table: nothing witnessed yet
            return 0
    return int(row[0])


class WitnessLink(Protocol):
    """Transport to one peer's Audit service (gateway.rpc.witness_link)."""

    def witness(self, checkpoints: Sequence[Checkpoint], timeout: float) -> int:
        """Hand over checkpoints; returns the newest seq of ours the peer holds."""
        ...

    def close(self) -> None: ...


class WitnessSender:
    """Background thread: time-based checkpoints, handed to every peer."""

    def __init__(
        self,
        audit: AuditLog,
        peers: Sequence[str],
        link: Callable[[str], WitnessLink],
        *,
        interval: float,
        witness: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.audit = audit
        self.peers = list(peers) if witness else []
        self._link_factory = link
        self.interval = interval
        self.timeout = timeout
        self._held: dict[str, int | None] = dict.fromkeys(self.peers)  # None: ask the peer
        self._links: dict[str, WitnessLink] = {}
        self._failing: set[str] = set()  # warned once; quiet until they answer again
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-witness", daemon=True)
        self._thread.start()

    def held(self, peer: str) -> int | None:
        """Newest checkpoint of ours ``peer`` is known to hold (None: not known yet)."""
        return self._held.get(peer)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.tick()
            self._wake.wait(self.interval)
            self._wake.clear()

    def tick(self, timeout: float | None = None) -> None:
        """Sign a checkpoint if the head moved, then hand every peer what it lacks."""
        try:
            self.audit.checkpoint()
        except YigongError as exc:
            log.error("audit checkpoint failed: %s", exc)
        for peer in self.peers:
            try:
                self._send(peer, self.timeout if timeout is None else timeout)
                if peer in self._failing:
                    self._failing.discard(peer)
                    log.info("audit checkpoints reach %s again", peer)
            except YigongError as exc:
                level = logging.DEBUG if peer in self._failing else logging.WARNING
                log.log(level, "cannot hand audit checkpoints to %s (retrying): %s", peer, exc)
                self._failing.add(peer)
                self._held[peer] = None
                link = self._links.pop(peer, None)
                if link is not None:
                    link.close()

    def _send(self, peer: str, timeout: float) -> None:
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = self._link_factory(peer)
        held = self._held[peer]
        if held is None:
            held = self._held[peer] = link.witness([], timeout)
        while batch := self.audit.checkpoints(after_seq=held, limit=MAX_BATCH):
            held = self._held[peer] = max(link.witness(batch, timeout), batch[-1].seq)

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the thread, sign the final checkpoint and hand it over (bounded by
        ``timeout`` per peer; what does not get through is sent after the next start)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
        self.tick(timeout=timeout)
        for link in self._links.values():
            link.close()
        self._links.clear()
