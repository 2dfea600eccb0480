"""The security officer's view: listing, verifying and checkpointing the audit log with
the CLI, and reconciling shared transfers between two running nodes."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from tests.cluster import InProcessNode, wait_for
from tests.outbound_files import clean_pdf
from yigong_node.cli import main

Pair = tuple[InProcessNode, InProcessNode]


def _send(hospital: InProcessNode, tmp_path: Path, name: str) -> str:
    src = tmp_path / name
    src.write_bytes(clean_pdf(os.urandom(50_000)))  # what a hospital may send
    with hospital.self_client() as client:
        tid = client.submit(src, ["factory-1"], case_id="case-o").queued[0].transfer_id
    wait_for(lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done")
    return tid


def test_list_filter_and_follow_free_json(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    tid = _send(hospital, tmp_path, "a.bin")
    cfg = str(hospital.config)
    assert main(["audit", "list", "--config", cfg, "--transfer", tid, "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds == ["transfer.queued", "transfer.begun", "transfer.completed"]
    assert all(e["transfer_id"] == tid for e in events)
    assert main(["audit", "list", "--config", cfg, "--event", "node.start"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("SEQ") and "node.start" in table and "node:hospital-1" in table


def test_verify_detects_an_edited_entry(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    _send(hospital, tmp_path, "b.bin")
    cfg = str(hospital.config)
    assert main(["audit", "verify", "--config", cfg]) == 0
    assert "OK" in capsys.readouterr().out
    hospital.stop()  # the log is closed (and checkpointed); now someone edits it
    path = hospital.node.cfg.audit.path
    db = sqlite3.connect(path)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("UPDATE events SET actor = 'node:someone-else' WHERE seq = 3")
    db.commit()
    db.close()
    assert main(["audit", "verify", "--config", cfg]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "entry 3" in out and "first bad entry: 3" in out


def test_checkpoint_export_then_check(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    cfg = str(hospital.config)
    _send(hospital, tmp_path, "c.bin")
    hospital.node.audit.checkpoint()
    cp_file = tmp_path / "cp.json"
    assert main(["audit", "checkpoint", "--config", cfg, "-o", str(cp_file)]) == 0
    _send(hospital, tmp_path, "d.bin")  # the log grows
    assert main(["audit", "check", str(cp_file), "--config", cfg]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK")
    tampered = json.loads(cp_file.read_text())
    tampered["head_hash"] = "0" * 64
    cp_file.write_text(json.dumps(tampered))
    assert main(["audit", "check", str(cp_file), "--config", cfg]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_reconcile_silent_when_records_agree(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    _send(hospital, tmp_path, "e.bin")
    _send(hospital, tmp_path, "f.bin")
    assert main(["audit", "reconcile", "--config", str(hospital.config)]) == 0
    transfers, audit_log = capsys.readouterr().out.strip().splitlines()
    assert transfers == "hospital-1 <-> factory-1: records agree"
    assert audit_log.startswith("hospital-1 <-> factory-1: audit log matches the ")
    assert "checkpoint(s) factory-1 witnessed (newest at entry " in audit_log


def test_reconcile_reports_injected_discrepancies(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, factory = pair
    lost = _send(hospital, tmp_path, "g.bin")
    forged = _send(hospital, tmp_path, "h.bin")
    _send(hospital, tmp_path, "i.bin")  # this one stays in agreement
    with factory.node.catalog.transaction() as db:
        db.execute("DELETE FROM transfers WHERE transfer_id = ?", (lost,))
        db.execute(
            "UPDATE transfers SET receipt = ? WHERE transfer_id = ?",
            (hospital.node.catalog.get_transfer(lost, "outbound").receipt, forged),
        )
    assert main(["audit", "reconcile", "--config", str(hospital.config), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["factory-1"]
    kinds = {(f["kind"], f["transfer_id"]) for f in report if f["discrepancy"]}
    assert ("missing_at_peer", lost) in kinds
    assert ("receipt", forged) in kinds and ("signature", forged) in kinds
    assert {tid for _, tid in kinds} == {lost, forged}


def test_reconcile_compares_the_manifest_receipt_of_a_study_sent_as_one_batch(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch's objects have no receipt of their own: reconcile checks the batch's one
    manifest receipt instead — the same bytes on both nodes, signed by the receiver,
    listing exactly the transfers recorded here. A manifest swapped at the peer, then
    the same swap on both sides, are each reported; the agreeing batch is not."""
    from tests.test_batch_transfer import _batch_done, _submit

    hospital, factory = pair
    outbox = hospital.node.outbox
    batches = []
    for n in (3, 4):
        (tmp_path / f"b{n}").mkdir()
        objs = _submit(hospital, tmp_path / f"b{n}", n)
        bid = outbox.open_batch("factory-1", case_id="case-b", actor="test")
        for o in objs:
            outbox.queue(o, "factory-1", actor="test", batch_id=bid)
        outbox.seal_batch(bid, expected=n)
        wait_for(lambda bid=bid: _batch_done(hospital, bid, "outbound"), what="batch done")
        batches.append(bid)
    cfg = str(hospital.config)
    assert main(["audit", "reconcile", "--config", cfg]) == 0
    assert capsys.readouterr().out.startswith("hospital-1 <-> factory-1: records agree")

    good, bad = batches
    with factory.node.catalog.transaction() as db:  # the peer now holds another manifest
        db.execute(
            "UPDATE batches SET receipt = ? WHERE batch_id = ?",
            (hospital.node.catalog.get_batch(good, "outbound").receipt, bad),
        )
    assert main(["audit", "reconcile", "--config", cfg, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["factory-1"]
    kinds = {(f["kind"], f["transfer_id"]) for f in report if f["discrepancy"]}
    assert kinds == {("manifest", bad)}, report

    with hospital.node.catalog.transaction() as db:  # both now hold the other's manifest
        db.execute(
            "UPDATE batches SET receipt = ? WHERE batch_id = ?",
            (hospital.node.catalog.get_batch(good, "outbound").receipt, bad),
        )
    assert main(["audit", "reconcile", "--config", cfg, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["factory-1"]
    found = {(f["kind"], f["transfer_id"]): f["detail"] for f in report if f["discrepancy"]}
    assert set(found) == {("signature", bad)}, report  # names another batch id
    assert f"batch id is {good!r}, expected {bad!r}" in found[("signature", bad)]


def test_export_atna_and_json(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import xml.etree.ElementTree as ET

    hospital, _ = pair
    tid = _send(hospital, tmp_path, "j.bin")
    cfg = str(hospital.config)
    out = tmp_path / "atna"
    assert main(["audit", "export", "--config", cfg, "-o", str(out)]) == 0
    files = sorted(out.iterdir())
    events = {f.name.split("-", 1)[1].removesuffix(".xml"): f for f in files}
    assert {"node.start", "transfer.begun", "transfer.completed"} <= set(events)
    root = ET.fromstring(events["transfer.completed"].read_bytes())
    event_id = root.find("EventIdentification/EventID")
    assert event_id is not None and event_id.get("csd-code") == "110104"
    assert tid in events["transfer.completed"].read_text()
    lines = tmp_path / "audit.jsonl"
    assert main(["audit", "export", "--config", cfg, "--format", "json", "-o", str(lines)]) == 0
    seqs = [json.loads(line)["seq"] for line in lines.read_text().splitlines()]
    assert seqs == sorted(seqs) and len(seqs) >= len(files)


def test_running_node_forwards_atna_to_syslog_collector(federation, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A node with [atna] enabled delivers its audit events over mutual TLS (RFC 5425)."""
    import xml.etree.ElementTree as ET

    from tests.cluster import write_config
    from tests.test_atna import Collector

    issued = federation.node("syslog-1", "factory")
    collector = Collector(issued.cert_path, issued.key_path, federation.ca)
    atna = (
        f'[atna]\nenabled = true\nhost = "127.0.0.1"\nport = {collector.port}\n'
        "poll_seconds = 0.2\n\n[transfer]\nretry_initial_seconds = 0.2\n"
    )
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-1": factory.address},
            extra=atna,
        )
    )
    try:
        tid = _send(hospital, tmp_path, "k.bin")
        messages = wait_for(
            lambda: (m := list(collector.messages)) and any(tid.encode() in x for x in m) and m,
            what="the transfer's ATNA message at the collector",
        )
        ids = set()
        for raw in messages:
            xml = raw[raw.index(b"<?xml") if b"<?xml" in raw else raw.index(b"<AuditMessage") :]
            found = ET.fromstring(xml).find("EventIdentification/EventID")
            assert found is not None
            ids.add(found.get("csd-code"))
        assert {"110100", "110102", "110104"} <= ids  # start, begin transferring, transferred
    finally:
        hospital.stop()
        factory.stop()
        collector.stop()
