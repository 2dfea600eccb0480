"""The pipelined release (issue #10.2): de-identification on worker processes, instances
queued while later ones are still de-identified, one outbox batch per confirmation, the
one-patient rule before anything leaves, and a SIGKILL during confirmation.

Real nodes (a hospital and a factory over mTLS), studies pushed to the hospital's DICOM
SCP with pynetdicom as from a PACS; the kill test runs the hospital as a ``yigong serve``
child process and SIGKILLs it in the middle of its confirmation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.audit import AuditLog
from gateway.catalog import Catalog
from gateway.rpc.client import NodeClient
from hospital_node.deid import Deidentifier
from hospital_node.deid_pool import DeidPool, clear_scratch
from hospital_node.guard import read_object
from hospital_node.role import HospitalRole
from tests.cluster import Federation, InProcessNode, NodeProcess, wait_for, write_config
from tests.dicom_factory import StudyInfo, ct_series, to_part10
from yigong.v1 import hospital_pb2, hospital_pb2_grpc

CASE = "CASE-2026-0101"
TRANSFER = "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n"
POOL = "[deid]\nworkers = 2\npool_min_instances = 2\n"


def role(node: InProcessNode) -> HospitalRole:
    hooks = node.node.hooks
    assert isinstance(hooks, HospitalRole)
    return hooks


def push(port: int, datasets: Iterable[Dataset]) -> None:
    """C-STORE ``datasets`` to a hospital's DICOM SCP, as a PACS would."""
    ae = AE(ae_title="PACS")
    datasets = list(datasets)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="YIGONG")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
    finally:
        assoc.release()


def clinician(federation: Federation) -> Any:
    return federation.creds(federation.person("dr-pipe", "clinician", "hospital-1"))


def confirm(channel: grpc.Channel, study_uid: str, timeout: float = 300) -> Any:
    stub = hospital_pb2_grpc.HospitalStub(channel)
    req = hospital_pb2.ConfirmStudyRequest(
        study_uid=study_uid, case_id=CASE, destination="factory-1"
    )
    return stub.ConfirmStudy(req, timeout=timeout)


@pytest.fixture
def pool_pair(federation: Federation, tmp_path: Path) -> Iterator[tuple[InProcessNode, Any]]:
    """A factory and a hospital whose releases of 2+ instances use 2 worker processes."""
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital",
            peers={"factory-1": factory.address}, extra=TRANSFER + POOL,
        )
    )  # fmt: skip
    yield hospital, factory
    hospital.stop()
    factory.stop()


def received(hospital: InProcessNode, datasets: list[Dataset]) -> str:
    """Push ``datasets`` and end the quiet period; the study's UID."""
    push(role(hospital).dicom_port, datasets)
    hospital.settle()
    study_uid = str(datasets[0].StudyInstanceUID)
    from datetime import UTC, datetime

    assert study_uid in role(hospital).studies.tick(datetime.now(UTC), 0.0)
    return study_uid


def wait_done(node: InProcessNode, transfer_ids: Iterable[str], timeout: float = 120) -> None:
    ids = list(transfer_ids)
    wait_for(
        lambda: all(node.node.catalog.get_transfer(t, "outbound").status == "done" for t in ids),
        timeout=timeout,
        what="every transfer done",
    )


# --- the pipeline, in process ---------------------------------------------------------------


def test_first_instance_is_queued_before_the_last_is_deidentified(
    pool_pair: tuple[InProcessNode, Any], federation: Federation
) -> None:
    """The audit log's order: a transfer.queued precedes the last deid.applied, every
    instance goes into one sealed batch, and the factory receives all of them."""
    hospital, factory = pool_pair
    datasets = list(ct_series(24, rows=64, cols=64))
    study_uid = received(hospital, datasets)
    reply = confirm(hospital.client(clinician(federation)).channel, study_uid)
    assert len(reply.transfer_ids) == 24
    wait_done(hospital, reply.transfer_ids)

    audit = hospital.node.audit
    applied = [e.seq for e in audit.events(event="deid.applied")]
    queued = [e.seq for e in audit.events(event="transfer.queued")]
    assert len(applied) == len(queued) == 24
    assert min(queued) < max(applied), "nothing left before every instance was de-identified"
    (confirmed,) = audit.events(event="case.confirmation")
    assert confirmed.outcome == "success" and confirmed.details["released"] == 24
    assert confirmed.seq > max(queued)

    # One batch, named by the confirmation, sealed with every instance in it.
    c = reply.confirmation
    records = role(hospital).release_records
    state, batch_id = records.progress(c.confirmation_id)
    assert state == "done" and batch_id
    batch = hospital.node.catalog.get_batch(batch_id, "outbound")
    assert batch.sealed and batch.expected == 24 and batch.ref == c.confirmation_id
    in_batch = hospital.node.catalog.batch_transfers(batch_id, "outbound")
    assert sorted(t.transfer_id for t in in_batch) == sorted(reply.transfer_ids)
    assert len({t.object_id for t in in_batch}) == 24
    assert len(factory.node.catalog.list_objects(case_id=CASE)) == 24
    # The scratch folder of the workers is empty again.
    assert [p.name for p in role(hospital).releaser.scratch.iterdir()] == []


def test_workers_start_in_the_quiet_period_of_a_large_study(
    federation: Federation, tmp_path: Path
) -> None:
    """Once the ingest pauses with a study of ``deid.pool_min_instances`` or more still
    in its quiet period, the worker pool starts — before the study is ``received`` — so
    a clinician confirming right after does not wait for the workers to load; a smaller
    study starts none."""
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital",
            dicom={"quiet_period_seconds": 3600},
            extra=TRANSFER + "[deid]\nworkers = 2\npool_min_instances = 3\n",
        )
    )  # fmt: skip
    try:
        releaser = role(hospital).releaser
        assert releaser.pool.workers == 2 and releaser.pool_min_instances == 3
        push(role(hospital).dicom_port, ct_series(2, rows=16, cols=16))
        hospital.settle()
        time.sleep(2.5)  # two ticks of the ticker: still fewer instances than the minimum
        assert releaser.pool.pids == []
        push(role(hospital).dicom_port, ct_series(3, rows=16, cols=16))
        wait_for(lambda: len(releaser.pool.pids) == 2, timeout=30, what="workers started")
        assert {s.status for s in role(hospital).studies.list_studies()} == {"receiving"}
        assert all(Path(f"/proc/{pid}").exists() for pid in releaser.pool.pids)
    finally:
        hospital.stop()


def test_release_uses_worker_processes_with_bytes_identical_to_the_serial_path(
    pool_pair: tuple[InProcessNode, Any], federation: Federation
) -> None:
    """Two worker processes (not the node's pid) de-identify; every released object is
    the SHA-256 of what the de-identifier's public entry point gives in the node."""
    hospital, factory = pool_pair
    datasets = list(ct_series(12, rows=64, cols=64))
    study_uid = received(hospital, datasets)
    reply = confirm(hospital.client(clinician(federation)).channel, study_uid)
    releaser = role(hospital).releaser
    pids = releaser.pool.pids
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)

    deid = releaser.deidentifier_for(releaser.recipient(CASE, "factory-1"))
    pseudonym = releaser.recipient(CASE, "factory-1").pseudonym
    rows = releaser.records.releases(reply.confirmation.confirmation_id)
    assert len(rows) == 12 and {r.status for r in rows} == {"released"}
    for r in rows:
        source = read_object(hospital.node.store, r.source_object_id)
        serial, result = deid.deidentify_part10(source, pseudonym)
        assert hashlib.sha256(serial).hexdigest() == r.deid_object_id
        assert read_object(hospital.node.store, r.deid_object_id) == serial
        assert result.new_sop_uid == r.deid_sop_instance_uid
        assert (result.geometry_hash, result.pixel_hash) == (r.geometry_sha256, r.pixel_sha256)
    wait_done(hospital, reply.transfer_ids)
    got = {o.object_id for o in factory.node.catalog.list_objects(case_id=CASE)}
    assert got == {r.deid_object_id for r in rows}

    # The pool stops with the node: no worker outlives it.
    hospital.stop()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), timeout=20,
             what="the worker processes to exit")  # fmt: skip


def test_pool_outcomes_come_from_other_processes_and_match_inline(tmp_path: Path) -> None:
    """The pool on its own: each outcome names the worker pid that made it; with one
    and with two workers the outputs are the same bytes as de-identified in this process."""
    deid = Deidentifier(b"k" * 32).for_recipient(b"patient\x00factory-1")
    datas = [to_part10(ds) for ds in ct_series(6, rows=32, cols=32)]
    salt = b"s" * 16
    from hospital_node.deid_pool import deidentify_one

    inline = [deidentify_one(deid, d, "YG-0123456789AB", False, tmp_path, salt) for d in datas]
    clear_scratch(tmp_path)
    for workers in (1, 2):
        pool = DeidPool(workers, tmp_path)
        try:
            jobs = [(i, (lambda d=d: d)) for i, d in enumerate(datas)]
            got = dict(
                item for group in pool.run(deid, "YG-0123456789AB", False, jobs, salt)
                for item in group
            )  # fmt: skip
            assert len(pool.pids) == workers
            assert {o.pid for o in got.values()} <= set(pool.pids)
            assert os.getpid() not in {o.pid for o in got.values()}
            assert [got[i].object_id for i in range(6)] == [o.object_id for o in inline]
            for o in got.values():
                assert hashlib.sha256(Path(o.path).read_bytes()).hexdigest() == o.object_id
                assert o.findings == () and o.status == "released"
        finally:
            pool.close()
        assert clear_scratch(tmp_path) == 6


def test_a_worker_killed_mid_release_loses_no_instance(tmp_path: Path) -> None:
    """SIGKILL of a worker while it holds instances: they are de-identified in this
    process instead, every outcome arrives once, and the next run starts a new worker."""
    import signal

    deid = Deidentifier(b"k" * 32).for_recipient(b"patient\x00factory-1")
    datas = [to_part10(ds) for ds in ct_series(20, rows=64, cols=64)]
    salt = b"s" * 16
    from hospital_node.deid_pool import deidentify_one

    expected = [
        deidentify_one(deid, d, "YG-0123456789AB", False, tmp_path, salt).object_id for d in datas
    ]
    clear_scratch(tmp_path)
    pool = DeidPool(2, tmp_path)
    try:
        jobs = [(i, (lambda d=d: d)) for i, d in enumerate(datas)]
        got: dict[int, Any] = {}
        victim = 0
        for group in pool.run(deid, "YG-0123456789AB", False, jobs, salt):
            for i, outcome in group:
                assert i not in got
                got[i] = outcome
            if not victim:
                victim = pool.pids[0]
                os.kill(victim, signal.SIGKILL)
        assert [got[i].object_id for i in range(20)] == expected
        assert {o.status for o in got.values()} == {"released"}
        assert victim not in pool.pids
        list(pool.run(deid, "YG-0123456789AB", False, jobs[:2], salt))
        assert len(pool.pids) == 2 and victim not in pool.pids
    finally:
        pool.close()


def test_two_patients_in_one_study_are_refused_before_anything_is_sent(
    pool_pair: tuple[InProcessNode, Any], federation: Federation
) -> None:
    """The last instance names another Patient ID: refused, no confirmation, no
    de-identified object, no transfer — the first instances did not leave either."""
    hospital, factory = pool_pair
    study = StudyInfo()
    datasets = list(ct_series(10, rows=32, cols=32, study=study))
    other = StudyInfo(study_uid=study.study_uid, patient_id="OTHER-4711")
    datasets[-1] = next(ct_series(1, rows=32, cols=32, study=other))
    study_uid = received(hospital, datasets)
    with pytest.raises(grpc.RpcError) as err:
        confirm(hospital.client(clinician(federation)).channel, study_uid)
    assert "more than one patient" in (err.value.details() or "")
    assert "OTHER-4711" not in (err.value.details() or "")
    n = hospital.node
    assert n.catalog.list_transfers(direction="outbound") == []
    assert n.audit.events(event="deid.applied") == []
    assert role(hospital).release_records.confirmations(study_uid) == []
    assert {o.labels.get("source") for o in n.catalog.list_objects()} == {"dicom-scp"}
    (failed,) = n.audit.events(event="case.confirmation")
    assert failed.outcome == "failure" and failed.details["error"] == "StudyNotReady"
    assert factory.node.catalog.list_objects() == []


# --- SIGKILL in the middle of a confirmation ------------------------------------------------


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:  # a thread that just ended
            continue
    return found


def _rows(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(
            conn.execute("SELECT status, COUNT(*) FROM hospital_releases GROUP BY status")
        )
    except sqlite3.OperationalError:  # the table is not there yet
        return {}
    finally:
        conn.close()


def test_sigkill_during_confirmation_resumes_and_sends_every_instance_exactly_once(
    federation: Federation, tmp_path: Path
) -> None:
    """The hospital (``yigong serve``) is SIGKILLed while some instances are released and
    others still pending; its workers exit with it; restarted, it finishes the release:
    each instance de-identified once into the store, queued once, delivered once."""
    n = 80
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    config = write_config(
        federation, tmp_path, "hospital-1", "hospital",
        peers={"factory-1": factory.address}, extra=TRANSFER + POOL,
        dicom={"quiet_period_seconds": 0.5},
    )  # fmt: skip
    node = NodeProcess(config, tmp_path / "hospital.log")
    data_dir = tmp_path / "hospital-1-data"
    catalog_db = data_dir / "catalog.sqlite"
    creds = federation.creds(federation.node("hospital-1", "hospital"))
    try:
        node.start()
        ready = json.loads(config.with_suffix(".ready").read_text())
        datasets = list(ct_series(n, rows=256, cols=256))
        study_uid = str(datasets[0].StudyInstanceUID)
        push(int(ready["dicom_port"]), datasets)
        with NodeClient(node.address, creds, node_id="hospital-1") as client:
            stub = hospital_pb2_grpc.HospitalStub(client.channel)
            req = hospital_pb2.GetHospitalStudyRequest(study_uid=study_uid)
            wait_for(lambda: stub.GetStudy(req, timeout=30).study.status == "received",
                     timeout=60, what="the study to be received")  # fmt: skip

        assert node.proc is not None  # a large study received: the workers start already
        wait_for(lambda: len(_children(node.proc.pid)) >= 2, timeout=60,  # type: ignore[union-attr]
                 what="the de-identification workers to start before the confirmation")  # fmt: skip

        errors: list[BaseException] = []

        def call() -> None:
            with NodeClient(node.address, clinician(federation), node_id="hospital-1") as c:
                try:
                    confirm(c.channel, study_uid)
                except grpc.RpcError as exc:  # the node dies under the call
                    errors.append(exc)

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        wait_for(lambda: _rows(catalog_db).get("released", 0) >= 3, timeout=120,
                 interval=0.005, what="a few instances released")  # fmt: skip
        assert node.proc is not None
        workers = _children(node.proc.pid)
        node.kill()
        thread.join(30)
        at_kill = _rows(catalog_db)
        assert at_kill.get("pending", 0) > 0, at_kill  # killed mid-release
        assert errors, "the confirm call cannot have succeeded"
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in workers), timeout=30,
                 what="the workers to exit with their node")  # fmt: skip

        node.start()  # resume() finishes the release
        wait_for(lambda: len(factory.node.catalog.list_objects(case_id=CASE)) >= n,
                 timeout=240, what="every instance at the factory")  # fmt: skip
        time.sleep(1.0)  # anything sent twice would show up now
    finally:
        node.stop()
        factory_objects = factory.node.catalog.list_objects(case_id=CASE, limit=1000)
        factory_in = factory.node.catalog.list_transfers(direction="inbound", limit=1000)
        factory.stop()

    catalog = Catalog(catalog_db)
    try:
        rows = catalog.query(
            "SELECT status, deid_object_id, transfer_id FROM hospital_releases"
        )
        assert len(rows) == n and {r["status"] for r in rows} == {"released"}
        objects = {r["deid_object_id"] for r in rows}
        transfers = {r["transfer_id"] for r in rows}
        assert len(objects) == len(transfers) == n
        outbound = catalog.list_transfers(direction="outbound", limit=1000)
        assert sorted(t.transfer_id for t in outbound) == sorted(transfers)  # queued once each
        assert {t.status for t in outbound} == {"done"}
        (progress,) = catalog.query("SELECT state, batch_id FROM hospital_release_progress")
        assert progress["state"] == "done"
        batch = catalog.get_batch(progress["batch_id"], "outbound")
        assert batch.sealed and batch.expected == n
    finally:
        catalog.close()
    assert {o.object_id for o in factory_objects} == objects
    done_in = [t for t in factory_in if t.status == "done"]
    assert sorted(t.object_id for t in done_in) == sorted(objects)  # delivered once each
    for oid in objects:  # bit-identical in the hospital's store
        path = data_dir / "objects" / oid[:2] / oid[2:4] / oid
        assert hashlib.sha256(path.read_bytes()).hexdigest() == oid
    assert list((data_dir / "spool" / "release").iterdir()) == []  # no stray scratch file
    audit = AuditLog(data_dir / "audit.sqlite", "hospital-1")
    try:
        confirmed = [e for e in audit.events(event="case.confirmation") if e.outcome == "success"]
        assert len(confirmed) == 1 and confirmed[0].details["released"] == n
        completed = audit.events(event="transfer.completed", limit=5000)
        assert sorted(e.object_id or "" for e in completed) == sorted(objects)
    finally:
        audit.close()
    assert "interrupted" in node.log_path.read_text() or "resum" in node.log_path.read_text()
