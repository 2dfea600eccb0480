"""The DICOM spool (hospital_node.spool): acknowledged instances survive a crash and are
filed exactly once after a restart; torn and damaged spool files are never filed and
never silently deleted; a full spool refuses with a clear error.

The first test kills a real ``yigong serve`` process (SIGKILL) between the answer to
the PACS and the filing; the others drive a DicomSpool over a real store, catalog and
audit log in a temporary directory."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from gateway.audit import DICOM_INSTANCE_RECEIVED, AuditLog
from gateway.catalog import Catalog
from gateway.errors import StorageError
from gateway.hashing import sha256_hex
from gateway.rpc.client import NodeClient
from gateway.storage.filesystem import FilesystemStore
from hospital_node.ingest import Ingest, wrap_dataset
from hospital_node.spool import DicomSpool
from hospital_node.studies import StudyCatalog
from tests.cluster import Federation, NodeProcess, wait_for, write_config
from tests.dicom_factory import StudyInfo, ct_series, to_part10
from yigong.v1 import hospital_pb2, hospital_pb2_grpc

DICOM = {"ae_title": "YIGONG", "allowed_calling_aes": ["PACS1"], "quiet_period_seconds": 3600.0}


def part10_of(ds: object) -> bytes:
    raw = to_part10(ds)  # type: ignore[arg-type]
    start = 144 + int.from_bytes(raw[140:144], "little")
    return wrap_dataset(
        raw[start:], sop_class_uid=str(ds.SOPClassUID),  # type: ignore[attr-defined]
        sop_instance_uid=str(ds.SOPInstanceUID),  # type: ignore[attr-defined]
        transfer_syntax="1.2.840.10008.1.2.1",
    )  # fmt: skip


@pytest.fixture(autouse=True)
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)


def test_acknowledged_instance_survives_sigkill_and_is_filed_once(
    federation: Federation, tmp_path: Path
) -> None:
    """The store fails, so the acknowledged instance waits in the spool; the node is
    SIGKILLed; the store comes back; the restarted node files it, once."""
    config = write_config(federation, tmp_path, "hospital-kill", "hospital", dicom=DICOM)
    node = NodeProcess(config, tmp_path / "node.log")
    node.start()
    ready = json.loads(config.with_suffix(".ready").read_text())
    data_dir = tmp_path / "hospital-kill-data"
    root, spool = data_dir / "objects", data_dir / "dicom-spool"
    ds = next(ct_series(1, rows=32, cols=32, study=StudyInfo()))
    object_id = sha256_hex(part10_of(ds))
    shutil.rmtree(root)
    root.write_bytes(b"not a directory: every put into the store fails")
    try:
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", int(ready["dicom_port"]), ae_title="YIGONG")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000  # durable in the spool: acknowledged
        wait_for(lambda: "filing 1 instance(s) failed" in node.log_path.read_text(),
                 timeout=20, what="the filer to fail")  # fmt: skip
        assert len(list(spool.glob("*.dcm"))) == 1
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
    finally:
        root.unlink()
        root.mkdir()
    node.start()
    try:
        creds = federation.creds(federation.node("hospital-kill", "hospital"))
        with NodeClient(node.address, creds, node_id="hospital-kill") as client:
            stub = hospital_pb2_grpc.HospitalStub(client.channel)
            study = stub.GetStudy(
                hospital_pb2.GetHospitalStudyRequest(study_uid=str(ds.StudyInstanceUID)),
                timeout=30,
            )
            assert [i.object_id for i in study.instances] == [object_id]
            assert [o.object_id for o in client.list_objects()] == [object_id]
    finally:
        node.stop()
    assert list(spool.glob("*.dcm")) == []
    with (root / object_id[:2] / object_id[2:4] / object_id).open("rb") as fh:
        assert sha256_hex(fh.read()) == object_id
    audit = AuditLog(data_dir / "audit.sqlite", "hospital-kill")
    events = [e for e in audit.events(event=DICOM_INSTANCE_RECEIVED) if e.object_id == object_id]
    assert [(e.outcome, e.details.get("replayed")) for e in events] == [("success", True)]
    assert "acknowledged instance(s) from before the last stop are filed now" in (
        node.log_path.read_text()
    )


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Ingest, Path]]:
    store = FilesystemStore(tmp_path / "objects")
    store.check()
    catalog = Catalog(tmp_path / "catalog.sqlite")
    audit = AuditLog(tmp_path / "audit.sqlite", "hospital-test")
    yield Ingest(store, catalog, StudyCatalog(catalog), audit, "hospital-test"), tmp_path / "spool"
    catalog.close()


def _name(seq: int, size: int) -> str:
    head = json.dumps(["PACS1", "YIGONG", "2026-11-22T08:00:00.000000Z"]).encode()
    return f"{seq:016d}.{size}.{base64.urlsafe_b64encode(head).decode()}.dcm"


def test_restart_files_complete_files_removes_torn_ones_and_sets_damaged_aside(
    parts: tuple[Ingest, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hospital_node.spool")
    ingest, directory = parts
    good, torn = (part10_of(ds) for ds in ct_series(2, rows=16, cols=16))
    directory.mkdir()
    (directory / _name(1, len(good))).write_bytes(good)
    (directory / _name(2, len(torn))).write_bytes(torn[:-100])  # cut off by a crash
    (directory / _name(3, 12)).write_bytes(b"not dicom!!!")  # complete, but no instance
    (directory / "0000000000000004.bad-name.dcm").write_bytes(good)
    spool = DicomSpool(ingest, directory)
    assert spool.start() == 2  # the good one and the damaged one are queued
    try:
        spool.settle(timeout=20)
    finally:
        spool.stop()
    assert [r.object_id for r in ingest.studies.instances(_study_of(good))] == [sha256_hex(good)]
    assert sorted(p.name for p in directory.iterdir()) == ["rejected"]
    assert sorted(p.name for p in (directory / "rejected").iterdir()) == [
        _name(3, 12), "0000000000000004.bad-name.dcm",
    ]  # fmt: skip
    said = caplog.text
    assert "incomplete, never acknowledged" in said and "set aside" in said
    # new instances get numbers never used before, so nothing set aside is overwritten
    spool = DicomSpool(ingest, directory)
    spool.start()
    try:
        spool.receive(good, calling_ae="PACS1", called_ae="YIGONG")
        spool.settle(timeout=20)
    finally:
        spool.stop()
    assert len(list((directory / "rejected").iterdir())) == 2


def _study_of(part10: bytes) -> str:
    from hospital_node.ingest import parse_instance

    return parse_instance(part10).study_uid


def test_a_full_spool_refuses_with_the_setting_named(parts: tuple[Ingest, Path]) -> None:
    """With the filer not running, the second instance finds no room."""
    ingest, directory = parts
    first, second = (part10_of(ds) for ds in ct_series(2, rows=16, cols=16))
    directory.mkdir()
    spool = DicomSpool(ingest, directory, max_waiting=1)  # not started: nothing is filed
    spool.room_wait_seconds = 0.2
    spool.receive(first, calling_ae="PACS1", called_ae="YIGONG")
    with pytest.raises(StorageError, match=r"dicom\.spool_max_waiting=1"):
        spool.receive(second, calling_ae="PACS1", called_ae="YIGONG")
    assert spool.waiting == 1 and len(list(directory.glob("*.dcm"))) == 1
    refused = ingest.audit.events(event=DICOM_INSTANCE_RECEIVED)
    assert [(e.outcome, e.object_id) for e in refused] == [("failure", sha256_hex(second))]
    spool = DicomSpool(ingest, directory, max_waiting=1)  # as after a restart
    assert spool.start() == 1  # the filer takes the waiting one
    try:
        spool.settle(timeout=20)
        spool.receive(second, calling_ae="PACS1", called_ae="YIGONG")
        spool.settle(timeout=20)
    finally:
        spool.stop()
    assert len(ingest.studies.instances(_study_of(first))) == 2


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, 1 << 20])
def test_filer_hashes_object_and_pixels_in_one_read(tmp_path: Path, chunk_bytes: int) -> None:
    """The filer reads a spool file once for both hashes, in chunks: whatever the chunk
    boundaries, the object id is the file's SHA-256 and the pixel hash is pixel_hash's."""
    from gateway.fidelity.dicom import pixel_hash_of
    from hospital_node.ingest import parse_instance
    from hospital_node.spool import _digests

    part10 = part10_of(next(ct_series(1, rows=16, cols=16)))
    path = tmp_path / "spooled.dcm"
    path.write_bytes(part10)
    parsed = parse_instance(part10, defer_pixel_hash=True)
    spans = (*parsed.pixel_spans, (0x7FE00011, len(part10), 0))  # an empty one at the end
    object_id, pixels = _digests(path, spans, chunk_bytes)
    assert object_id == sha256_hex(part10)
    expected = [(tag, part10[at : at + n]) for tag, at, n in spans]
    assert pixels == pixel_hash_of(expected) != pixel_hash_of(expected[:1])
    assert pixel_hash_of(expected[:1]) == parse_instance(part10).pixel_sha256
    assert _digests(path, (), chunk_bytes) == (object_id, "")
    with pytest.raises(StorageError, match="shorter than when it was parsed"):
        _digests(path, ((0x7FE00010, len(part10) - 4, 8),), chunk_bytes)
