"""The audit log on PostgreSQL (issue #13): one hash chain for every replica of a node.

Real PostgreSQL (tests/pg.py). The same chain, checkpoints and verification as on SQLite;
the append-only rules as PL/pgSQL triggers; concurrent writers in four separate
processes extend one intact chain (each append reads the head under the database-wide
writer lock); an edited or deleted row — by someone who disabled the triggers first, as a
database administrator could — is named by ``verify``; a disabled trigger is enabled
again at the next start, with a security alert; the witness store and the read-only
functions work on the database too.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit import (
    SECURITY_ALERT,
    TRANSFER_QUEUED,
    AuditLog,
    latest_checkpoint,
    read_events,
    verify_log,
)
from gateway.db import PostgresDatabase
from gateway.errors import AuditError
from tests.pg import PgServer

NODE = "factory-1"
WRITERS = 4
SECONDS = float(os.environ.get("YIGONG_AUDIT_WRITERS_SECONDS", "4"))
"""How long the concurrent writers append (the issue's 30 s: set the variable; CI: 4 s)."""


def _db(url: str) -> PostgresDatabase:
    return PostgresDatabase(url, AuditError, schema="audit", label="audit log", pool_size=2)


def _log(url: str, tmp: Path, signer: Callable[[bytes], bytes] | None, **kw: int) -> AuditLog:
    return AuditLog(tmp / "unused.sqlite", NODE, signer=signer, database=_db(url), **kw)


@pytest.fixture
def pglog(
    pg_url: str, tmp_path: Path, signer: Callable[[bytes], bytes]
) -> Iterator[AuditLog]:
    log = _log(pg_url, tmp_path, signer, checkpoint_every=10)
    yield log
    log.close()


def _fill(log: AuditLog, n: int, who: str = "t") -> None:
    for i in range(n):
        log.record(TRANSFER_QUEUED, actor=f"node:{who}", object_id=f"{i:064x}")


def test_chain_checkpoints_and_verify_on_postgresql(
    pglog: AuditLog, pg_url: str, tmp_path: Path, signer: Callable[[bytes], bytes],
    verifier: Callable[[bytes, bytes], None],
) -> None:  # fmt: skip
    _fill(pglog, 25)
    assert [e.seq for e in pglog.events(limit=100)] == list(range(1, 26))
    report = pglog.verify(verifier)
    assert report.ok and report.entries == 25 and report.checkpoints >= 2, report
    pglog.close()
    again = _log(pg_url, tmp_path, signer)  # a restart (or another replica) continues it
    try:
        assert again.record(TRANSFER_QUEUED, actor="node:t", object_id="e" * 64) == 26
        cp = latest_checkpoint(again.db)
        assert cp is not None and cp.node_id == NODE and cp.seq >= 25
        assert [e.seq for e in read_events(again.db, after_seq=24)] == [25, 26]
        assert verify_log(again.db, NODE, verify_signature=verifier).ok
    finally:
        again.close()


def test_postgresql_triggers_refuse_update_delete_and_a_forged_insert(
    pglog: AuditLog, pg_server: PgServer, pg_url: str
) -> None:
    _fill(pglog, 3)
    assert pglog.checkpoint() is not None  # a row each table: row triggers have rows to see
    for statement, why in (
        ("UPDATE audit.events SET actor = 'x' WHERE seq = 2", "UPDATE of events"),
        ("DELETE FROM audit.events WHERE seq = 3", "DELETE of events"),
        ("DELETE FROM audit.checkpoints", "DELETE of checkpoints"),
        ("UPDATE audit.meta SET value = 'x'", "UPDATE of meta"),
        ("TRUNCATE audit.events", "TRUNCATE of events"),  # skips row triggers
        ("TRUNCATE audit.checkpoints", "TRUNCATE of checkpoints"),
        (
            "INSERT INTO audit.events (seq, time, event, outcome, details, prev_hash,"
            " entry_hash) VALUES (99, 't', 'query', 'success', '{}', 'p', 'h')",
            "must extend the chain",
        ),
    ):
        with pytest.raises(psycopg.errors.RaiseException, match=why):
            pg_server.sql(pg_url, statement)
    assert len(pglog.events(limit=100)) == 3


def test_an_edited_row_is_named_and_disabled_triggers_come_back_with_an_alert(
    pglog: AuditLog, pg_server: PgServer, pg_url: str, tmp_path: Path,
    signer: Callable[[bytes], bytes], verifier: Callable[[bytes, bytes], None],
) -> None:  # fmt: skip
    _fill(pglog, 30)
    pglog.close()
    # someone with the database's rights: triggers off, one entry rewritten
    pg_server.sql(pg_url, "ALTER TABLE audit.events DISABLE TRIGGER ALL")
    pg_server.sql(pg_url, "UPDATE audit.events SET actor = 'node:mallory' WHERE seq = 17")
    report = verify_log(_db(pg_url), NODE, verify_signature=verifier)
    assert not report.ok and report.first_bad_seq == 17
    assert "entry 17: content does not match its hash (edited)" in report.reason
    # the next start enables the triggers again and says so in the log itself
    again = _log(pg_url, tmp_path, signer)
    try:
        alerts = [e for e in again.events(event=SECURITY_ALERT, limit=10)]
        assert alerts and alerts[-1].details["reason"] == "audit triggers missing"
        with pytest.raises(psycopg.errors.RaiseException):
            pg_server.sql(pg_url, "DELETE FROM audit.events WHERE seq = 1")
    finally:
        again.close()


def _writer(url: str, tag: str, seconds: float, key_pem: bytes, done: mp.Queue) -> None:
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    log = AuditLog(
        Path("/nonexistent/unused.sqlite"), NODE, database=_db(url), checkpoint_every=50,
        signer=lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())),
    )  # fmt: skip
    count, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        log.record(TRANSFER_QUEUED, actor=f"node:{tag}", object_id=f"{count:064x}")
        count += 1
    log.close()
    done.put((tag, count))


def test_four_processes_append_to_one_intact_chain(
    pg_url: str, pg_server: PgServer, key: ec.EllipticCurvePrivateKey,
    verifier: Callable[[bytes, bytes], None],
) -> None:  # fmt: skip
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    ctx = mp.get_context("spawn")
    done: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(pg_url, f"w{i}", SECONDS, key_pem, done))
        for i in range(WRITERS)
    ]
    for p in procs:
        p.start()
    reported = dict(done.get(timeout=SECONDS + 60) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    db = _db(pg_url)
    try:
        report = verify_log(db, NODE, verify_signature=verifier)
        assert report.ok, report.reason
        events = read_events(db, limit=100_000)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # no gap
        per_writer = Counter(e.actor for e in events if e.event == TRANSFER_QUEUED)
        assert per_writer == {f"node:{tag}": n for tag, n in reported.items()}
        assert all(n > 0 for n in reported.values())
        assert report.checkpoints >= WRITERS  # each signed its start-up/stop checkpoint
        # an edited row of that chain is still named
        middle = len(events) // 2
        pg_server.sql(pg_url, "ALTER TABLE audit.events DISABLE TRIGGER ALL")
        pg_server.sql(pg_url, f"UPDATE audit.events SET actor = 'node:x' WHERE seq = {middle}")
        tampered = verify_log(db, NODE, verify_signature=verifier)
        assert not tampered.ok and tampered.first_bad_seq == middle, tampered.reason
    finally:
        db.close()
    print(f"\n{WRITERS} writers, {SECONDS:g} s: {len(events)} entries "
          f"({len(events) / SECONDS:.0f}/s), {report.checkpoints} checkpoints")  # fmt: skip


def test_witness_store_and_config_reads_on_postgresql(
    pglog: AuditLog, pg_url: str, tmp_path: Path
) -> None:
    from gateway.audit_witness import WitnessStore, count_witnessed

    store = WitnessStore(tmp_path / "unused.sqlite", pglog)
    with pglog.db.transaction() as conn:  # what _store writes, without a peer's RPC
        conn.execute(
            "INSERT INTO witnessed (node_id, seq, time, head_hash, signature, certificate,"
            " received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("hospital-1", 5, "t", "a" * 64, b"sig", b"cert", "t"),
        )
    assert count_witnessed(pglog.db, "hospital-1") == 1
    with pytest.raises(psycopg.errors.RaiseException, match="DELETE of witnessed"):
        psycopg.connect(pg_url, autocommit=True).execute("DELETE FROM audit.witnessed")
    store.close()
