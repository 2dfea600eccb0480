"""Replicas of one node share the catalog's outbox and releases (issue #13, PostgreSQL).

Each queued send is claimed by exactly one replica (``FOR UPDATE SKIP LOCKED``, no
database-wide lock); a replica that stops heartbeating has its claimed sends queued again
for the others; a replica that stops cleanly hands its sends back at once; a live
replica's claims are never taken; a hospital's unfinished release is finished by its
owner, or by another replica once the owner falls silent. Real PostgreSQL (tests/pg.py),
one ``Catalog`` object per replica as each ``yigong serve`` process has.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from pathlib import Path

from gateway.catalog import Catalog
from hospital_node.release_store import PENDING, Confirmation, InstanceRelease, ReleaseStore


def _queue(cat: Catalog, n: int, *, batch: str = "") -> list[str]:
    ids = []
    for i in range(n):
        oid = hashlib.sha256(f"object {i}".encode()).hexdigest()
        obj = cat.add_object(
            object_id=oid, size=i + 1, name=f"o{i}", media_type="application/octet-stream",
            case_id="", origin_node="factory-1",
        )  # fmt: skip
        tid = f"{i:032x}"
        cat.add_transfer(
            transfer_id=tid, direction="outbound", obj=obj, peer_node="hospital-1",
            status="queued", batch_id=batch,
        )  # fmt: skip
        ids.append(tid)
    return ids


def test_each_send_is_claimed_by_exactly_one_of_three_replicas(pg_url: str, tmp_path: Path) -> None:
    replicas = [Catalog.open(pg_url, tmp_path / "unused") for _ in range(3)]
    try:
        ids = _queue(replicas[0], 60)
        claimed: dict[str, list[str]] = {r.replica_id: [] for r in replicas}
        start = threading.Barrier(len(replicas))

        def drain(cat: Catalog) -> None:
            start.wait()
            while got := cat.claim_due_outbound("9999", 1, set()):
                claimed[cat.replica_id].extend(t.transfer_id for t in got)

        threads = [threading.Thread(target=drain, args=(r,)) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        every = [tid for got in claimed.values() for tid in got]
        assert sorted(every) == sorted(ids)  # all claimed ...
        assert max(Counter(every).values()) == 1  # ... each exactly once
        assert sum(1 for got in claimed.values() if got) >= 2  # and the work was shared
        rows = replicas[1].query(
            "SELECT status, claimed_by, COUNT(*) FROM transfers GROUP BY status, claimed_by"
        )
        by_replica = {r[1]: r[2] for r in rows}
        assert {r[0] for r in rows} == {"sending"}
        assert by_replica == {rid: len(got) for rid, got in claimed.items() if got}
    finally:
        for r in replicas:
            r.close()


def test_a_silent_replicas_sends_go_to_the_others_a_live_ones_stay(
    pg_url: str, tmp_path: Path
) -> None:
    dead, live, survivor = (Catalog.open(pg_url, tmp_path / "unused") for _ in range(3))
    try:
        _queue(dead, 6)
        for cat in (dead, live, survivor):
            cat.heartbeat()
        assert len(dead.claim_due_outbound("9999", 3, set())) == 3
        assert len(live.claim_due_outbound("9999", 3, set())) == 3
        # nobody silent yet: nothing is taken over
        assert survivor.take_over_stale(lease_seconds=30) == 0
        time.sleep(1.2)
        live.heartbeat()  # 'dead' stopped heartbeating (SIGKILL): 'live' did not
        assert survivor.take_over_stale(lease_seconds=1.0) == 3
        taken = survivor.claim_due_outbound("9999", 10, set())
        assert len(taken) == 3
        owners = dict(
            (r[0], r[1])
            for r in survivor.query("SELECT transfer_id, claimed_by FROM transfers")
        )
        assert Counter(owners.values()) == {live.replica_id: 3, survivor.replica_id: 3}
        assert {r[0] for r in survivor.replicas()} == {live.replica_id, survivor.replica_id}
    finally:
        for cat in (dead, live, survivor):
            cat.close()


def test_a_clean_stop_hands_sends_back_at_once(pg_url: str, tmp_path: Path) -> None:
    leaving, staying = (Catalog.open(pg_url, tmp_path / "unused") for _ in range(2))
    try:
        _queue(leaving, 4)
        leaving.heartbeat()
        staying.heartbeat()
        assert len(leaving.claim_due_outbound("9999", 4, set())) == 4
        assert staying.claim_due_outbound("9999", 4, set()) == []
        assert leaving.retire() == 4
        assert len(staying.claim_due_outbound("9999", 4, set())) == 4
        assert [r[0] for r in staying.replicas()] == [staying.replica_id]
    finally:
        leaving.close()
        staying.close()


def test_batches_are_claimed_once_too(pg_url: str, tmp_path: Path) -> None:
    a, b = (Catalog.open(pg_url, tmp_path / "unused") for _ in range(2))
    try:
        for i in range(10):
            a.add_batch(
                batch_id=f"b{i}", direction="outbound", peer_node="hospital-1", case_id="",
                kind="study", ref="", status="queued", sealed=True, expected=0,
            )  # fmt: skip
        got: list[str] = []
        lock = threading.Lock()

        def drain(cat: Catalog) -> None:
            while (batch := cat.claim_due_batch("9999", set())) is not None:
                with lock:
                    got.append(batch.batch_id)

        threads = [threading.Thread(target=drain, args=(c,)) for c in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got) == sorted(f"b{i}" for i in range(10))
    finally:
        a.close()
        b.close()


def test_sqlite_restart_requeues_every_interrupted_send(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    _queue(cat, 3)
    assert len(cat.claim_due_outbound("9999", 3, set())) == 3
    cat.close()
    again = Catalog(tmp_path / "c.sqlite")
    assert again.requeue_interrupted() == 3  # one process per SQLite file: all of them
    assert len(again.claim_due_outbound("9999", 3, set())) == 3
    again.close()


def _confirmation(cid: str) -> Confirmation:
    return Confirmation(
        confirmation_id=cid, study_uid="1.2.3", case_id="C-1", destination="factory-1",
        actor="clinician:dr-li@hospital-1", cert_serial="1", cert_fingerprint="f" * 64,
        auto=False, allow_burned_in=False, record="{}", signature=b"s", created_at="2026",
    )  # fmt: skip


def test_a_hospital_release_is_worked_on_by_its_owner_and_taken_over_when_it_falls_silent(
    pg_url: str, tmp_path: Path
) -> None:
    a_cat, b_cat = (Catalog.open(pg_url, tmp_path / "unused") for _ in range(2))
    try:
        a, b = ReleaseStore(a_cat), ReleaseStore(b_cat)
        assert a.shared and b.shared
        for cat in (a_cat, b_cat):
            cat.heartbeat()
        pending = [InstanceRelease("o" * 64, "1.2.3.4", "1.2.3.5", 1, PENDING)]
        a.add(_confirmation("c1"), pending, releasing=True)  # replica A confirms: A owns it
        assert [c.confirmation_id for c in b.unfinished()] == ["c1"]
        assert b.claim("c1") is False  # A is alive and working on it
        assert a.claim("c1") is True
        time.sleep(1.2)
        b_cat.heartbeat()
        b_cat.take_over_stale(lease_seconds=1.0)  # A fell silent: it leaves the replica table
        assert b.claim("c1") is True  # B finishes A's release ...
        assert a.claim("c1") is False  # ... and A, were it to wake up, leaves it to B
        b.release_owner("c1")
        assert b_cat.query("SELECT COUNT(*) FROM hospital_release_owner")[0][0] == 0
    finally:
        a_cat.close()
        b_cat.close()


def test_sqlite_releases_have_no_owners(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    store = ReleaseStore(cat)
    assert not store.shared
    store.add(_confirmation("c1"), [], releasing=True)
    assert store.claim("c1") is True
    assert cat.query("SELECT COUNT(*) FROM hospital_release_owner")[0][0] == 0
    cat.close()
