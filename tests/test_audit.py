"""The audit log: append-only, hash-chained, signed; tampering is detected and named."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import audit
from gateway.audit import AuditLog
from gateway.db import Database, open_database
from gateway.errors import AuditError

NODE = "hospital-1"
Signer = Callable[[bytes], bytes]
Verifier = Callable[[bytes, bytes], None]



@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.sqlite"


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | Database]:
    """The log's store on either engine: an SQLite file, or a PostgreSQL database (schema
    ``audit``) that outlives the AuditLog objects opened on it."""
    if request.param == "sqlite":
        yield tmp_path / "audit" / "audit.sqlite"
        return
    url = request.getfixturevalue("pg_url")
    db = open_database(url, Path("-"), AuditError, schema="audit", label="audit log")
    yield db
    db.close()


def stored(where: Path | Database, sql: str) -> list[Any]:
    """Rows of one read of the store, on either engine."""
    if isinstance(where, Database):
        return [tuple(r) for r in where.query(sql)]
    with closing(sqlite3.connect(where)) as conn:
        return list(conn.execute(sql))


def fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record(
            audit.OBJECT_STORED,
            actor="node:hospital-1",
            object_id=f"obj-{i}",
            transfer_id=f"tr-{i % 3}",
            peer="factory-1",
            case_id="case-7",
            details={"sha256": hashlib.sha256(str(i).encode()).hexdigest(), "size": i},
        )


def make_log(path: Path, signer: Callable[[bytes], bytes], n: int, **kw: int) -> AuditLog:
    """An open log with ``n`` entries and a signed checkpoint at ``n``."""
    log = AuditLog(path, NODE, signer=signer, **kw)
    fill(log, n)
    assert log.checkpoint() is not None
    return log


@contextmanager
def tamper(path: Path) -> Iterator[sqlite3.Connection]:
    """A raw connection of someone who drops the append-only triggers first."""
    conn = sqlite3.connect(path)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    yield conn
    conn.commit()
    conn.close()


def spec_hash(prev: str, row: tuple[object, ...]) -> str:
    """entry_hash as the design states it, computed independently of gateway.audit."""
    body = json.dumps(list(row), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()


COLS = "seq, time, event, actor, outcome, object_id, transfer_id, peer, case_id, details"


def rehash_from(conn: sqlite3.Connection, start: int) -> None:
    """Recompute prev_hash/entry_hash from ``start`` on, as a careful attacker would."""
    prev = conn.execute("SELECT entry_hash FROM events WHERE seq = ?", (start - 1,)).fetchone()[0]
    for row in conn.execute(f"SELECT {COLS} FROM events WHERE seq >= ? ORDER BY seq", (start,)):
        new = spec_hash(prev, row)
        conn.execute(
            "UPDATE events SET prev_hash = ?, entry_hash = ? WHERE seq = ?", (prev, new, row[0])
        )
        prev = new


# --- an honest log -------------------------------------------------------------------------
def test_untouched_log_verifies_with_signed_checkpoints(
    where: Path | Database, signer: Signer, verifier: Verifier
) -> None:
    with AuditLog(where, NODE, signer=signer, checkpoint_every=10) as log:
        fill(log, 25)
        report = log.verify(verifier)
    assert report.ok, report.reason
    assert (report.entries, report.checkpoints, report.first_bad_seq) == (25, 2, None)
    report = log.verify(verifier)  # verify also works on a closed log
    assert report.ok and report.checkpoints == 3  # closing added a checkpoint at 25
    assert audit.verify_log(where, NODE, verify_signature=verifier) == report


def test_long_verification_reports_its_progress(
    path: Path, signer: Signer, verifier: Verifier
) -> None:
    """A verification of a long log reports entries checked against the total (for the
    CLI's progress bar), every audit.PROGRESS_EVERY entries."""
    n = 2 * audit.PROGRESS_EVERY + 7
    with AuditLog(path, NODE, signer=signer) as log, log.batch():
        for i in range(n):
            log.record("query", actor="person:alice", details={"query": f"q{i}"})
    seen: list[tuple[int, int]] = []
    report = audit.verify_log(
        path, NODE, verify_signature=verifier, progress=lambda d, t: seen.append((d, t))
    )
    assert report.ok and report.entries == n
    assert seen == [(audit.PROGRESS_EVERY, n), (2 * audit.PROGRESS_EVERY, n)]


def test_stored_format_is_the_documented_one(path: Path, signer: Signer) -> None:
    log = make_log(path, signer, 3)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == audit.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    prev = hashlib.sha256(f"yigong-audit-genesis:{NODE}".encode()).hexdigest()
    rows = conn.execute(f"SELECT {COLS}, prev_hash, entry_hash FROM events ORDER BY seq")
    for row in rows.fetchall():
        assert row[10] == prev and row[11] == spec_hash(prev, row[:10])
        digest = hashlib.sha256(str(row[0] - 1).encode()).hexdigest()
        assert row[9] == f'{{"sha256":"{digest}","size":{row[0] - 1}}}'  # canonical JSON
        assert datetime.strptime(row[1], "%Y-%m-%dT%H:%M:%S.%fZ")
        prev = row[11]
    seq, head, sig = conn.execute("SELECT seq, head_hash, signature FROM checkpoints").fetchone()
    assert (seq, head) == (3, prev) and isinstance(sig, bytes)
    assert audit.checkpoint_signing_bytes(NODE, 3, head) == (
        f"yigong-audit-checkpoint\n{NODE}\n3\n{head}".encode()
    )
    conn.close()
    log.close()


def test_record_is_durable_and_the_chain_continues_after_reopen(path: Path, signer: Signer) -> None:
    log = AuditLog(path, NODE, signer=signer)
    assert int(log.db.query("PRAGMA synchronous")[0][0]) == 2  # FULL: durable at commit
    assert log.record(audit.NODE_START) == 1
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditError, match="closed"):
        log.record(audit.NODE_STOP)
    with AuditLog(path, NODE, signer=signer) as log:
        assert log.record(audit.NODE_STOP) == 2
    assert log.verify().ok


def test_log_of_another_node_is_refused(where: Path | Database) -> None:
    AuditLog(where, NODE).close()
    with pytest.raises(AuditError, match="belongs to node 'hospital-1'"):
        AuditLog(where, "factory-1")


# --- tampering -----------------------------------------------------------------------------
def test_flipped_byte_in_details_is_named(path: Path, signer: Signer, verifier: Verifier) -> None:
    log = make_log(path, signer, 30)
    with tamper(path) as conn:
        (details,) = conn.execute("SELECT details FROM events WHERE seq = 17").fetchone()
        flipped = details.replace('"size":16', '"size":18')
        assert flipped != details
        conn.execute("UPDATE events SET details = ? WHERE seq = 17", (flipped,))
    report = log.verify(verifier)
    assert not report.ok and report.first_bad_seq == 17
    assert report.reason == "entry 17: content does not match its hash (edited)"
    log.close()


def test_edit_with_recomputed_hash_is_caught_at_the_link(path: Path, signer: Signer) -> None:
    log = make_log(path, signer, 30)
    with tamper(path) as conn:
        conn.execute("UPDATE events SET actor = 'someone-else' WHERE seq = 17")
        prev = conn.execute("SELECT entry_hash FROM events WHERE seq = 16").fetchone()[0]
        row = conn.execute(f"SELECT {COLS} FROM events WHERE seq = 17").fetchone()
        conn.execute("UPDATE events SET entry_hash = ? WHERE seq = 17", (spec_hash(prev, row),))
    report = log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 17)
    assert report.reason.startswith("entry 17: rewritten")
    log.close()


def test_deleted_entry_is_named(path: Path, signer: Signer) -> None:
    log = make_log(path, signer, 30)
    with tamper(path) as conn:
        conn.execute("DELETE FROM events WHERE seq = 18")
    report = log.verify()
    assert (report.ok, report.first_bad_seq, report.entries) == (False, 18, 29)
    assert report.reason.startswith("entry 18: missing (deleted)")
    assert "previous entry is 17" in report.reason
    log.close()


def test_deleted_first_entries_are_named(path: Path, signer: Signer) -> None:
    log = make_log(path, signer, 10)
    with tamper(path) as conn:
        conn.execute("DELETE FROM events WHERE seq <= 2")
    report = log.verify()
    assert report.first_bad_seq == 1
    assert report.reason == "entries 1-2: missing (deleted) — entry 3 follows, log starts there"
    log.close()


def test_swapped_entries_are_reported_as_reordered(path: Path, signer: Signer) -> None:
    log = make_log(path, signer, 30)
    cols = "time, event, actor, outcome, object_id, transfer_id, peer, case_id, details, "
    cols += "prev_hash, entry_hash"
    with tamper(path) as conn:
        a = conn.execute(f"SELECT {cols} FROM events WHERE seq = 10").fetchone()
        b = conn.execute(f"SELECT {cols} FROM events WHERE seq = 11").fetchone()
        sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
        conn.execute(f"UPDATE events SET {sets} WHERE seq = 10", b)
        conn.execute(f"UPDATE events SET {sets} WHERE seq = 11", a)
    report = log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 10)
    assert report.reason == "entry 10: holds the entry recorded as 11 (reordered)"
    log.close()


def test_inserted_entry_is_named(path: Path, signer: Signer) -> None:
    log = make_log(path, signer, 20)
    with tamper(path) as conn:
        conn.execute("UPDATE events SET seq = -seq - 1 WHERE seq >= 10")
        conn.execute("UPDATE events SET seq = -seq WHERE seq < 0")
        prev = conn.execute("SELECT entry_hash FROM events WHERE seq = 9").fetchone()[0]
        row = (10, "2020-01-01T00:00:00.000000Z", "query", "forger", "success", None, None,
               None, None, "{}")  # fmt: skip
        conn.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*row, prev, spec_hash(prev, row)),
        )
    report = log.verify()
    assert (report.ok, report.first_bad_seq) == (False, 10)
    assert report.reason == "entry 10: inserted — the entry recorded as 10 now sits at 11"
    log.close()


def test_truncated_log_is_detected_by_its_checkpoint(
    path: Path, signer: Signer, verifier: Verifier
) -> None:
    log = make_log(path, signer, 40)  # close() signs a checkpoint at 40
    with tamper(path) as conn:
        conn.execute("DELETE FROM events WHERE seq > 31")
    report = log.verify(verifier)
    assert (report.ok, report.first_bad_seq) == (False, 32)
    assert report.reason == "log truncated: checkpoint at entry 40 but log ends at entry 31"
    with pytest.raises(AuditError, match="refusing to sign a checkpoint: log truncated"):
        log.checkpoint()
    log.close()


def test_rewritten_log_contradicts_its_signed_checkpoint(
    path: Path, signer: Signer, verifier: Verifier
) -> None:
    log = make_log(path, signer, 20, checkpoint_every=10)
    with tamper(path) as conn:
        conn.execute("UPDATE events SET peer = 'elsewhere' WHERE seq = 5")
        rehash_from(conn, 5)
    report = log.verify(verifier)
    assert (report.ok, report.first_bad_seq) == (False, 10)
    assert report.reason.startswith("checkpoint at entry 10: signed head hash does not match")
    log.record(audit.QUERY)  # the node never signs a head that does not extend its last one
    with pytest.raises(AuditError, match="refusing to sign a checkpoint: entry 20: rewritten"):
        log.checkpoint()
    log.close()


def test_tampered_checkpoint_signature_is_detected(
    path: Path, signer: Signer, verifier: Verifier
) -> None:
    log = make_log(path, signer, 20, checkpoint_every=10)
    with tamper(path) as conn:
        (sig,) = conn.execute("SELECT signature FROM checkpoints WHERE seq = 10").fetchone()
        bad = bytes([sig[0], sig[1], sig[2], sig[3] ^ 0x01]) + sig[4:]
        conn.execute("UPDATE checkpoints SET signature = ? WHERE seq = 10", (bad,))
    report = log.verify(verifier)
    assert (report.ok, report.first_bad_seq) == (False, 10)
    assert report.reason.startswith("checkpoint at entry 10: signature does not verify")
    assert log.verify().ok  # without a verifier checkpoints are consistency checks only
    log.close()


def test_triggers_refuse_update_delete_and_foreign_inserts(path: Path, signer: Signer) -> None:
    log = make_log(path, signer, 5)
    conn = sqlite3.connect(path)
    for sql, text in [
        ("UPDATE events SET actor = 'x' WHERE seq = 2", "UPDATE of events is not allowed"),
        ("DELETE FROM events WHERE seq = 5", "DELETE of events is not allowed"),
        ("UPDATE checkpoints SET head_hash = 'x'", "UPDATE of checkpoints is not allowed"),
        ("DELETE FROM checkpoints", "DELETE of checkpoints is not allowed"),
        ("DELETE FROM meta", "DELETE of meta is not allowed"),
        (
            "INSERT INTO events VALUES (9, 't', 'query', NULL, 'success', NULL, NULL, NULL,"
            " NULL, '{}', 'x', 'y')",
            "a new entry must extend the chain",
        ),
    ]:
        with pytest.raises(sqlite3.IntegrityError, match=f"audit log is append-only: {text}"):
            conn.execute(sql)
    conn.close()
    assert log.verify().ok
    log.close()


def test_dropped_triggers_are_restored_and_alerted_on_open(path: Path, signer: Signer) -> None:
    make_log(path, signer, 3).close()
    with tamper(path):
        pass
    with AuditLog(path, NODE, signer=signer) as log:
        alerts = log.events(event=audit.SECURITY_ALERT)
        assert [(a.seq, a.outcome, a.details["restored"]) for a in alerts] == [(4, "failure", 7)]
        assert log.verify().ok
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("DELETE FROM events")


# --- exported checkpoints ------------------------------------------------------------------
def test_exported_checkpoint_holds_for_a_grown_log_not_a_rewritten_one(
    path: Path, signer: Signer, verifier: Verifier
) -> None:
    log = AuditLog(path, NODE, signer=signer)
    fill(log, 20)
    exported = json.loads(json.dumps(log.export_checkpoint()))
    assert exported["seq"] == 20 and exported["node_id"] == NODE
    fill(log, 10)
    report = log.check_against_checkpoint(exported, verifier)
    assert report.ok and report.entries == 30, report.reason
    # someone with write access rewrites entry 5 and everything after it, and drops checkpoints
    with tamper(path) as conn:
        conn.execute("UPDATE events SET actor = 'nobody' WHERE seq = 5")
        rehash_from(conn, 5)
        conn.execute("DELETE FROM checkpoints")
    assert log.verify().ok  # locally consistent: only the exported checkpoint can tell
    report = log.check_against_checkpoint(exported, verifier)
    assert (report.ok, report.first_bad_seq) == (False, 20)
    assert "signed head hash does not match the log" in report.reason
    forged = dict(exported, signature="00" + exported["signature"][2:])
    assert "signature does not verify" in log.check_against_checkpoint(forged, verifier).reason
    with pytest.raises(AuditError, match="malformed"):
        log.check_against_checkpoint({"seq": 1})
    log.close()


def test_exported_checkpoint_detects_truncation(path: Path, signer: Signer) -> None:
    with AuditLog(path, NODE, signer=signer) as log:
        fill(log, 10)
        exported = log.export_checkpoint()
        with tamper(path) as conn:
            conn.execute("DELETE FROM events WHERE seq > 6")
            conn.execute("DELETE FROM checkpoints")
        assert log.verify().ok
        report = log.check_against_checkpoint(exported)
    assert (report.ok, report.first_bad_seq) == (False, 7)
    assert report.reason == (
        "log truncated: checkpoint at entry 10 (exported) but log ends at entry 6"
    )


def test_checkpoints_without_a_signer(where: Path | Database) -> None:
    with AuditLog(where, NODE) as log:
        fill(log, 3)
        assert log.checkpoint() is None
        with pytest.raises(AuditError, match="no signer"):
            log.export_checkpoint()


def test_automatic_checkpoints(where: Path | Database, signer: Signer, verifier: Verifier) -> None:
    with AuditLog(where, NODE, signer=signer, checkpoint_every=10) as log:
        assert log.checkpoint() is None  # empty log
        fill(log, 25)
        first = log.checkpoint()
        assert first is not None and first.seq == 25
        assert log.checkpoint() == first  # head already covered: no duplicate
    assert [r[0] for r in stored(where, "SELECT seq FROM checkpoints")] == [10, 20, 25]


# --- what may go in ------------------------------------------------------------------------
def test_unknown_event_type_is_refused(path: Path) -> None:
    with AuditLog(path, NODE) as log:
        with pytest.raises(AuditError, match=re.escape("unknown audit event type 'object.stolen'")):
            log.record("object.stolen")
        with pytest.raises(AuditError, match="outcome must be 'success' or 'failure'"):
            log.record(audit.QUERY, outcome="maybe")
        assert log.events() == []
    assert "query" in audit.EVENT_TYPES and len(audit.EVENT_TYPES) >= 22


@pytest.mark.parametrize(
    "details, message",
    [
        ({"tags": ["a", "b"]}, r"details\['tags'\] is a list: values must be flat scalars"),
        ({"meta": {"a": 1}}, r"details\['meta'\] is a dict: values must be flat scalars"),
        ({"raw": b"\x00"}, r"details\['raw'\] is a bytes"),
        ({"x": float("nan")}, "only finite numbers"),
        ({"patient_name": "DOE^JOHN"}, "key 'patient_name' is not allowed: it names patient data"),
        ({"PatientID": "123"}, "key 'PatientID' is not allowed"),
        ({"Birth-Date": "19700101"}, "key 'Birth-Date' is not allowed"),
        ({"name": "x"}, "key 'name' is not allowed"),
        ({"address": "x"}, "key 'address' is not allowed"),
        ({"姓名": "张三"}, "key '姓名' is not allowed"),
        ({"file_name": "\ud800"}, "not valid Unicode"),
        ({"s": "x" * 5000}, "longer than 4096"),
    ],
)
def test_details_that_could_carry_patient_data_are_refused(
    path: Path, details: dict[str, Any], message: str
) -> None:
    with AuditLog(path, NODE) as log:
        with pytest.raises(AuditError, match=message):
            log.record(audit.DEID_APPLIED, details=details)
        assert log.events() == []


def test_events_are_filtered_and_paged(where: Path | Database) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    with AuditLog(where, NODE) as log:
        fill(log, 9)
        log.record(audit.AUTH_REFUSED, outcome="failure", peer="stranger", details={"x": None})
        assert [e.seq for e in log.events(transfer_id="tr-1")] == [2, 5, 8]
        assert [e.seq for e in log.events(event=audit.OBJECT_STORED, after_seq=6)] == [7, 8, 9]
        assert [e.seq for e in log.events(limit=2, after_seq=3)] == [4, 5]
        (refused,) = log.events(peer="stranger")
        assert (refused.event, refused.outcome, refused.details) == ("auth.refused", "failure",
                                                                     {"x": None})  # fmt: skip
        third = log.events(object_id="obj-2")[0]
        assert third.details == {"sha256": hashlib.sha256(b"2").hexdigest(), "size": 2}
        assert third.actor == "node:hospital-1" and third.case_id == "case-7"
        assert before < third.timestamp < datetime.now(UTC)
        assert len(log.events(since=before, until=datetime.now(UTC) + timedelta(1))) == 10
        assert log.events(until=before) == [] and log.events(actor="nobody") == []
        with pytest.raises(AuditError, match="no time zone"):
            log.events(since=datetime.now())
        with pytest.raises(AuditError, match="unknown audit event type"):
            log.events(event="nope")


def test_concurrent_records_form_one_valid_chain(
    where: Path | Database, signer: Signer, verifier: Verifier
) -> None:
    log = AuditLog(where, NODE, signer=signer, checkpoint_every=50)
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(200):
            seq = log.record(audit.QUERY, actor=f"engineer:e{n}@factory-1", details={"i": i})
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(1, 801))
    report = log.verify(verifier)
    assert report.ok and (report.entries, report.checkpoints) == (800, 16), report.reason
    log.close()
