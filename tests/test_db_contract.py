"""The catalog and every role store behave the same on SQLite and on PostgreSQL (#13).

Each test runs twice, through the public APIs, on a fresh SQLite file and on a fresh
PostgreSQL database (``tests/pg.py``); the assertions are on content: values, counts,
ordering and types (ints stay ints, bytes stay bytes, sizes beyond 2^31).
The last tests are of the data-access layer itself (gateway/db.py).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from factory_node.studies import StudyStore, SuitabilityRecord
from gateway.cases.store import CaseRow, CaseStore
from gateway.catalog import MIGRATIONS, Catalog, iso_utc
from gateway.db import PostgresDatabase, pg_ddl, pg_sql
from gateway.errors import CatalogError, NotFound, ValidationError
from gateway.fidelity.series import SliceGeometry
from hospital_node.design_export import MIGRATIONS as DESIGN_MIGRATIONS
from hospital_node.design_export import DesignExporter, ExportResult
from hospital_node.release_store import Confirmation, InstanceRelease, ReleaseStore
from hospital_node.studies import InstanceRecord, StudyCatalog
from hospital_node.study_identity import StudyIdentities, StudyIdentity
from hospital_node.vault import PatientIdentity, PseudonymVault
from tests.pg import PgServer

BIG = 5 * 2**31 + 7  # a size beyond a 32-bit integer
KEY = bytes(range(32))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalog]:
    """A Catalog on a fresh SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        catalog = Catalog(tmp_path / "catalog.sqlite")
    else:
        url = request.getfixturevalue("pg_url")
        catalog = Catalog.open(url, tmp_path / "unused.sqlite")
    try:
        yield catalog
    finally:
        catalog.close()


def _geometry(uid: str, series: str, z: float, number: int | None = None) -> SliceGeometry:
    return SliceGeometry(
        sop_instance_uid=uid,
        series_uid=series,
        position=(0.0, 0.0, z),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=(0.5, 0.5),
        slice_thickness=1.0,
        rows=64,
        columns=64,
        gantry_tilt=0.0,
        instance_number=number,
    )


# --- the catalog ------------------------------------------------------------------------
def test_objects_round_trip_and_listing(engine: Catalog) -> None:
    first = engine.add_object(
        object_id="a" * 64, size=BIG, name="scan.dcm", media_type="application/dicom",
        case_id="C-1", origin_node="hospital-1", labels={"k": "v", "z": "1"},
    )  # fmt: skip
    assert first.size == BIG and isinstance(first.size, int)
    assert first.labels == {"k": "v", "z": "1"}
    again = engine.add_object(
        object_id="a" * 64, size=1, name="other", media_type="x", case_id="C-2",
        origin_node="elsewhere",
    )  # fmt: skip
    assert again == first  # kept as first seen
    for i in range(5):
        engine.add_object(
            object_id=f"{i:064x}", size=i, name=f"o{i}", media_type="application/octet-stream",
            case_id="C-2", origin_node="factory-1",
        )  # fmt: skip
    listed = engine.list_objects(case_id="C-2", limit=3)
    assert [o.name for o in listed] == ["o4", "o3", "o2"]  # newest first, one page
    assert len(engine.list_objects(limit=100)) == 6
    assert [o.object_id for o in engine.list_objects(peer="hospital-1")] == ["a" * 64]
    future = iso_utc(datetime.now(UTC) + timedelta(days=1))
    assert engine.list_objects(since=future) == []
    assert len(engine.list_objects(until=future)) == 6
    assert engine.find_object("f" * 64) is None
    with pytest.raises(NotFound):
        engine.get_object("f" * 64)
    with pytest.raises(ValidationError):
        engine.list_objects(since="yesterday")


def test_transfers_in_and_out(engine: Catalog) -> None:
    obj = engine.add_object(
        object_id="b" * 64, size=BIG, name="big.bin", media_type="application/octet-stream",
        case_id="C-9", origin_node="hospital-1",
    )  # fmt: skip
    out = engine.add_transfer(
        transfer_id="t-out", direction="outbound", obj=obj, peer_node="factory-1",
        status="queued", header={"b": 2, "a": [1, "x"]},
    )  # fmt: skip
    assert (out.size, out.name, out.case_id) == (BIG, "big.bin", "C-9")
    assert out.header == {"a": [1, "x"], "b": 2}
    assert out.attempts == 0 and out.receipt is None and out.facts == {}
    inbound = engine.add_transfer(
        transfer_id="t-out", direction="inbound", object_id="b" * 64, peer_node="factory-1",
        status="receiving", size=BIG,
    )  # fmt: skip
    assert inbound.direction == "inbound"  # same id, other direction: its own row
    receipt = b"\x00\x01receipt\xff" * 10
    engine.update_transfer(
        "t-out", "outbound", status="done", attempts=3, bytes_done=BIG, receipt=receipt,
        completed_at="2026-01-01T00:00:00.000000Z", facts={"x": "1"},
        history=("done", "receipt verified"),
    )  # fmt: skip
    done = engine.get_transfer("t-out", "outbound")
    assert done.status == "done" and done.attempts == 3 and isinstance(done.attempts, int)
    assert done.bytes_done == BIG and isinstance(done.bytes_done, int)
    assert done.receipt == receipt and isinstance(done.receipt, bytes)
    assert done.facts == {"x": "1"}
    assert [(h.kind, h.detail) for h in engine.history("t-out", "outbound")] == [
        ("queued", ""),
        ("done", "receipt verified"),
    ]
    with pytest.raises(NotFound):
        engine.update_transfer("nope", "outbound", status="done")
    with pytest.raises(CatalogError):
        engine.update_transfer("t-out", "outbound", object_id="x")
    # delivered_by: a done inbound transfer only
    assert not engine.delivered_by("b" * 64, "factory-1")
    engine.update_transfer("t-out", "inbound", status="done")
    assert engine.delivered_by("b" * 64, "factory-1")
    assert not engine.delivered_by("b" * 64, "hospital-2")


def test_listings_paging_and_time_filters(engine: Catalog) -> None:
    for i in range(7):
        engine.add_transfer(
            transfer_id=f"t{i}", direction="outbound" if i % 2 else "inbound",
            object_id=f"o{i}", peer_node="p1" if i < 4 else "p2", status="queued",
            case_id="C-1" if i < 3 else "C-2", size=i,
        )  # fmt: skip
    everything = engine.list_transfers(limit=100)
    assert [t.transfer_id for t in everything] == [f"t{i}" for i in reversed(range(7))]
    assert [t.transfer_id for t in engine.list_transfers(limit=2)] == ["t6", "t5"]
    assert [t.transfer_id for t in engine.list_transfers(peer="p2")] == ["t6", "t5", "t4"]
    assert [t.transfer_id for t in engine.list_transfers(direction="outbound")] == [
        "t5", "t3", "t1",
    ]  # fmt: skip
    assert [t.transfer_id for t in engine.list_transfers(case_id="C-1", status="queued")] == [
        "t2", "t1", "t0",
    ]  # fmt: skip
    assert [t.transfer_id for t in engine.list_transfers(object_id="o4")] == ["t4"]
    middle = everything[3].created_at
    since = engine.list_transfers(since=middle)
    until = engine.list_transfers(until=middle)
    assert len(since) + len(until) == 7 and since[-1].created_at == middle
    day = datetime.now(UTC).date().isoformat()
    assert len(engine.list_transfers(since=day)) == 7
    assert engine.list_transfers(until=day) == []


def test_batches(engine: Catalog) -> None:
    batch = engine.add_batch(
        batch_id="B1", direction="outbound", peer_node="factory-1", status="queued",
        case_id="C-1", kind="study", ref="1.2.3", expected=3,
    )  # fmt: skip
    assert batch.sealed is False and batch.expected == 3 and isinstance(batch.expected, int)
    again = engine.add_batch(
        batch_id="B1", direction="outbound", peer_node="x", status="done", sealed=True
    )
    assert again == batch  # kept as first recorded
    for i in (2, 0, 1):
        engine.add_transfer(
            transfer_id=f"B1-{i}", direction="outbound", object_id=f"o{i}",
            peer_node="factory-1", status="queued", batch_id="B1", size=BIG,
        )  # fmt: skip
    assert [t.transfer_id for t in engine.batch_transfers("B1", "outbound")] == [
        "B1-2", "B1-0", "B1-1",
    ]  # fmt: skip  # insertion order (rowid)
    engine.update_transfer("B1-0", "outbound", status="done")
    assert engine.batch_counts("B1", "outbound") == {"queued": 2, "done": 1}
    manifest = b"\x30\x82manifest"
    engine.update_batch(
        "B1", "outbound", status="done", sealed=True, receipt=manifest,
        merkle_root="ab" * 32, history=("done", "manifest"),
    )  # fmt: skip
    done = engine.get_batch("B1", "outbound")
    assert done.sealed is True and done.receipt == manifest and isinstance(done.receipt, bytes)
    # a done object of a batch shows the batch's manifest receipt
    assert engine.get_transfer("B1-0", "outbound").receipt == manifest
    assert engine.get_transfer("B1-1", "outbound").receipt is None
    assert [(h.kind, h.detail) for h in engine.history("B1", "outbound")] == [
        ("queued", "batch"), ("done", "batch"), ("done", "manifest"),
    ]  # fmt: skip  # the second add_batch is kept in the history, not in the row
    assert [b.batch_id for b in engine.list_batches(case_id="C-1")] == ["B1"]
    assert engine.list_batches(status="queued") == []
    assert engine.find_batch("B1", "inbound") is None
    with pytest.raises(NotFound):
        engine.update_batch("B2", "outbound", status="done")
    with pytest.raises(CatalogError):
        engine.update_batch("B1", "outbound", peer_node="x")


def test_stale_inbound_and_next_due_time(engine: Catalog) -> None:
    assert engine.next_due_time() is None
    for i in range(3):
        engine.add_transfer(
            transfer_id=f"in{i}", direction="inbound", object_id=f"o{i}", peer_node="p",
            status="receiving",
        )  # fmt: skip
    engine.update_transfer("in1", "inbound", status="done")
    future = iso_utc(datetime.now(UTC) + timedelta(seconds=60))
    assert [t.transfer_id for t in engine.stale_inbound(future)] == ["in0", "in2"]
    assert [t.transfer_id for t in engine.stale_inbound(future, limit=1)] == ["in0"]
    assert engine.stale_inbound("2000-01-01T00:00:00.000000Z") == []
    assert [t.transfer_id for t in engine.open_inbound("p")] == ["in0", "in2"]
    engine.add_transfer(
        transfer_id="out", direction="outbound", object_id="o", peer_node="p", status="queued"
    )
    engine.update_transfer("out", "outbound", next_attempt_at="2030-01-01T00:00:00.000000Z")
    assert engine.next_due_time() == "2030-01-01T00:00:00.000000Z"
    engine.add_batch(batch_id="B", direction="outbound", peer_node="p", status="queued")
    engine.update_batch("B", "outbound", next_attempt_at="2029-01-01T00:00:00.000000Z")
    assert engine.next_due_time() == "2029-01-01T00:00:00.000000Z"


def test_migrations_and_newer_schema_refused(engine: Catalog, tmp_path: Path) -> None:
    assert engine.schema_version == len(MIGRATIONS) == 4
    engine.extend("test_ns", ("CREATE TABLE t_one (k TEXT PRIMARY KEY, n INTEGER NOT NULL)",))
    engine.extend(
        "test_ns",
        (
            "CREATE TABLE t_one (k TEXT PRIMARY KEY, n INTEGER NOT NULL)",
            "ALTER TABLE t_one ADD COLUMN b BLOB; CREATE INDEX t_one_n ON t_one(n)",
        ),
    )
    with engine.transaction() as db:
        db.execute("INSERT INTO t_one (k, n, b) VALUES (?, ?, ?)", ("x", BIG, b"\x00\xff"))
    (row,) = engine.query("SELECT k, n, b FROM t_one")
    assert (row[0], row["n"], bytes(row["b"])) == ("x", BIG, b"\x00\xff")
    assert isinstance(row["n"], int)
    (total,) = engine.query("SELECT SUM(n) AS total, COUNT(*) FROM t_one WHERE k = ?", ("x",))
    assert tuple(total) == (BIG, 1) and isinstance(total["total"], int)  # not a Decimal
    # a namespace newer than the code is refused, and says so
    with pytest.raises(CatalogError, match="newer than this yigong-gateway supports"):
        engine.extend("test_ns", ("CREATE TABLE t_one (k TEXT PRIMARY KEY)",))
    # the core schema too
    if engine.engine == "sqlite":
        with engine.transaction() as db:
            db.execute("PRAGMA user_version = 9")
        with pytest.raises(CatalogError, match="newer"):
            Catalog(engine.path)
    else:
        with engine.transaction() as db:
            db.execute("UPDATE schema_versions SET version = 9 WHERE namespace = 'schema'")
        url = engine.db.url  # type: ignore[attr-defined]
        with pytest.raises(CatalogError, match="newer"):
            Catalog.open(url, tmp_path / "x.sqlite")


def test_extend_namespaces_are_separate(engine: Catalog) -> None:
    engine.extend("ns_a", ("CREATE TABLE a_t (x INTEGER)",))
    engine.extend("ns_b", ("CREATE TABLE b_t (x INTEGER)", "CREATE TABLE b_u (y TEXT)"))
    engine.extend("ns_a", ("CREATE TABLE a_t (x INTEGER)",))  # nothing to do
    assert engine.db.version("ns_a") == 1 and engine.db.version("ns_b") == 2
    assert engine.db.version("ns_none") == 0


# --- the role stores ----------------------------------------------------------------------
def _instance(uid: str, obj: str, series: str, number: int | None, when: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=uid, study_uid="1.2.study", series_uid=series,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT", object_id=obj, size=BIG, calling_ae="MOD", called_ae="GW",
        received_at=when, instance_number=number, geometry_sha256="g" * 64,
        pixel_sha256="p" * 64, burned_in="NO", duplicate=False,
    )  # fmt: skip


def test_hospital_studies_quiet_period_and_reopen(engine: Catalog) -> None:
    studies = StudyCatalog(engine)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    at = [iso_utc(t0 + timedelta(seconds=i)) for i in range(5)]
    assert studies.add_instance(_instance("1.1", "o1", "S1", 2, at[0]), _geometry("1.1", "S1", 1))
    assert studies.add_instance(
        _instance("1.2", "o2", "S1", None, at[1]), _geometry("1.2", "S1", 0)
    )
    assert studies.add_instance(_instance("1.3", "o3", "S2", 1, at[2]), _geometry("1.3", "S2", 0))
    assert not studies.add_instance(
        _instance("1.1", "o1", "S1", 2, at[3]), _geometry("1.1", "S1", 1)
    )
    assert studies.add_instance(_instance("1.1", "o9", "S1", 2, at[3]), _geometry("1.1", "S1", 1))
    s = studies.get_study("1.2.study")
    assert (s.status, s.instance_count, s.series_count) == ("receiving", 3, 2)
    assert isinstance(s.instance_count, int) and s.last_received_at == at[3]
    assert studies.receiving_counts() == (3, 3)
    # ordering: series, then instance number (a missing one first), then UID
    listed = studies.instances("1.2.study")
    assert [(i.sop_instance_uid, i.object_id, i.duplicate) for i in listed] == [
        ("1.2", "o2", False), ("1.1", "o1", False), ("1.1", "o9", True), ("1.3", "o3", False),
    ]  # fmt: skip
    inst = studies.find_instance("1.1", "o9")
    assert inst is not None and inst.size == BIG and inst.instance_number == 2
    assert studies.object_ids("1.1") == {"o1", "o9"}
    assert studies.modalities("1.2.study") == ("CT",)
    assert studies.geometry("1.3", "o3") == _geometry("1.3", "S2", 0)
    # quiet period: not yet, then received with its report
    assert studies.tick(t0 + timedelta(seconds=4), 60) == []
    assert studies.tick(t0 + timedelta(seconds=100), 60) == ["1.2.study"]
    s = studies.get_study("1.2.study")
    assert s.status == "received" and s.report["study_uid"] == "1.2.study"
    assert len(s.report["duplicates"]) == 1 and s.report_sha256
    assert studies.receiving_counts() == (0, 0)
    assert [x.study_uid for x in studies.list_studies(status="received")] == ["1.2.study"]
    # a late instance re-opens the study
    studies.add_instance(_instance("1.4", "o4", "S2", 2, at[4]), _geometry("1.4", "S2", 1))
    s = studies.get_study("1.2.study")
    assert (s.status, s.instance_count, s.report) == ("receiving", 4, {})
    # paging by cursor
    for n in range(3):
        uid = f"2.{n}"
        rec = _instance(uid, f"x{n}", "S", 1, iso_utc(t0 + timedelta(minutes=n + 1)))
        studies.add_instance(dataclass_replace(rec, study_uid=f"9.{n}"), _geometry(uid, "S", 0))
    page1 = studies.list_studies(limit=2)
    assert [x.study_uid for x in page1] == ["9.2", "9.1"]
    cursor = (page1[-1].last_received_at, page1[-1].study_uid)
    assert [x.study_uid for x in studies.list_studies(limit=5, before=cursor)] == [
        "9.0", "1.2.study",
    ]  # fmt: skip


def dataclass_replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _confirmation(cid: str, study: str, auto: bool, created: str) -> Confirmation:
    return Confirmation(
        confirmation_id=cid, study_uid=study, case_id="CASE-1", destination="factory-1",
        actor="dr", cert_serial="01", cert_fingerprint="ff" * 32, auto=auto,
        allow_burned_in=not auto, record="{}", signature=b"\x00sig\xff", created_at=created,
    )  # fmt: skip


def test_release_store(engine: Catalog) -> None:
    store = ReleaseStore(engine)
    rows = [
        InstanceRelease("src-b", "1.2", "S1", 2, "pending"),
        InstanceRelease("src-a", "1.1", "S1", None, "pending"),
        InstanceRelease("src-c", "1.3", "S0", 7, "pending"),
    ]
    c1 = _confirmation("conf-1", "1.2.study", True, "2026-01-01T00:00:00.000000Z")
    store.add(c1, rows, releasing=True)
    assert store.find_confirmation("1.2.study", "CASE-1", "factory-1") == c1
    got = store.confirmations("1.2.study")[0]
    assert got.auto is True and got.allow_burned_in is False
    assert isinstance(got.signature, bytes) and got.signature == b"\x00sig\xff"
    assert store.has_confirmation("1.2.study") and not store.has_confirmation("x")
    assert [r.source_object_id for r in store.releases("conf-1")] == ["src-c", "src-a", "src-b"]
    assert [c.confirmation_id for c in store.unfinished()] == ["conf-1"]
    assert store.progress("conf-1") == ("releasing", "")
    store.set_progress("conf-1", state="sealed", batch_id="B-1")
    assert store.progress("conf-1") == ("sealed", "B-1")
    for r in store.releases("conf-1"):
        store.update_release(
            "conf-1", r.replace(status="released", deid_object_id="d-" + r.source_object_id,
                                deid_sop_instance_uid="2." + r.sop_instance_uid,
                                geometry_sha256="g", pixel_sha256="p"),
        )  # fmt: skip
        store.set_transfer("conf-1", r.source_object_id, "t-" + r.source_object_id)
    store.set_status("conf-1", "src-c", "refused", "burned in")
    store.set_progress("conf-1", state="done")
    assert store.unfinished() == []
    facts = store.released_facts("d-src-a")
    assert facts is not None and facts.destinations == frozenset({"factory-1"})
    assert facts.sop_instance_uid == "2.1.1" and facts.case_id == "CASE-1"
    assert store.released_facts("d-src-c") is None  # refused afterwards
    c2 = _confirmation("conf-2", "1.3.study", False, "2026-01-02T00:00:00.000000Z")
    store.add(c2, [])
    assert [c.confirmation_id for c in store.confirmations_for_case("CASE-1", "factory-1")] == [
        "conf-1", "conf-2",
    ]  # fmt: skip
    assert store.study_uids_for_case("CASE-1") == ["1.2.study", "1.3.study"]
    assert store.progress("conf-2") == ("done", "")
    since = store.auto_forward_since("GW", "factory-1")
    assert store.auto_forward_since("GW", "factory-1") == since


def test_vault_pseudonyms(engine: Catalog) -> None:
    vault = PseudonymVault(engine, KEY)
    patient = PatientIdentity("P-1", "Doe^Jane", "19700101", "HOSP")
    other = PatientIdentity("P-2", "Roe^Rick", "19800101", "HOSP")
    assert not vault.has_case("CASE-1")
    legacy = vault.store("CASE-1", patient)
    assert legacy == vault.case_pseudonym("CASE-1") and vault.has_case("CASE-1")
    assert vault.store("CASE-1", patient) == legacy  # idempotent
    with pytest.raises(ValidationError):
        vault.store("CASE-1", other)
    assert vault.lookup("CASE-1").same_patient(patient)
    assert vault.pseudonym("CASE-1") == legacy  # none recorded yet: the legacy one
    rec = vault.recipient_for(patient, "factory-1")
    vault.bind("CASE-1", "factory-1", rec)
    vault.bind("CASE-1", "factory-1", vault.recipient_for(other, "factory-1"))  # first wins
    assert vault.recipient("CASE-1", "factory-1") == rec
    assert vault.pseudonym("CASE-1", "factory-1") == rec.pseudonym
    assert vault.issued_pseudonym("CASE-1", "factory-1") == rec.pseudonym
    assert vault.issued_pseudonym("CASE-X", "factory-1") is None
    vault.store("CASE-2", patient)
    vault.bind("CASE-2", "factory-1", rec)
    case_id, who = vault.lookup_pseudonym(rec.pseudonym)
    assert case_id == "CASE-1" and who.same_patient(patient)
    assert vault.lookup_pseudonym(vault.case_pseudonym("CASE-2"))[0] == "CASE-2"
    vault.bind("CASE-2", "factory-2", vault.recipient_for(patient, "factory-2"))
    with pytest.raises(ValidationError):
        vault.pseudonym("CASE-2")
    with pytest.raises(NotFound):
        vault.lookup("CASE-3")
    # a second vault on the same catalog: migrations already applied, same answers
    again = PseudonymVault(engine, KEY)
    assert again.pseudonym("CASE-1", "factory-1") == rec.pseudonym
    assert engine.db.version("hospital_vault") == 2


def test_vault_migration_from_version_1(engine: Catalog) -> None:
    from hospital_node.vault import MIGRATIONS

    engine.extend("hospital_vault", MIGRATIONS[:1])  # a node of the first vault schema
    engine.extend("hospital_vault", MIGRATIONS)
    vault = PseudonymVault(engine, KEY)
    vault.store("CASE-1", PatientIdentity("P", "N", "", ""))
    assert vault.recipient("CASE-1", "factory-1") is None
    assert engine.db.version("hospital_vault") == 2


def test_study_identities(engine: Catalog) -> None:
    ids = StudyIdentities(engine, KEY)
    first = StudyIdentity(patient_name="Doe^Jane", patient_id="P-1", study_date="20260101")
    ids.record("1.2.3", first)
    StudyIdentities(engine, KEY).record("1.2.3", StudyIdentity(patient_name="Other"))
    ids.record("1.2.4", StudyIdentity(patient_id="P-2"))
    ids.record("1.2.5", None)
    assert ids.get("1.2.3") == first  # the first kept
    fresh = StudyIdentities(engine, KEY)
    many = fresh.many(["1.2.4", "1.2.3", "1.2.5", "1.2.3"])
    assert sorted(many) == ["1.2.3", "1.2.4"] and many["1.2.4"].patient_id == "P-2"
    many_uids = [f"9.{i}" for i in range(600)]  # more than one IN (…) chunk
    for uid in many_uids[:3]:
        fresh.record(uid, StudyIdentity(patient_id=uid))
    assert sorted(fresh.many(many_uids)) == sorted(many_uids[:3])


def test_design_exports(engine: Catalog) -> None:
    exporter = DesignExporter.__new__(DesignExporter)  # only its catalog is used below
    exporter.catalog = engine
    engine.extend("design_export", DESIGN_MIGRATIONS)
    rows = [
        ("1.9.2", "CASE-1", "obj", "h", "1.2.study", "1.9.s2", "1.2.s", "PACS@h:104", 0, "eng",
         "2026-01-01T00:00:02.000000Z"),
        ("1.9.1", "CASE-1", "obj", "h", "1.2.study", "1.9.s1", "1.2.s", "PACS@h:104", 0xB000,
         "eng", "2026-01-01T00:00:01.000000Z"),
    ]  # fmt: skip
    with engine.transaction() as db:
        for r in rows:
            db.execute("INSERT INTO design_exports VALUES (?,?,?,?,?,?,?,?,?,?,?)", r)
    found = exporter.exports("CASE-1")
    assert found == [
        ExportResult("1.9.1", "1.9.s1", "1.2.study", "PACS@h:104", 0xB000, "1.2.s",
                     "2026-01-01T00:00:01.000000Z"),
        ExportResult("1.9.2", "1.9.s2", "1.2.study", "PACS@h:104", 0, "1.2.s",
                     "2026-01-01T00:00:02.000000Z"),
    ]  # fmt: skip
    assert isinstance(found[0].status, int)
    with pytest.raises(ValidationError, match=r"1\.9\.2"):
        exporter._check_not_exported("CASE-1", "obj")
    exporter._check_not_exported("CASE-1", "other")


def test_factory_studies_and_suitability(engine: Catalog) -> None:
    store = StudyStore(engine)
    for i, (uid, series) in enumerate([("1.1", "S1"), ("1.2", "S1"), ("1.3", "S2")]):
        assert store.record_instance(
            object_id=f"o{i}", case_id="CASE-1", study_uid="1.2.study", series_uid=series,
            sop_instance_uid=uid, geometry=_geometry(uid, series, float(i), i),
        )  # fmt: skip
    assert not store.record_instance(object_id="o0", case_id="CASE-1", study_uid="1.2.study")
    assert store.record_instance(  # the same UID again, as another object
        object_id="o9", case_id="CASE-1", study_uid="1.2.study", series_uid="S1",
        sop_instance_uid="1.1", geometry=_geometry("1.1", "S1", 0.0, 0),
    )  # fmt: skip
    store.record_instance(object_id="bad", case_id="CASE-1", parse_error="not DICOM")
    store.record_instance(
        object_id="o0", case_id="CASE-2", study_uid="2.study", sop_instance_uid="2.1"
    )
    insts = store.instances("CASE-1", "1.2.study")
    assert [(i.sop_instance_uid, i.object_id) for i in insts] == [
        ("1.2", "o1"), ("1.3", "o2"), ("1.1", "o9"),
    ]  # fmt: skip
    assert all(isinstance(i.seq, int) for i in insts)
    assert insts[0].geometry == _geometry("1.2", "S1", 1.0, 1)
    assert [u.object_id for u in store.unparsed()] == ["bad"]
    assert store.unparsed("CASE-2") == []
    inst = store.instance_of("o0")
    assert inst is not None and inst.case_id == "CASE-2"  # the latest received
    summary = store.study("1.2.study")
    assert (summary.instance_count, summary.series_count, summary.latest) == (3, 2, None)
    assert [(s.case_id, s.study_uid) for s in store.list_studies()] == [
        ("CASE-2", "2.study"), ("CASE-1", "1.2.study"),
    ]  # fmt: skip
    assert [s.study_uid for s in store.list_studies(limit=1, offset=1)] == ["1.2.study"]
    assert [s.study_uid for s in store.list_studies(case_id="CASE-1")] == ["1.2.study"]
    with pytest.raises(NotFound):
        store.study("nope")
    for passed in (False, True):
        store.record_result(
            SuitabilityRecord(
                case_id="CASE-1", study_uid="1.2.study", checked_at="2026-01-01T00:00:00Z",
                passed=passed, thresholds={"max_gap_mm": 1.5}, findings=("a", "b"),
                instance_count=3, last_seq=summary.last_seq,
            )
        )  # fmt: skip
    latest = store.latest_result("CASE-1", "1.2.study")
    assert latest is not None and latest.passed is True and latest.findings == ("a", "b")
    assert [r.passed for r in store.results("CASE-1", "1.2.study")] == [False, True]
    assert store.study("1.2.study").result_current
    # the same study received for a second case needs the case named
    store.record_instance(object_id="o5", case_id="CASE-3", study_uid="1.2.study",
                          sop_instance_uid="1.1")  # fmt: skip
    with pytest.raises(ValidationError):
        store.study("1.2.study")
    assert store.study("1.2.study", "CASE-3").instance_count == 1


def _verified(case_id: str, seq: int, h: str, envelope: bytes) -> Any:
    record = SimpleNamespace(
        case_id=case_id, seq=seq, type="order", author=SimpleNamespace(label=lambda: "dr"),
        time="2026-01-01T00:00:00Z",
    )  # fmt: skip
    env = SimpleNamespace(node_id="hospital-1", to_bytes=lambda: envelope)
    return SimpleNamespace(record=record, envelope=env, hash=h)


def test_case_store(engine: Catalog) -> None:
    from gateway.cases.chain import ChainError

    store = CaseStore(engine)
    case = CaseRow("CASE-1", "hospital-1", "factory-1", "2026-01-01T00:00:00Z", "dr")
    assert store.add_case(case) is True
    assert store.add_case(case) is False
    store.add_case(CaseRow("CASE-2", "hospital-1", "factory-1", "2026-01-02T00:00:00Z", "dr"))
    assert store.find_case("CASE-1") == case and store.find_case("nope") is None
    assert [c.case_id for c in store.list_cases(10)] == ["CASE-2", "CASE-1"]
    assert [c.case_id for c in store.list_cases(1)] == ["CASE-2"]
    envs = [bytes([i]) * 40 + b"\x00\xff" for i in range(4)]
    store.add_pending("CASE-1", 1, "h1", envs[1])
    store.add_pending("CASE-1", 1, "h1", b"other")  # kept as first
    assert store.pending("CASE-1") == [(1, "h1", envs[1])]
    store.append(_verified("CASE-1", 0, "h0", envs[0]), "local", [("order_number", "N-1")])
    store.append(_verified("CASE-1", 1, "h1", envs[1]), "remote", [("design", "D-1")])
    assert store.pending("CASE-1") == []  # appended: no longer pending
    with pytest.raises(CatalogError, match="not the next"):
        store.append(_verified("CASE-1", 5, "h5", envs[2]), "local", [])
    with pytest.raises(ChainError, match="already used"):
        store.append(_verified("CASE-2", 0, "hx", envs[2]), "local", [("order_number", "N-1")])
    records = store.records("CASE-1")
    assert [(r.seq, r.envelope_hash, r.origin) for r in records] == [
        (0, "h0", "local"), (1, "h1", "remote"),
    ]  # fmt: skip
    assert isinstance(records[1].envelope, bytes) and records[1].envelope == envs[1]
    assert isinstance(records[1].seq, int)
    found = store.find_record("h1")
    assert found is not None and found.envelope == envs[1]
    assert store.find_record("nope") is None
    # a refused record, then the same record displaced: the displaced upsert wins
    store.add_rejected("CASE-1", 1, "h1", envs[1], "bad signature")
    store.add_rejected("CASE-1", 1, "h1", envs[1], "again")  # kept as first
    assert store.rejected("CASE-1") == [(1, "h1", "refused", "bad signature")]
    assert store.displace("CASE-1", 1, "fork") == 1
    assert store.rejected("CASE-1") == [(1, "h1", "displaced", "fork")]
    assert [r.seq for r in store.records("CASE-1")] == [0]
    # its identifier was freed with it; the case's earlier one is still taken
    store.append(_verified("CASE-2", 0, "hy", envs[3]), "local", [("design", "D-1")])
    with pytest.raises(ChainError):
        store.append(_verified("CASE-2", 1, "hz", envs[3]), "local", [("order_number", "N-1")])
    store.add_pending("CASE-2", 4, "hp", envs[2])
    store.drop_pending("hp")
    assert store.pending("CASE-2") == []


# --- the data-access layer ------------------------------------------------------------
def test_pg_sql_placeholders() -> None:
    assert pg_sql("SELECT * FROM t WHERE a = ? AND b = ?") == (
        "SELECT * FROM t WHERE a = %s AND b = %s"
    )
    assert pg_sql("SELECT '?', 'it''s ?%' FROM t WHERE a = ?") == (
        "SELECT '?', 'it''s ?%%' FROM t WHERE a = %s"
    )
    assert pg_sql("SELECT \"odd?col\" FROM t WHERE x LIKE 'a%' AND y = ?") == (
        "SELECT \"odd?col\" FROM t WHERE x LIKE 'a%%' AND y = %s"
    )
    assert pg_sql("SELECT 5 % 2 WHERE ? = ?") == "SELECT 5 %% 2 WHERE %s = %s"


def test_pg_ddl() -> None:
    out = pg_ddl("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, b BLOB, r REAL)")
    assert out.startswith(
        "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT,"
        " b BYTEA, r DOUBLE PRECISION"
    )
    assert out.rstrip().endswith("rowid BIGINT GENERATED ALWAYS AS IDENTITY\n)")
    auto = pg_ddl("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, x TEXT)")
    assert "AUTOINCREMENT" not in auto and "GENERATED BY DEFAULT AS IDENTITY" in auto
    no_rowid = pg_ddl("CREATE TABLE t (k TEXT PRIMARY KEY) WITHOUT ROWID")
    assert "WITHOUT" not in no_rowid and no_rowid.count("rowid") == 1
    assert pg_ddl("CREATE INDEX i ON t(n)") == "CREATE INDEX i ON t(n)"
    assert pg_ddl("ALTER TABLE t ADD COLUMN big INTEGER") == "ALTER TABLE t ADD COLUMN big BIGINT"


def test_transactions_nest_and_roll_back(engine: Catalog) -> None:
    engine.extend("tx", ("CREATE TABLE tx_t (k TEXT PRIMARY KEY, n INTEGER)",))
    with engine.transaction() as outer:
        outer.execute("INSERT INTO tx_t VALUES (?, ?)", ("a", 1))
        with engine.transaction() as inner:  # joins: same commit
            inner.execute("INSERT INTO tx_t VALUES (?, ?)", ("b", True))
            assert len(engine.query("SELECT k FROM tx_t")) == 2  # sees its transaction
        engine.add_object(object_id="o", size=1, name="n", media_type="m", case_id="",
                          origin_node="x")  # fmt: skip
    assert [tuple(r) for r in engine.query("SELECT k, n FROM tx_t ORDER BY k")] == [
        ("a", 1), ("b", 1),
    ]  # fmt: skip  # a bool parameter is stored as an integer
    with pytest.raises(RuntimeError), engine.transaction() as db:
        db.execute("INSERT INTO tx_t VALUES (?, ?)", ("c", 3))
        with engine.transaction() as inner:
            inner.execute("INSERT INTO tx_t VALUES (?, ?)", ("d", 4))
        raise RuntimeError("boom")
    assert [r[0] for r in engine.query("SELECT k FROM tx_t ORDER BY k")] == ["a", "b"]
    # a failing statement rolls back and becomes CatalogError naming the database
    with pytest.raises(CatalogError) as info, engine.transaction() as db:
        db.execute("INSERT INTO tx_t VALUES (?, ?)", ("e", 5))
        db.execute("INSERT INTO tx_t VALUES (?, ?)", ("a", 6))
    assert "catalog" in str(info.value)
    assert [r[0] for r in engine.query("SELECT k FROM tx_t ORDER BY k")] == ["a", "b"]
    with pytest.raises(CatalogError, match="catalog"):
        engine.query("SELECT nope FROM tx_t")
    engine.add_object(object_id="o2", size=1, name="n", media_type="m", case_id="",
                      origin_node="x")  # fmt: skip  # still usable afterwards
    assert engine.find_object("o2") is not None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_postgresql_is_catalog_error_without_password(tmp_path: Path) -> None:
    url = f"postgresql://yigong:s3cret-pw@127.0.0.1:{_closed_port()}/node"
    with pytest.raises(CatalogError) as info:
        Catalog.open(url, tmp_path / "x.sqlite")
    text = str(info.value)
    assert "s3cret-pw" not in text and "catalog" in text and "127.0.0.1" in text


def test_replicas_migrate_once_at_the_same_time(pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.create_database()
    try:
        barrier = threading.Barrier(4)
        opened: list[Catalog] = []
        errors: list[BaseException] = []

        def replica() -> None:
            try:
                barrier.wait()
                catalog = Catalog.open(url, tmp_path / "unused.sqlite", pool_size=2)
                CaseStore(catalog)
                StudyStore(catalog)
                opened.append(catalog)
            except BaseException as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=replica) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len(opened) == 4
        versions = pg_server.sql(
            url, "SELECT namespace, version FROM catalog.schema_versions ORDER BY namespace"
        )
        assert versions == [("cases", 1), ("factory_node", 1), ("schema", 4)]
        # both replicas see each other's writes
        a, b = opened[0], opened[1]
        a.add_object(object_id="o", size=BIG, name="n", media_type="m", case_id="",
                     origin_node="x")  # fmt: skip
        assert b.get_object("o").size == BIG
        assert isinstance(a.db, PostgresDatabase)
        for c in opened:
            c.close()
    finally:
        pg_server.drop_database(url)
