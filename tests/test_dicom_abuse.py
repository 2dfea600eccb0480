"""DICOM ingest under concurrency and abuse: several PACS at once keep per-instance
durability and share commits; a peer whose C-STORE data set never follows is cut off
after dicom.idle_timeout_seconds (audited, nothing stored); one address cannot take more
than dicom.max_associations_per_address associations; our own slow answers never count
as the peer's silence.

Real sockets throughout: dcmtk's storescu and pynetdicom as peers, a hospital node in
this process. Loopback addresses tell peers apart (127.0.0.2 is "another machine")."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.audit import DICOM_ASSOCIATION_REFUSED
from gateway.config import load_config
from gateway.errors import ConfigError, NotFound
from gateway.hashing import sha256_hex
from hospital_node.ingest import Filing, wrap_dataset
from hospital_node.spool import DicomSpool
from hospital_node.studies import StudyCatalog
from hospital_node.wire.scp import DicomServer
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.dicom_factory import SeriesInfo, StudyInfo, ct_series, to_part10

STORESCU = "/usr/bin/storescu"  # pynetdicom installs its own `storescu` earlier on PATH
IDLE = 4.0
PER_ADDRESS = 4
DICOM = {
    "ae_title": "YIGONG",
    "allowed_addresses": ["127.0.0.0/8"],
    "max_associations": 10,
    "max_associations_per_address": PER_ADDRESS,
    "idle_timeout_seconds": IDLE,
    "quiet_period_seconds": 3600.0,
}
OTHER = "127.0.0.2"  # another peer address (the whole 127/8 is loopback on Linux)
needs_dcmtk = pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk storescu missing")


@pytest.fixture(scope="module")
def hospital(
    federation: Federation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessNode]:
    tmp = tmp_path_factory.mktemp("dicom-abuse")
    node = InProcessNode(write_config(federation, tmp, "hospital-abuse", "hospital", dicom=DICOM))
    yield node
    node.stop()


@pytest.fixture(autouse=True)
def quiet_peers(hospital: InProcessNode) -> None:
    """Each test starts with no association left open by the one before."""
    scp = server(hospital)
    wait_for(
        lambda: scp.associations_from("127.0.0.1") == scp.associations_from(OTHER) == 0,
        what="associations of the previous test to close",
    )


def server(node: InProcessNode) -> DicomServer:
    scp: DicomServer = node.node.hooks._dicom  # type: ignore[attr-defined]
    return scp


def spool_of(node: InProcessNode) -> DicomSpool:
    spool: DicomSpool = node.node.hooks.spool  # type: ignore[attr-defined]
    return spool


def studies_of(node: InProcessNode) -> StudyCatalog:
    node.settle()
    studies: StudyCatalog = node.node.hooks.studies  # type: ignore[attr-defined]
    return studies


def refusals(node: InProcessNode) -> list[Any]:
    node.settle()
    return node.node.audit.events(event=DICOM_ASSOCIATION_REFUSED, limit=100_000)


def write_series(folder: Path, n: int, study: StudyInfo, number: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for ds in ct_series(n, rows=16, cols=16, study=study, series=SeriesInfo(number=number)):
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        path.write_bytes(to_part10(ds))
        files.append(path)
    return files


def expected_part10(path: Path) -> bytes:
    """The Part-10 object the node must store for ``path``: its File Meta group, then
    the file's data set bytes exactly as sent."""
    meta, offset = split_dataset(path)
    return wrap_dataset(
        path.read_bytes()[offset:],
        sop_class_uid=meta.MediaStorageSOPClassUID,
        sop_instance_uid=meta.MediaStorageSOPInstanceUID,
        transfer_syntax=meta.TransferSyntaxUID,
    )


def storescu(port: int, files: Sequence[Path], aet: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STORESCU, "-aet", aet, "-aec", "YIGONG", "127.0.0.1", str(port),
         *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def associate(
    port: int, *, bind: str = "127.0.0.1", aet: str = "PACS1", seen: list[Any] | None = None
) -> Association:
    """An association from ``bind``; ``seen`` collects the ACSE primitives received."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    got: list[Any] = seen if seen is not None else []
    handlers: list[Any] = [(evt.EVT_ACSE_RECV, lambda event: got.append(event.primitive))]
    return ae.associate(
        "127.0.0.1", port, ae_title="YIGONG", bind_address=(bind, 0), evt_handlers=handlers
    )


@needs_dcmtk
def test_four_concurrent_storescu_each_instance_catalogued_once_commits_shared(
    hospital: InProcessNode, tmp_path: Path
) -> None:
    """4 storescu processes push 4 series at once: every instance acknowledged is
    stored byte-exact and catalogued exactly once; the filer files instances of
    several associations in one batch (one audit and one catalog commit)."""
    study = StudyInfo()
    series = {f"PACS{i}": write_series(tmp_path / str(i), 12, study, 10 + i) for i in range(4)}
    spool, ingest = spool_of(hospital), spool_of(hospital).ingest
    real_file = ingest.file
    pushed, batches = threading.Event(), []

    def file_after_the_pushes(filings: Sequence[Filing]) -> Any:
        pushed.wait(120)  # acks go on meanwhile: they wait only for the spool
        batches.append(sorted({f.calling_ae for f in filings}))
        return real_file(filings)

    ingest.file = file_after_the_pushes  # type: ignore[method-assign]
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        threads = [
            threading.Thread(target=lambda a=aet, f=files: results.__setitem__(
                a, storescu(server(hospital).port, f, a)))
            for aet, files in series.items()
        ]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert spool.waiting > 0  # all acknowledged while none was filed yet
    finally:
        pushed.set()
        hospital.settle()
        ingest.file = real_file  # type: ignore[method-assign]
    for aet, out in results.items():
        assert out.returncode == 0, (aet, out.stdout + out.stderr)
    assert len(results) == 4

    studies = studies_of(hospital)
    records = studies.instances(study.study_uid)
    assert len(records) == 48 and len({r.sop_instance_uid for r in records}) == 48
    by_uid = {r.sop_instance_uid: r for r in records}
    for aet, files in series.items():
        for path in files:
            rec = by_uid[dcmread(path, stop_before_pixels=True).SOPInstanceUID]
            part10 = expected_part10(path)
            assert (rec.calling_ae, rec.object_id, rec.duplicate) == (
                aet, sha256_hex(part10), False)  # fmt: skip
            with hospital.node.store.open_read(rec.object_id) as reader:
                assert b"".join(reader) == part10
    assert sum(len(a) for a in batches) >= 4 and any(len(a) > 1 for a in batches), batches


def _send_only(assoc: Association, ds_bytes: bytes, sop_uid: str, fragments: int) -> None:
    """Send a C-STORE's command and the first ``fragments`` P-DATA of its data set
    (never the last one), then nothing more: a peer that goes silent mid-request."""
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    req.DataSet = BytesIO(ds_bytes)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdatas = list(msg.encode_msg(int(cx.context_id or 0), 4096))  # small PDUs: fragments
    assert len(pdatas) > fragments + 1  # the data set's last fragment is never sent
    for pdata in pdatas[: 1 + fragments]:
        assoc.dul.send_pdu(pdata)


@needs_dcmtk
@pytest.mark.parametrize("fragments", [0, 2], ids=["command-only", "data-set-cut-off"])
def test_a_c_store_whose_data_set_never_follows_is_aborted_audited_and_not_stored(
    hospital: InProcessNode, tmp_path: Path, fragments: int
) -> None:
    """Two peers at 127.0.0.2 send a C-STORE command (and maybe part of its data set),
    then go silent. Meanwhile a PACS at 127.0.0.1 pushes a series: all stored. Each
    silent association is aborted after dicom.idle_timeout_seconds with a
    dicom.association_refused event naming the request; nothing of it is stored."""
    port = server(hospital).port
    before = len(refusals(hospital))
    study = StudyInfo()
    silent = list(ct_series(2, rows=128, cols=128, study=study))
    held = [associate(port, bind=OTHER, aet="SLOWPEER") for _ in silent]
    assert all(a.is_established for a in held)
    for assoc, ds in zip(held, silent, strict=True):
        raw = to_part10(ds)
        ds_bytes = raw[split_dataset_offset(raw) :]
        _send_only(assoc, ds_bytes, str(ds.SOPInstanceUID), fragments)

    files = write_series(tmp_path, 8, StudyInfo(), 3)
    out = storescu(port, files, "PACS1")
    assert out.returncode == 0, out.stdout + out.stderr

    wait_for(lambda: all(a.is_aborted for a in held), timeout=30, what="silent peers aborted")
    for assoc in held:
        assoc.join(5)
    new = wait_for(lambda: refusals(hospital)[before:], timeout=10, what="refusals audited")
    assert len(new) == 2
    assert sorted(e.details["sop_instance_uid"] for e in new) == sorted(
        str(ds.SOPInstanceUID) for ds in silent
    )
    for event in new:
        assert (event.peer, event.outcome, event.details["reject"]) == (OTHER, "failure", "A-ABORT")
        assert event.details["calling_ae"] == "SLOWPEER"
        reason = event.details["reason"]
        assert reason.startswith("C-STORE-RQ incomplete")
        assert f"dicom.idle_timeout_seconds={IDLE:g}" in reason and "nothing stored" in reason
        assert ("data set bytes received: 0" in reason) == (fragments == 0)

    studies = studies_of(hospital)
    with pytest.raises(NotFound):
        studies.get_study(study.study_uid)
    sent = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    stored = {r.sop_instance_uid for r in studies.instances(
        dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)}  # fmt: skip
    assert stored == sent


def split_dataset_offset(raw: bytes) -> int:
    """Where the data set starts in a Part-10 file (after preamble and File Meta)."""
    return 144 + int.from_bytes(raw[140:144], "little")


def test_one_address_gets_at_most_its_share_of_associations(hospital: InProcessNode) -> None:
    """dicom.max_associations_per_address=4: the 5th association from 127.0.0.2 is
    rejected (transient, local limit exceeded) and audited with the setting named;
    127.0.0.1 still gets in; once one is released, 127.0.0.2 gets in again."""
    scp = server(hospital)
    port = scp.port
    before = len(refusals(hospital))
    held = [associate(port, bind=OTHER) for _ in range(PER_ADDRESS)]
    try:
        assert all(a.is_established for a in held)
        seen: list[Any] = []
        extra = associate(port, bind=OTHER, aet="GREEDY", seen=seen)
        assert extra.is_rejected and not extra.is_established
        rj = seen[-1]
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)
        other = associate(port)
        assert other.is_established and other.send_c_echo().Status == 0x0000
        other.release()
        held.pop().release()
        wait_for(lambda: scp.associations_from(OTHER) < PER_ADDRESS, what="a slot freed")
        again = associate(port, bind=OTHER)
        assert again.is_established and again.send_c_echo().Status == 0x0000
        held.append(again)
    finally:
        for a in held:
            a.release()

    new = refusals(hospital)[before:]
    assert [(e.peer, e.details["calling_ae"], e.details["reject"]) for e in new] == [
        (OTHER, "GREEDY", "2/3/2")
    ]
    assert f"dicom.max_associations_per_address={PER_ADDRESS}" in new[0].details["reason"]


def test_a_slow_answer_is_not_the_peers_silence(
    hospital: InProcessNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answering takes longer than dicom.idle_timeout_seconds (e.g. waiting for room in
    the spool): the PACS waited for us, so its association stays up and the next
    C-STORE on it succeeds too."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    spool = spool_of(hospital)
    real_receive = spool.receive

    def slow_receive(part10: bytes, **kwargs: Any) -> None:
        time.sleep(IDLE + 1.5)
        real_receive(part10, **kwargs)

    monkeypatch.setattr(spool, "receive", slow_receive)
    first, second = ct_series(2, rows=16, cols=16, study=StudyInfo())
    assoc = associate(server(hospital).port)
    try:
        assert assoc.is_established
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_store(second).Status == 0x0000
        assert assoc.is_established and not assoc.is_aborted
    finally:
        assoc.release()
    monkeypatch.undo()
    records = studies_of(hospital).instances(str(first.StudyInstanceUID))
    assert {r.sop_instance_uid for r in records} == {first.SOPInstanceUID, second.SOPInstanceUID}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("idle_timeout_seconds", 0, "dicom.idle_timeout_seconds must be above 0"),
        ("idle_timeout_seconds", 7200, "at most 3600"),
        ("max_associations_per_address", 0, "dicom.max_associations_per_address must be at"),
    ],
)
def test_bad_idle_timeout_or_per_address_limit_is_a_config_error(
    federation: Federation, tmp_path: Path, key: str, value: float, message: str
) -> None:
    """Out-of-range values are refused at load with the key named."""
    config = write_config(
        federation, tmp_path, "hospital-badcfg", "hospital", dicom={**DICOM, key: value}
    )
    with pytest.raises(ConfigError, match=message):
        load_config(config)
