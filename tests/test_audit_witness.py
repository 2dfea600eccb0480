"""Peer witnessing of audit checkpoints: cut tails, re-signed rewrites and crashes are caught.

A cut tail, a log rewritten and re-signed with the node's own key, and the entries a
crash left are all caught by `audit verify --with-peers`, which names the checkpoint the
peer witnessed. Also the officer's CLI output (list --follow, reconcile, check)."""

from __future__ import annotations

import json
import queue
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import pki
from gateway.audit import (
    QUERY,
    Checkpoint,
    checkpoint_signing_bytes,
    read_events,
    verify_log,
)
from gateway.config import load_config
from gateway.errors import ConfigError, PermissionDenied, ValidationError
from gateway.rpc.client import NodeClient
from gateway.rpc.witness import GrpcWitnessLink
from tests.cluster import (
    Federation,
    InProcessNode,
    NodeProcess,
    pin_port,
    wait_for,
    write_config,
)
from tests.test_audit import rehash_from
from yigong_node.cli import main

FAST = "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n"
WITNESS_FAST = FAST + "[audit]\ncheckpoint_seconds = 0.3\n"
OLD_DEFAULTS = FAST + "[audit]\ncheckpoint_every = 1000\ncheckpoint_seconds = 3600\n"

Pair = tuple[InProcessNode, InProcessNode]


@pytest.fixture
def nodes(federation: Federation, tmp_path: Path) -> Iterator[Pair]:
    """A factory, and a hospital that hands it its checkpoints every 0.3 s."""
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory", extra=FAST))
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-1": factory.address},
            extra=WITNESS_FAST,
        )
    )
    yield hospital, factory
    hospital.stop()
    factory.stop()


def witnessed_seqs(factory: InProcessNode, node_id: str = "hospital-1") -> list[int]:
    """The checkpoints of ``node_id`` the factory holds, read straight from its database."""
    db = sqlite3.connect(factory.node.cfg.audit.path)
    try:
        rows = db.execute(
            "SELECT seq FROM witnessed WHERE node_id = ? ORDER BY seq", (node_id,)
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    return [r[0] for r in rows]


def head_of(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])
    finally:
        db.close()


def record_queries(node: InProcessNode, n: int) -> None:
    for i in range(n):
        node.node.audit.record(QUERY, actor="officer:olga@hospital-1", details={"query": f"q{i}"})


def tamper(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Edit the log as someone with write access: drop the triggers, change rows."""
    db = sqlite3.connect(path)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    for sql, args in statements:
        db.execute(sql, args)
    db.commit()
    db.close()


def cut_tail(path: Path, keep: int) -> None:
    """Delete every entry after ``keep`` and the checkpoints that would betray it."""
    tamper(
        path,
        ("DELETE FROM events WHERE seq > ?", (keep,)),
        ("DELETE FROM checkpoints WHERE seq > ?", (keep,)),
    )


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(list(argv))
    return code, capsys.readouterr().out.strip().splitlines()


# --- a cut tail ------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [1, 500])
def test_cut_tail_passes_local_verify_but_fails_against_the_peer_that_witnessed_it(
    nodes: Pair, capsys: pytest.CaptureFixture[str], cut: int
) -> None:
    hospital, factory = nodes
    record_queries(hospital, 600)
    hospital.stop()  # the stop checkpoint covers node.stop and is handed to the factory
    path = hospital.node.cfg.audit.path
    head = head_of(path)
    assert witnessed_seqs(factory)[-1] == head
    cut_tail(path, head - cut)
    cfg = str(hospital.config)

    code, out = cli(capsys, "audit", "verify", "--config", cfg)
    assert code == 0 and out[0].startswith("OK: ")  # alone, the log looks like a crash

    code, out = cli(capsys, "audit", "verify", "--config", cfg, "--with-peers")
    assert code == 1
    assert out[-1] == (
        f"FAILED: audit log {path}: log truncated: checkpoint at entry {head} (witnessed by "
        f"factory-1) but log ends at entry {head - cut} (first bad entry: {head - cut + 1})"
    )
    assert out[0].startswith(f"factory-1 witnessed {len(witnessed_seqs(factory))} checkpoint(s)")


def test_peer_holds_checkpoints_of_a_running_node_seconds_behind_its_head(nodes: Pair) -> None:
    """Time-based checkpoints: a running node's entries are witnessed within seconds.

    No need to wait for `checkpoint_every` entries."""
    hospital, factory = nodes
    record_queries(hospital, 7)
    head = head_of(hospital.node.cfg.audit.path)
    wait_for(lambda: witnessed_seqs(factory) and witnessed_seqs(factory)[-1] >= head, 30)
    assert head < hospital.node.cfg.audit.checkpoint_every


def test_checkpoints_signed_while_the_peer_was_down_are_handed_over_when_it_is_back(
    federation: Federation, tmp_path: Path
) -> None:
    factory_cfg = write_config(federation, tmp_path, "factory-1", "factory", extra=FAST)
    factory = InProcessNode(factory_cfg)
    port = factory.port
    factory.stop()
    pin_port(factory_cfg, port)
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-1": f"127.0.0.1:{port}"},
            extra=WITNESS_FAST,
        )
    )
    try:
        record_queries(hospital, 250)
        path = hospital.node.cfg.audit.path
        wait_for(lambda: hospital.node.audit.checkpoints(after_seq=head_of(path) - 1), 30)
        assert hospital.node.witness_sender.held("factory-1") is None  # nobody to hand them to
        factory = InProcessNode(factory_cfg)  # back, same address
        signed = [c.seq for c in hospital.node.audit.checkpoints(limit=10_000)]
        wait_for(lambda: set(signed) <= set(witnessed_seqs(factory)), 60, what="back-fill")
        assert len(signed) >= 3  # count-based ones (every 100 entries) and timed ones
    finally:
        hospital.stop()
        factory.stop()


# --- a rewrite re-signed with the node's own key -------------------------------------------
def test_rewrite_re_signed_with_the_node_key_is_caught_by_the_peer(
    nodes: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, factory = nodes
    record_queries(hospital, 30)
    hospital.stop()
    cfg = hospital.node.cfg
    path = cfg.audit.path
    held = witnessed_seqs(factory)
    assert held and held[-1] == head_of(path)
    # the attacker on the node host: edit entry 5, rehash the chain, re-sign every checkpoint
    key = pki.load_private_key(cfg.tls.key)
    db = sqlite3.connect(path)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("UPDATE events SET actor = 'officer:nobody@hospital-1' WHERE seq = 5")
    rehash_from(db, 5)
    for seq, head in db.execute("SELECT seq, head_hash FROM checkpoints").fetchall():
        new_head = db.execute("SELECT entry_hash FROM events WHERE seq = ?", (seq,)).fetchone()[0]
        assert new_head != head or seq < 5
        signature = pki.sign(key, checkpoint_signing_bytes("hospital-1", seq, new_head))
        db.execute(
            "UPDATE checkpoints SET head_hash = ?, signature = ? WHERE seq = ?",
            (new_head, signature, seq),
        )
    db.commit()
    db.close()
    code, out = cli(capsys, "audit", "verify", "--config", str(hospital.config))
    assert code == 0, out  # consistent and correctly signed: alone, verify cannot tell

    code, out = cli(capsys, "audit", "verify", "--config", str(hospital.config), "--with-peers")
    first = min(s for s in held if s >= 5)
    assert code == 1
    assert out[-1] == (
        f"FAILED: audit log {path}: checkpoint at entry {first} (witnessed by factory-1): signed "
        f"head hash does not match the log (rewritten after it was signed) "
        f"(first bad entry: {first})"
    )
    # handing the peer the re-signed checkpoint is refused and alerted there
    new_head = verify_log(path, "hospital-1")  # still OK locally
    assert new_head.ok
    db = sqlite3.connect(path)
    seq, head, sig = db.execute(
        "SELECT seq, head_hash, signature FROM checkpoints WHERE seq = ?", (held[-1],)
    ).fetchone()
    db.close()
    link = GrpcWitnessLink("factory-1", factory.address, hospital.node.client_credentials)
    try:
        forged = Checkpoint("hospital-1", seq, "2026-01-01T00:00:00.000000Z", head, sig)
        with pytest.raises(ValidationError, match="the log was rewritten; refused and alerted"):
            link.witness([forged], 10.0)
    finally:
        link.close()
    alerts = factory.node.audit.events(event="security.alert")
    assert alerts[-1].details["reason"] == "conflicting witnessed checkpoint"
    assert alerts[-1].details["checkpoint_seq"] == seq and alerts[-1].peer == "hospital-1"


# --- a crash before the first count-based checkpoint ---------------------------------------
def test_entries_a_crash_left_are_signed_at_restart_and_witnessed(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory", extra=FAST))
    config = write_config(
        federation,
        tmp_path,
        "hospital-1",
        "hospital",
        peers={"factory-1": factory.address},
        extra=OLD_DEFAULTS,  # 1000 entries / an hour: the first count-based one never comes
    )
    path = load_config(config).audit.path
    hospital = NodeProcess(config, tmp_path / "hospital.log")
    try:
        hospital.start()
        creds = federation.creds(federation.person("olga", "officer", "hospital-1"))
        with NodeClient(hospital.address, creds, node_id="hospital-1") as client:
            for _ in range(40):
                client.list_objects()  # each one is an audited query
        crash_head = head_of(path)
        assert crash_head >= 40
        before = witnessed_seqs(factory)
        assert not before or before[-1] < crash_head  # nothing covers the queries yet
        hospital.kill()  # SIGKILL: no stop checkpoint
        db = sqlite3.connect(path)
        signed = [r[0] for r in db.execute("SELECT seq FROM checkpoints")]
        db.close()
        assert all(s < crash_head for s in signed)

        hospital.start()  # the start-up checkpoint covers the crash's entries...
        db = sqlite3.connect(path)
        assert db.execute("SELECT 1 FROM checkpoints WHERE seq = ?", (crash_head,)).fetchone()
        db.close()
        # ...and is handed to the peer at once
        wait_for(lambda: crash_head in witnessed_seqs(factory), 30, what="start-up checkpoint")
        starts = read_events(path, event="node.start")
        assert [e.details["previous_stop"] for e in starts] == ["first start", "crash"]
        assert starts[-1].details["previous_head"] == crash_head
        hospital.kill()
        cut_tail(path, crash_head - 10)  # remove the last ten queries of the first run
        code, out = cli(capsys, "audit", "verify", "--config", str(config))
        assert code == 0, out
        code, out = cli(capsys, "audit", "verify", "--config", str(config), "--with-peers")
        assert code == 1
        newest = witnessed_seqs(factory)[-1]
        assert newest >= crash_head
        assert out[-1] == (
            f"FAILED: audit log {path}: log truncated: checkpoint at entry {newest} (witnessed "
            f"by factory-1) but log ends at entry {crash_head - 10} (first bad entry: "
            f"{crash_head - 9})"
        )
    finally:
        hospital.kill()
        factory.stop()


# --- malformed rows, refusals --------------------------------------------------------------
def test_malformed_checkpoint_row_is_named_not_a_crash(
    nodes: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = nodes
    record_queries(hospital, 5)
    hospital.stop()
    path = hospital.node.cfg.audit.path
    head = head_of(path)
    tamper(path, ("UPDATE checkpoints SET head_hash = 'not-a-hash' WHERE seq = ?", (head,)))
    rowid = head  # seq is the checkpoints table's rowid
    code, out = cli(capsys, "audit", "verify", "--config", str(hospital.config))
    assert code == 1
    assert out == [
        f"FAILED: audit log {path}: checkpoint row {rowid} (seq {head}): malformed — head_hash "
        f"is not 64 lowercase hex digits (edited outside the gateway) (first bad entry: {head})"
    ]
    tamper(path, ("UPDATE checkpoints SET signature = 'text' WHERE seq = ?", (head,)))
    code, out = cli(capsys, "audit", "verify", "--config", str(hospital.config))
    assert code == 1 and "malformed" in out[0]
    assert main(["audit", "checkpoint", "--config", str(hospital.config)]) == 2
    assert "is malformed; run 'yigong audit verify'" in capsys.readouterr().err


def test_peer_refuses_checkpoints_of_another_node_and_forged_signatures(nodes: Pair) -> None:
    hospital, factory = nodes
    record_queries(hospital, 3)
    cp = hospital.node.audit.checkpoint()
    assert cp is not None
    link = GrpcWitnessLink("factory-1", factory.address, hospital.node.client_credentials)
    try:
        other = Checkpoint("hospital-2", cp.seq, cp.time, cp.head_hash, cp.signature)
        with pytest.raises(PermissionDenied, match="only its own audit checkpoints"):
            link.witness([other], 10.0)
        forged = Checkpoint("hospital-1", cp.seq + 1000, cp.time, cp.head_hash, cp.signature)
        with pytest.raises(ValidationError, match="signature does not verify"):
            link.witness([forged], 10.0)
        with pytest.raises(PermissionDenied, match="only the checkpoints it handed over"):
            link.witnessed("factory-1")
    finally:
        link.close()
    assert cp.seq + 1000 not in witnessed_seqs(factory)
    alert = factory.node.audit.events(event="security.alert")[-1]
    assert alert.details["reason"] == "witnessed checkpoint signature does not verify"


def test_audit_checkpoint_seconds_is_validated(federation: Federation, tmp_path: Path) -> None:
    config = write_config(
        federation, tmp_path, "hospital-1", "hospital", extra="[audit]\ncheckpoint_seconds = 0"
    )
    with pytest.raises(ConfigError, match=r"0.1 <= audit.checkpoint_seconds <= 3600"):
        load_config(config)


def test_witnessing_can_be_switched_off(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory", extra=FAST))
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-1": factory.address},
            extra=WITNESS_FAST + "witness = false\n",
        )
    )
    try:
        record_queries(hospital, 3)
        hospital.stop()
        assert witnessed_seqs(factory) == []
        code, out = cli(capsys, "audit", "verify", "--config", str(hospital.config), "--with-peers")
        assert code == 0
        assert out[0] == "factory-1 has witnessed no checkpoint of hospital-1 yet"
        assert out[1].endswith("entries from 1 on witnessed by no peer yet")
    finally:
        hospital.stop()
        factory.stop()


# --- the officer's CLI ---------------------------------------------------------------------
LIST = [sys.executable, "-m", "yigong_node", "audit", "list", "--config"]


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return out


def _take(lines: queue.Queue[str], n: int) -> list[str]:
    return [lines.get(timeout=60) for _ in range(n)]


def test_follow_shows_the_last_ten_events_then_new_ones_in_aligned_columns(
    nodes: Pair,
) -> None:
    hospital, _ = nodes
    record_queries(hospital, 30)
    head = head_of(hospital.node.cfg.audit.path)
    proc = subprocess.Popen(
        [*LIST, str(hospital.config), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _lines(proc)
        first = _take(lines, 11)
        header, rows = first[0], first[1:]
        assert header.startswith("SEQ")
        assert [int(r.split()[0]) for r in rows] == list(range(head - 9, head + 1))
        hospital.node.audit.record("case.record", actor="clinician:li@hospital-1", case_id="c-1")
        hospital.node.audit.record(QUERY, actor="engineer:a-much-longer-name@hospital-1")
        new = _take(lines, 2)
        assert [int(r.split()[0]) for r in new] == [head + 1, head + 2]
        assert "case.record" in new[0] and "clinician:li@hospital-1" in new[0]
        column = header.index("EVENT"), header.index("ACTOR")
        for row in (*rows, *new):
            assert row[column[0] - 2 : column[0]] == "  " and row[column[0]] != " ", row
            assert row[column[1] - 2 : column[1]] == "  " and row[column[1]] != " ", row
    finally:
        proc.terminate()
        proc.wait(10)


def test_follow_with_limit_shows_that_many_then_follows(
    nodes: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = nodes
    record_queries(hospital, 5)
    head = head_of(hospital.node.cfg.audit.path)
    proc = subprocess.Popen(
        [*LIST, str(hospital.config), "--follow", "--limit", "3", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _lines(proc)
        assert [json.loads(x)["seq"] for x in _take(lines, 3)] == [head - 2, head - 1, head]
        record_queries(hospital, 1)
        assert json.loads(_take(lines, 1)[0])["seq"] == head + 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_reconcile_says_when_there_are_no_peers(
    nodes: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    _, factory = nodes
    code, out = cli(capsys, "audit", "reconcile", "--config", str(factory.config))
    assert code == 0
    assert out == [
        f"factory-1 has no peers configured ([[peers]] in {factory.config}): nothing to reconcile"
    ]


def test_reconcile_reports_a_log_cut_below_what_the_peer_witnessed(
    nodes: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = nodes
    record_queries(hospital, 20)
    hospital.stop()
    head = head_of(hospital.node.cfg.audit.path)
    cut_tail(hospital.node.cfg.audit.path, head - 3)
    code, out = cli(capsys, "audit", "reconcile", "--config", str(hospital.config))
    assert code == 1
    assert out[0] == "hospital-1 <-> factory-1: records agree"
    assert out[1] == (
        f"hospital-1 <-> factory-1: audit log FAILED: log truncated: checkpoint at entry {head} "
        f"(witnessed by factory-1) but log ends at entry {head - 3}"
    )


def test_check_prints_one_clean_verdict_line(
    nodes: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = nodes
    record_queries(hospital, 4)
    hospital.node.audit.checkpoint()
    cp_file = tmp_path / "cp.json"
    assert main(["audit", "checkpoint", "--config", str(hospital.config), "-o", str(cp_file)]) == 0
    seq = int(capsys.readouterr().out.split("entry ")[1].split()[0])
    code, out = cli(capsys, "audit", "check", str(cp_file), "--config", str(hospital.config))
    assert code == 0 and len(out) == 1
    assert out[0].startswith(f"OK: audit log {hospital.node.cfg.audit.path}: ")
    assert f"still contains exactly what {cp_file} signed (entry {seq})" in out[0]
    assert "ok:" not in out[0]


def test_verify_shows_progress_on_stderr_and_quiet_silences_it(
    nodes: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    """A verification is long work: progress goes to stderr (plain lines when not a
    terminal), the verdict alone to stdout; --quiet leaves stderr empty."""
    hospital, _ = nodes
    record_queries(hospital, 3)
    config = str(hospital.config)
    assert main(["audit", "verify", "--config", config]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: ") and len(out.splitlines()) == 1
    entries = int(out.split(" entries")[0].rsplit(" ", 1)[1])
    assert f"verify audit log: 100% ({entries} of {entries} entries)" in err
    assert err.splitlines()[-1].endswith(", ok")
    assert main(["audit", "verify", "--config", config, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK: ") and err == ""
