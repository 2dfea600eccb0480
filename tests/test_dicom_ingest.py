"""DICOM ingest: dcmtk's storescu and pynetdicom, as PACS, push studies into a running
hospital node over real sockets; what is stored, catalogued, audited and assembled."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.audit import (
    DICOM_ASSOCIATION_REFUSED,
    DICOM_INSTANCE_RECEIVED,
)
from gateway.errors import NotFound
from gateway.fidelity.dicom import pixel_hash
from gateway.hashing import sha256_hex
from hospital_node.ingest import wrap_dataset
from hospital_node.spool import DicomSpool
from hospital_node.studies import StudyCatalog, report_digest
from tests.cluster import (
    Federation,
    InProcessNode,
    NodeProcess,
    broken,
    wait_for,
    write_config,
)
from tests.dicom_factory import IDENTIFYING_STRINGS, SeriesInfo, StudyInfo, ct_series, to_part10

STORESCU = "/usr/bin/storescu"  # pynetdicom installs its own `storescu` earlier on PATH
QUIET = 3600.0  # the background ticker never fires here; tests call tick() themselves
DICOM = {
    "ae_title": "YIGONG",
    "allowed_calling_aes": ["PACS1", "DCMTK"],
    "allowed_addresses": ["127.0.0.1"],
    "max_associations": 2,
    "quiet_period_seconds": QUIET,
}
needs_dcmtk = pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk storescu missing")


@pytest.fixture(scope="module")
def hospital(
    federation: Federation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessNode]:
    tmp = tmp_path_factory.mktemp("dicom-ingest")
    node = InProcessNode(write_config(federation, tmp, "hospital-scp", "hospital", dicom=DICOM))
    yield node
    node.stop()


@pytest.fixture(autouse=True)
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom sends a file's data set bytes as they are, without decoding them."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def port_of(node: InProcessNode) -> int:
    port: int = node.node.hooks.dicom_port  # type: ignore[attr-defined]
    assert port > 0
    return port


def studies_of(node: InProcessNode) -> StudyCatalog:
    """The node's study tables, once every acknowledged instance is filed in them."""
    node.settle()
    studies: StudyCatalog = node.node.hooks.studies  # type: ignore[attr-defined]
    return studies


def rle(ds: Dataset) -> Dataset:
    pixels = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    return ds


def write(ds: Dataset, folder: Path, syntax: str | None = None) -> Path:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(to_part10(ds))
    return path


def expected_part10(path: Path) -> tuple[bytes, bytes]:
    """(the Part-10 object the node must store for ``path``, the data set bytes sent).

    Only the data set travels over DICOM; the File Meta group is the node's own
    (:func:`wrap_dataset`, deterministic). So the stored object must be exactly that
    File Meta followed by the file's data set bytes — not a byte re-encoded."""
    meta, offset = split_dataset(path)
    data = path.read_bytes()[offset:]
    part10 = wrap_dataset(
        data,
        sop_class_uid=meta.MediaStorageSOPClassUID,
        sop_instance_uid=meta.MediaStorageSOPInstanceUID,
        transfer_syntax=meta.TransferSyntaxUID,
    )
    return part10, data


def push(
    port: int, files: Sequence[Path], *, aet: str = "PACS1", called: str = "YIGONG"
) -> list[Dataset]:
    """C-STORE ``files`` as pynetdicom (one presentation context per class and syntax)."""
    ae = AE(ae_title=aet)
    for pair in sorted({(m.MediaStorageSOPClassUID, m.TransferSyntaxUID) for m in _metas(files)}):
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(path) for path in files]
    finally:
        assoc.release()


def _metas(files: Sequence[Path]) -> list[Any]:
    return [split_dataset(path)[0] for path in files]


def storescu(port: int, files: Sequence[Path], aet: str = "DCMTK") -> subprocess.CompletedProcess:
    return subprocess.run(
        [STORESCU, "-xr", "-aet", aet, "-aec", "YIGONG", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def audit_events(node: InProcessNode, event: str) -> list[Any]:
    node.settle()
    return node.node.audit.events(event=event, limit=100_000)


@needs_dcmtk
def test_pacs_push_is_stored_exactly_catalogued_and_assembled(
    hospital: InProcessNode, tmp_path: Path
) -> None:
    """storescu and pynetdicom push a 2-series study (RLE, implicit, deflated, big endian
    included): stored byte-exact, catalogued, audited, assembled with a gap reported."""
    study = StudyInfo()
    series_a = SeriesInfo(number=3, slice_thickness="1.0", origin=(-100.0, -100.0, -80.0))
    series_b = SeriesInfo(number=4, slice_thickness="0.625", origin=(-90.0, -90.0, -60.0))
    a_files = []
    for i, ds in enumerate(ct_series(20, rows=32, cols=32, study=study, series=series_a)):
        if i == 7:
            continue  # the missing slice
        a_files.append(write(rle(ds) if i in (15, 16) else ds, tmp_path / "a"))
    syntaxes = {3: ImplicitVRLittleEndian, 4: DeflatedExplicitVRLittleEndian,
                5: ExplicitVRBigEndian}  # fmt: skip
    b_files = [
        write(ds, tmp_path / "b", syntaxes.get(i))
        for i, ds in enumerate(ct_series(20, rows=32, cols=32, study=study, series=series_b))
    ]
    port = port_of(hospital)

    sent = storescu(port, a_files)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert [rsp.Status for rsp in push(port, b_files)] == [0x0000] * 20
    echo = AE(ae_title="PACS1")
    echo.add_requested_context(Verification)
    assoc = echo.associate("127.0.0.1", port, ae_title="YIGONG")
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    studies = studies_of(hospital)
    summary = studies.get_study(study.study_uid)
    assert (summary.status, summary.instance_count, summary.series_count) == ("receiving", 39, 2)
    records = {r.sop_instance_uid: r for r in studies.instances(study.study_uid)}
    assert len(records) == 39
    for path in a_files + b_files:
        part10, data = expected_part10(path)
        rec = records[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        assert rec.object_id == sha256_hex(part10)
        with hospital.node.store.open_read(rec.object_id) as reader:
            stored = b"".join(reader)
        assert stored == part10 and stored.endswith(data)  # never transcoded
        assert rec.transfer_syntax == split_dataset(path)[0].TransferSyntaxUID
        assert rec.pixel_sha256 == pixel_hash(dcmread(path))
        assert rec.calling_ae == ("DCMTK" if path in a_files else "PACS1")
        assert (rec.called_ae, rec.burned_in, rec.duplicate) == ("YIGONG", "NO", False)
        obj = hospital.node.catalog.get_object(rec.object_id)
        assert (obj.media_type, obj.origin_node, obj.case_id, obj.size) == (
            "application/dicom", "hospital-scp", "", len(part10))  # fmt: skip
    assert {records[u].transfer_syntax for u in records} >= {RLELossless, ExplicitVRBigEndian}

    received = [
        e for e in audit_events(hospital, DICOM_INSTANCE_RECEIVED)
        if e.details.get("study_uid") == study.study_uid
    ]  # fmt: skip
    assert len(received) == 39 and {e.outcome for e in received} == {"success"}
    assert {e.object_id for e in received} == {r.object_id for r in records.values()}
    log_text = json.dumps([e.details for e in hospital.node.audit.events(limit=100_000)])
    assert not [s for s in IDENTIFYING_STRINGS if s in log_text]

    now = datetime.now(UTC)
    assert study.study_uid not in studies.tick(now, QUIET)
    assert study.study_uid in studies.tick(now + timedelta(seconds=QUIET + 1), QUIET)
    assert studies.tick(now + timedelta(seconds=QUIET + 2), QUIET) == []
    summary = studies.get_study(study.study_uid)
    assert summary.status == "received" and summary.received_at
    assert summary.report_sha256 == report_digest(summary.report)
    assert summary.report["study_uid"] == study.study_uid and summary.report["duplicates"] == []
    by_uid = {s["series_uid"]: s for s in summary.report["series"]}
    a, b = by_uid[series_a.series_uid], by_uid[series_b.series_uid]
    assert a["instance_count"] == 19 and a["gaps"] == [[-74.0, -72.0]]
    assert a["missing_slices_estimate"] == 1 and a["spacing_uniform"] is False
    assert a["spacing_median_mm"] == 1.0 and a["slice_thickness_mm"] == [1.0]
    assert b["instance_count"] == 20 and b["gaps"] == [] and b["spacing_uniform"] is True
    assert b["spacing_median_mm"] == 0.625 and b["slice_thickness_mm"] == [0.625]
    for s in (a, b):
        assert s["orientation_consistent"] is True and s["gantry_tilt_deg"] == 0.0
        assert s["pixel_spacing_mm"] == [[0.488281, 0.488281]] and s["normal"] == [0, 0, 1]


def test_duplicates_identical_resend_and_conflicting_bytes(
    hospital: InProcessNode, tmp_path: Path
) -> None:
    """Same UID and bytes again: success, one copy. Same UID, other bytes: both kept, flagged."""
    study = StudyInfo()
    ds = next(ct_series(1, rows=16, cols=16, study=study))
    first = write(ds, tmp_path / "1")
    ds.WindowCenter = "400"  # same SOP Instance UID, different bytes
    second = write(ds, tmp_path / "2")
    port, studies = port_of(hospital), studies_of(hospital)

    assert [r.Status for r in push(port, [first, first])] == [0, 0]
    hospital.settle()  # acknowledged instances are filed right after the answer
    assert len(studies.instances(study.study_uid)) == 1
    assert [r.Status for r in push(port, [second])] == [0]
    hospital.settle()
    rows = studies.instances(study.study_uid)
    assert [r.duplicate for r in rows] == [False, True]
    ids = [sha256_hex(expected_part10(p)[0]) for p in (first, second)]
    assert [r.object_id for r in rows] == ids and all(hospital.node.store.exists(i) for i in ids)
    summary = studies.get_study(study.study_uid)
    assert (summary.instance_count, summary.series_count) == (1, 1)
    studies.tick(datetime.now(UTC) + timedelta(seconds=QUIET + 1), QUIET)
    report = studies.get_study(study.study_uid).report
    assert report["duplicates"] == [
        {"sop_instance_uid": ds.SOPInstanceUID, "series_uid": ds.SeriesInstanceUID,
         "object_ids": ids}
    ]  # fmt: skip
    assert report["series"][0]["instance_count"] == 1

    later = write(next(ct_series(2, rows=16, cols=16, study=study)), tmp_path / "3")
    assert [r.Status for r in push(port, [later])] == [0]  # re-opens the received study
    reopened = studies.get_study(study.study_uid)
    assert (reopened.status, reopened.report, reopened.report_sha256) == ("receiving", {}, "")
    studies.tick(datetime.now(UTC) + timedelta(seconds=QUIET + 1), QUIET)
    summary = studies.get_study(study.study_uid)
    assert (summary.status, summary.instance_count, summary.series_count) == ("received", 2, 2)


def spool_of(node: InProcessNode) -> DicomSpool:
    spool: DicomSpool = node.node.hooks.spool  # type: ignore[attr-defined]
    return spool


def test_spool_failure_answers_a700_and_records_nothing(
    hospital: InProcessNode, tmp_path: Path
) -> None:
    """The spool cannot be written during C-STORE: 0xA700 (retry), nothing catalogued."""
    study = StudyInfo()
    path = write(next(ct_series(1, rows=16, cols=16, study=study)), tmp_path)
    object_id = sha256_hex(expected_part10(path)[0])
    with broken(spool_of(hospital).directory):
        (rsp,) = push(port_of(hospital), [path])
    assert (rsp.Status, rsp.ErrorComment) == (0xA700, "storage failed; send again later")
    assert hospital.node.catalog.find_object(object_id) is None
    with pytest.raises(NotFound):
        studies_of(hospital).get_study(study.study_uid)
    events = [
        e for e in audit_events(hospital, DICOM_INSTANCE_RECEIVED) if e.object_id == object_id
    ]
    assert [(e.outcome, e.details["error"]) for e in events] == [("failure", "StorageError")]
    assert "DICOM spool" in events[0].details["reason"]

    (rsp,) = push(port_of(hospital), [path])  # what the PACS does next: send it again
    assert rsp.Status == 0x0000
    assert studies_of(hospital).get_study(study.study_uid).instance_count == 1
    assert hospital.node.catalog.get_object(object_id).media_type == "application/dicom"
    assert list(spool_of(hospital).directory.glob("*.dcm")) == []


def test_store_failure_after_spooling_is_retried_and_refuses_new_instances(
    hospital: InProcessNode, tmp_path: Path
) -> None:
    """The object store fails behind the spool: the instance already acknowledged waits
    in the spool and is filed once the store is back; while filing fails, new instances
    get 0xA700 and are not recorded; nothing is filed twice."""
    study = StudyInfo()
    first, second = (
        write(ds, tmp_path / str(i))
        for i, ds in enumerate(ct_series(2, rows=16, cols=16, study=study))
    )
    ids = [sha256_hex(expected_part10(p)[0]) for p in (first, second)]
    spool = spool_of(hospital)
    root: Path = hospital.node.store.root  # type: ignore[attr-defined]
    with broken(root):
        (rsp,) = push(port_of(hospital), [first])
        assert rsp.Status == 0x0000  # durable in the spool: acknowledged
        wait_for(lambda: spool._failure is not None, timeout=10, what="filing to fail")
        (rsp,) = push(port_of(hospital), [second])
        assert (rsp.Status, rsp.ErrorComment) == (0xA700, "storage failed; send again later")
        assert spool.waiting == 1 and len(list(spool.directory.glob("*.dcm"))) == 1
        assert hospital.node.catalog.find_object(ids[0]) is None  # not filed yet
    assert hospital.node.catalog.find_object(ids[1]) is None
    assert [r.object_id for r in studies_of(hospital).instances(study.study_uid)] == [ids[0]]
    with hospital.node.store.open_read(ids[0]) as reader:
        assert b"".join(reader) == expected_part10(first)[0]
    events = audit_events(hospital, DICOM_INSTANCE_RECEIVED)
    assert [(e.outcome, e.details.get("error")) for e in events if e.object_id in ids] == [
        ("failure", "StorageError"),  # the refused second instance
        ("success", None),  # the first, filed after the store came back
    ]
    assert list(spool.directory.glob("*.dcm")) == []
    (rsp,) = push(port_of(hospital), [second])
    assert rsp.Status == 0x0000
    assert len(studies_of(hospital).instances(study.study_uid)) == 2


def _rejection(port: int, *, aet: str = "PACS1", called: str = "YIGONG",
               bind: str = "127.0.0.1") -> tuple[int, int, int]:  # fmt: skip
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ the node answers with."""
    seen: list[Any] = []
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=called, bind_address=(bind, 0),
        evt_handlers=[(evt.EVT_ACSE_RECV, lambda event: seen.append(event.primitive))],
    )  # fmt: skip
    assert assoc.is_rejected and not assoc.is_established
    rj = seen[-1]
    return rj.result, rj.result_source, rj.diagnostic


@needs_dcmtk
def test_refused_associations_are_rejected_and_audited(
    hospital: InProcessNode, tmp_path: Path
) -> None:
    """Unknown calling AE, wrong called AE, address not allowed, too many associations:
    A-ASSOCIATE-RJ with the PS3.8 reason, and a dicom.association_refused event each."""
    port = port_of(hospital)
    before = len(audit_events(hospital, DICOM_ASSOCIATION_REFUSED))
    assert _rejection(port, aet="INTRUDER") == (1, 1, 3)
    assert _rejection(port, called="SOMEONE") == (1, 1, 7)
    assert _rejection(port, bind="127.0.0.2") == (1, 1, 1)
    out = storescu(port, [write(next(ct_series(1, rows=16, cols=16)), tmp_path)], aet="NOTAPACS")
    assert out.returncode != 0 and "Association Rejected" in out.stdout + out.stderr

    ae = AE(ae_title="PACS1")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", port, ae_title="YIGONG") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        assert _rejection(port) == (2, 3, 2)  # transient, local limit exceeded
    finally:
        for a in held:
            a.release()

    refused = audit_events(hospital, DICOM_ASSOCIATION_REFUSED)[before:]
    got = sorted((e.details["calling_ae"], e.details["called_ae"], e.peer) for e in refused)
    assert got == sorted([
        ("INTRUDER", "YIGONG", "127.0.0.1"), ("PACS1", "SOMEONE", "127.0.0.1"),
        ("PACS1", "YIGONG", "127.0.0.2"), ("NOTAPACS", "YIGONG", "127.0.0.1"),
        ("PACS1", "YIGONG", "127.0.0.1"),
    ])  # fmt: skip
    assert {e.outcome for e in refused} == {"failure"}
    assert all(e.details["reason"] for e in refused)


def test_quiet_period_ticker_marks_studies_received(federation: Federation, tmp_path: Path) -> None:
    """The role's background ticker turns a study 'received' after dicom.quiet_period_seconds."""
    dicom = {**DICOM, "quiet_period_seconds": 0.3}
    node = InProcessNode(
        write_config(federation, tmp_path, "hospital-tick", "hospital", dicom=dicom)
    )
    try:
        study = StudyInfo()
        files = [write(ds, tmp_path / "s") for ds in ct_series(3, rows=16, cols=16, study=study)]
        assert [r.Status for r in push(port_of(node), files)] == [0, 0, 0]
        studies = studies_of(node)
        summary = wait_for(
            lambda: (s := studies.get_study(study.study_uid)).status == "received" and s,
            timeout=10,
            what="the study to turn 'received'",
        )
        assert summary.report["series"][0]["instance_count"] == 3
    finally:
        node.stop()


def test_serve_reports_dicom_port_in_ready_file(federation: Federation, tmp_path: Path) -> None:
    """`yigong serve` starts the SCP of a hospital node and writes its port to the ready file."""
    config = write_config(federation, tmp_path, "hospital-serve", "hospital", dicom=DICOM)
    proc = NodeProcess(config, tmp_path / "serve.log")
    try:
        proc.start()
        ready = json.loads(config.with_suffix(".ready").read_text())
        assert ready["dicom_port"] > 0 and ready["port"] == proc.port
        ae = AE(ae_title="PACS1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", ready["dicom_port"], ae_title="YIGONG")
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
    finally:
        assert proc.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    assert f"DICOM on 127.0.0.1:{ready['dicom_port']}" in log
    shutil.rmtree(tmp_path / "hospital-serve-data", ignore_errors=True)


@pytest.mark.parametrize(
    "sop_class, sop_instance, syntax",
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.34", "1.2.840.10008.1.2.1"),
        (
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.826.0.1.3680043.8.498." + "1" * 38,
            "1.2.840.10008.1.2.4.201",
        ),
        ("1.2.840.10008.5.1.4.1.1.2", "2.25.1" + "0" * 57, "1.2.840.10008.1.2.1.99"),
    ],
)
def test_file_meta_is_byte_identical_to_pydicoms(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    """The File Meta group is encoded directly (it is on every C-STORE's path); it must
    stay exactly what pydicom writes, or object ids would change."""
    from hospital_node.ingest import wrap_dataset_pydicom

    args = {"sop_class_uid": sop_class, "sop_instance_uid": sop_instance, "transfer_syntax": syntax}
    assert wrap_dataset(b"\x08\x00", **args) == wrap_dataset_pydicom(b"\x08\x00", **args)
