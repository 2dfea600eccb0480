"""Approved designs exported into the hospital's PACS as Encapsulated STL (dcmtk storescp).

A real case across two real nodes (original study in by C-STORE, clinician confirmation,
design output, clinical and production confirmation), ExportDesign over mTLS, stored by a
real dcmtk storescp and read back with pydicom: in the patient's original study, mapped
back to the patient only inside the hospital; refusals name what is missing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import trimesh
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.cases.signing import PersonSigner
from gateway.config import PacsSection, PeerSection
from gateway.pki import IssuedCert
from gateway.rpc.cases_client import CaseClient
from hospital_node.role import HospitalRole
from hospital_node.stl_export import ENCAPSULATED_STL_STORAGE, encapsulated_document
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, SeriesInfo, StudyInfo, ct_series
from tests.test_cases import order, review
from tests.test_cases import stl as ascii_stl
from yigong.v1 import hospital_pb2, hospital_pb2_grpc
from yigong_node.cli import main

STORESCP = "/usr/bin/storescp"  # dcmtk's; pynetdicom's own 'storescp' shadows it on PATH
HOSPITAL, FACTORY = "hospital-1", "factory-1"
PEOPLE = {
    "clinician": ("exp-dr-li", "clinician", HOSPITAL),
    "engineer": ("exp-erin", "engineer", FACTORY),
    "hospital-engineer": ("exp-hank", "engineer", HOSPITAL),
    "officer": ("exp-oscar", "officer", HOSPITAL),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class World:
    fed: Federation
    hospital: InProcessNode
    factory: InProcessNode
    tmp: Path
    pacs: PacsSection
    pacs_dir: Path

    @property
    def role(self) -> HospitalRole:
        hooks = self.hospital.node.hooks
        assert isinstance(hooks, HospitalRole)
        return hooks

    def person(self, who: str) -> IssuedCert:
        return self.fed.person(*PEOPLE[who])

    def node_of(self, who: str) -> InProcessNode:
        return self.factory if who == "engineer" else self.hospital

    def sign(self, who: str, case_id: str, kind: str, data: dict[str, Any]) -> Any:
        person = self.person(who)
        signer = PersonSigner.from_files(person.cert_path, person.key_path)
        with self.node_of(who).client(self.fed.creds(person)) as nc:
            view = CaseClient(nc).sign(signer, case_id, kind, data)
        self.synced(case_id)
        return view

    def synced(self, case_id: str) -> None:
        hospital, factory = self.hospital.node.cases, self.factory.node.cases

        def same() -> bool:
            if factory.cases.find_case(case_id) is None:
                return False
            h = [r.record_hash for r in hospital.view(case_id).records]
            return h == [r.record_hash for r in factory.view(case_id).records]

        wait_for(same, timeout=15, what=f"both nodes to hold case {case_id}")

    def upload(self, case_id: str, name: str, data: bytes, media_type: str) -> str:
        """The engineer sends a design file to the hospital; returns its object id."""
        src = self.tmp / f"{case_id}-{name}"
        src.write_bytes(data)
        with self.factory.client(self.fed.creds(self.person("engineer"))) as nc:
            reply = nc.submit(src, [HOSPITAL], case_id=case_id, media_type=media_type)
        object_id = str(reply.object.object_id)
        catalog = self.hospital.node.catalog
        wait_for(lambda: catalog.find_object(object_id), 15, what="the design file at the hospital")
        return object_id

    def stub(self, who: str) -> hospital_pb2_grpc.HospitalStub:
        channel = self.hospital.client(self.fed.creds(self.person(who))).channel
        return hospital_pb2_grpc.HospitalStub(channel)

    def export(
        self, case_id: str, object_id: str, who: str = "clinician", again: bool = False
    ) -> hospital_pb2.ExportDesignResponse:
        req = hospital_pb2.ExportDesignRequest(case_id=case_id, object_id=object_id, again=again)
        reply: hospital_pb2.ExportDesignResponse = self.stub(who).ExportDesign(req, timeout=60)
        return reply

    def set_pacs(self, pacs: PacsSection) -> None:
        node = self.hospital.node
        node.cfg = dataclasses.replace(node.cfg, pacs=pacs)

    def stored(self, count: int) -> list[Path]:
        """Wait until storescp has written ``count`` files; return them (oldest first)."""
        wait_for(lambda: len(list(self.pacs_dir.iterdir())) >= count, 15, what="storescp files")
        files = sorted(self.pacs_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        assert len(files) == count
        return files


@pytest.fixture(scope="module")
def world(federation: Federation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("export")
    pacs_dir = tmp / "pacs"
    pacs_dir.mkdir()
    port = free_port()
    log = open(tmp / "storescp.log", "wb")
    storescp = subprocess.Popen(
        [STORESCP, "-aet", "PACS", "-od", str(pacs_dir), "--socket-timeout", "10", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    pacs = PacsSection(host="127.0.0.1", port=port, called_ae="PACS", timeout_seconds=10.0)
    extra = (
        "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n\n"
        f'[pacs]\nhost = "127.0.0.1"\nport = {port}\ncalled_ae = "PACS"\ntimeout_seconds = 10.0'
    )
    factory = InProcessNode(
        write_config(federation, tmp, FACTORY, "factory", peers={HOSPITAL: "127.0.0.1:9"})
    )
    hospital = InProcessNode(
        write_config(
            federation, tmp, HOSPITAL, "hospital", peers={FACTORY: factory.address}, extra=extra
        )
    )
    node = factory.node
    node.cfg = dataclasses.replace(node.cfg, peers=(PeerSection(HOSPITAL, hospital.address),))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if storescp.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "storescp.log").read_text()) from None
                time.sleep(0.05)
        yield World(federation, hospital, factory, tmp, pacs, pacs_dir)
    finally:
        hospital.stop()
        factory.stop()
        storescp.terminate()
        storescp.wait(10)
        log.close()


# --- driving a case -------------------------------------------------------------------------


def binary_stl(radius: float) -> bytes:
    mesh = trimesh.creation.icosphere(2, radius=radius)
    return bytes(trimesh.exchange.stl.export_stl(mesh))


def push(world: World, datasets: Iterable[Dataset]) -> None:
    """C-STORE the original study to the hospital's SCP (as a PACS would), then settle it."""
    ae = AE(ae_title="PACS")
    datasets = list(datasets)
    ae.add_requested_context(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", world.role.dicom_port, ae_title="YIGONG")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
    finally:
        assoc.release()
    world.role.settle()
    world.role.studies.tick(datetime.now(UTC), 0.0)


def open_case(world: World, case_id: str, study_uid: str) -> None:
    """Open the case, confirm the original study for it (vault and release store learn the
    patient), and sign the data confirmation, order and design input review."""
    with world.hospital.client(world.fed.creds(world.person("clinician"))) as nc:
        CaseClient(nc).create(case_id, FACTORY)
    req = hospital_pb2.ConfirmStudyRequest(
        study_uid=study_uid, case_id=case_id, destination=FACTORY
    )
    reply = world.stub("clinician").ConfirmStudy(req, timeout=60)
    catalog = world.hospital.node.catalog
    sent = [catalog.get_transfer(t, "outbound") for t in reply.transfer_ids]
    wait_for(
        lambda: all(catalog.get_transfer(t.transfer_id, "outbound").status == "done" for t in sent),
        30,
        what="the de-identified study at the factory",
    )
    deid_study = json.loads(reply.confirmation.record_json)["deid_study_uid"]
    world.sign(
        "clinician",
        case_id,
        "data_confirmation",
        {
            "studies": [deid_study],
            "complete": True,
            "confirmation_id": reply.confirmation.confirmation_id,
        },
    )
    pseudonym = world.role.vault.pseudonym(case_id)
    world.sign("clinician", case_id, "order", order() | {
        "patient": {"pseudonym": pseudonym, "age": 47, "sex": "female"}
    })  # fmt: skip
    world.sign("engineer", case_id, "design_input_review", review())


def design_output(world: World, case_id: str, files: list[str], **parameters: Any) -> str:
    data = {
        "files": [
            {"object_id": f, "name": f"part-{n}", "kind": "model"} for n, f in enumerate(files)
        ],
        "parameters": {"lattice": "diamond", "porosity": 0.65, **parameters},
        "safety_features": [{"feature": "stem-plate junction", "requirement": "fillet >= 2 mm"}],
    }
    view = world.sign("engineer", case_id, "design_output", data)
    return str(view.records[-1].record_hash)


def approve(world: World, case_id: str, design_hash: str, sides: Iterable[str]) -> None:
    for side in sides:
        who = "clinician" if side == "clinical" else "engineer"
        data = {"side": side, "decision": "confirmed", "design_hash": design_hash}
        world.sign(who, case_id, "design_confirmation", data)


def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in sorted(root.rglob("*")) if p.is_file())


# --- the tests ------------------------------------------------------------------------------


def test_approved_design_is_exported_into_the_original_study_in_the_pacs(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    study = StudyInfo()
    series = SeriesInfo()
    push(world, ct_series(3, rows=16, cols=16, study=study, series=series))
    case_id = "EXP-1"
    open_case(world, case_id, study.study_uid)
    stl = binary_stl(12.5)
    model = world.upload(case_id, "implant.stl", stl, "model/stl")
    design = design_output(world, case_id, [model])

    # Not approved yet: refused, naming the stage and who must still confirm.
    code, why = refused(lambda: world.export(case_id, model))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'design_confirmation' is not complete" in why
    assert "clinical confirmation by a clinician of hospital-1" in why
    approve(world, case_id, design, ["clinical"])
    code, why = refused(lambda: world.export(case_id, model))
    assert "design is not approved" in why
    assert "production confirmation by an engineer of factory-1" in why
    assert "clinical confirmation" not in why
    assert world.role.design_exporter.exports(case_id) == []

    approve(world, case_id, design, ["production"])
    with caplog.at_level(logging.DEBUG):  # ours and pynetdicom's, on the hospital's side
        reply = world.export(case_id, model)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert reply.sop_instance_uid in logged
    assert PATIENT_ID not in logged and PATIENT_NAME not in logged and "DOE" not in logged
    assert reply.status == 0x0000
    assert reply.pacs == f"PACS@127.0.0.1:{world.pacs.port}"
    assert reply.study_instance_uid == study.study_uid
    assert reply.source_series_uid == series.series_uid

    (path,) = world.stored(1)
    got = dcmread(path)
    assert got.SOPClassUID == ENCAPSULATED_STL_STORAGE == "1.2.840.10008.5.1.4.1.1.104.3"
    assert got.file_meta.MediaStorageSOPClassUID == ENCAPSULATED_STL_STORAGE
    assert got.SOPInstanceUID == reply.sop_instance_uid
    assert got.SeriesInstanceUID == reply.series_instance_uid != series.series_uid
    assert got.MIMETypeOfEncapsulatedDocument == "model/stl"
    assert bytes(got.EncapsulatedDocument) == stl == encapsulated_document(got)
    # The case was mapped back to the real patient inside the hospital: the identified
    # original study, patient and frame of reference, not the de-identified ones.
    assert got.StudyInstanceUID == study.study_uid
    assert (got.PatientID, str(got.PatientName)) == (PATIENT_ID, PATIENT_NAME)
    assert got.FrameOfReferenceUID == series.frame_of_reference_uid
    assert got.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    assert case_id in got.ContentDescription
    assert got.file_meta.SourceApplicationEntityTitle == "YIGONG"  # dicom.ae_title

    # The factory never held those identifiers (store, catalog, audit log, spool).
    secrets = (PATIENT_ID, PATIENT_NAME, study.study_uid, series.series_uid)
    factory_files = list(files_under(world.tmp / f"{FACTORY}-data"))
    assert any(p.suffix == ".sqlite" for p in factory_files)
    for p in factory_files:
        data = p.read_bytes()
        assert not [s for s in secrets if s.encode() in data], p

    # Audited without patient data; a second export is refused unless asked for again.
    audit = world.hospital.node.audit
    events = [e for e in audit.events(event="design.exported") if e.case_id == case_id]
    assert [e.outcome for e in events] == ["failure", "failure", "success"]
    event = events[-1]
    assert event.object_id == model
    assert event.details["sop_instance_uid"] == reply.sop_instance_uid
    assert event.details["pacs"] == reply.pacs and event.details["status"] == 0
    assert event.details["design_hash"] == design
    assert PATIENT_ID not in str(event) and "DOE" not in str(event)
    code, why = refused(lambda: world.export(case_id, model))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "was exported already" in why and reply.sop_instance_uid in why
    again = world.export(case_id, model, again=True)
    assert again.sop_instance_uid != reply.sop_instance_uid
    second = dcmread(world.stored(2)[1])
    assert second.SOPInstanceUID == again.sop_instance_uid
    assert second.StudyInstanceUID == study.study_uid
    exported = [e.sop_instance_uid for e in world.role.design_exporter.exports(case_id)]
    assert exported == [reply.sop_instance_uid, again.sop_instance_uid]


def test_only_a_clinician_of_the_hospital_may_export(world: World) -> None:
    for who in ("engineer", "hospital-engineer", "officer"):
        code, why = refused(lambda who=who: world.export("EXP-1", "0" * 64, who=who))
        assert code == grpc.StatusCode.PERMISSION_DENIED, who
        assert "ExportDesign" in why


def test_series_choice_config_and_pacs_failures_and_the_cli(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """The series the design output names is used; no [pacs] or a PACS down exports nothing.

    Two series with different frames of reference; files of the design that are not a
    binary STL are refused; the CLI shows what it would export and asks for --yes."""
    study = StudyInfo()
    first, second = SeriesInfo(number=2), SeriesInfo(number=3, origin=(-100.0, -90.0, 10.0))
    push(world, [*ct_series(2, rows=16, cols=16, study=study, series=first),
                 *ct_series(2, rows=16, cols=16, study=study, series=second)])  # fmt: skip
    case_id = "EXP-2"
    open_case(world, case_id, study.study_uid)
    # The factory names the series it designed in by the (de-identified) UID it received.
    seen = set()
    for obj in world.factory.node.catalog.list_objects(case_id=case_id):
        if obj.media_type == "application/dicom":
            data = b"".join(world.factory.node.store.open_read(obj.object_id))
            seen.add(str(dcmread(io.BytesIO(data), stop_before_pixels=True).SeriesInstanceUID))
    deid_second = world.role.releaser.map_uid_for(case_id, "factory-1", second.series_uid)
    assert deid_second in seen and len(seen) == 2
    stl = binary_stl(20.0)
    model = world.upload(case_id, "plate.stl", stl, "model/stl")
    text_stl = world.upload(case_id, "plate-ascii.stl", ascii_stl(case_id), "model/stl")
    params = world.upload(case_id, "params.json", b'{"porosity": 0.65}', "application/json")
    design = design_output(world, case_id, [model, text_stl, params], source_series_uid=deid_second)
    approve(world, case_id, design, ["clinical", "production"])

    for object_id, expect in (
        (text_stl, "is not a binary STL"),
        (params, "has media type 'application/json'; only model/stl"),
        ("ab" * 32, "is not a file of the confirmed design"),
    ):
        code, why = refused(lambda o=object_id: world.export(case_id, o))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert expect in why and f"case {case_id}" in why

    world.set_pacs(PacsSection())  # no [pacs]
    code, why = refused(lambda: world.export(case_id, model))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "no PACS to export designs to: set [pacs] host" in why
    down = free_port()  # nothing listens there
    world.set_pacs(dataclasses.replace(world.pacs, port=down, timeout_seconds=5.0))
    before = len(list(world.pacs_dir.iterdir()))
    code, why = refused(lambda: world.export(case_id, model))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert f"PACS@127.0.0.1:{down} could not be reached" in why
    assert world.role.design_exporter.exports(case_id) == []
    assert len(list(world.pacs_dir.iterdir())) == before
    failures = [
        e for e in world.hospital.node.audit.events(event="design.exported")
        if e.case_id == case_id and e.outcome == "failure"
    ]  # fmt: skip
    assert [e.details["error"] for e in failures][-2:] == ["ConfigError", "PeerUnavailable"]
    world.set_pacs(world.pacs)

    dr = world.person("clinician")
    conn = ["--address", world.hospital.address, "--cert", str(dr.cert_path), "--key",
            str(dr.key_path), "--ca", str(world.fed.ca), "--node-id", HOSPITAL]  # fmt: skip
    argv = ["study", "export-design", "--case", case_id, "--object", model, *conn]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert case_id in out and model in out and f"PACS@127.0.0.1:{world.pacs.port}" in out
    assert "--yes" in out and study.study_uid in out
    assert world.role.design_exporter.exports(case_id) == []
    assert main([*argv, "--yes"]) == 0
    assert "exported: instance" in capsys.readouterr().out
    (done,) = world.role.design_exporter.exports(case_id)
    got = dcmread(world.stored(before + 1)[-1])
    assert got.SOPInstanceUID == done.sop_instance_uid
    assert encapsulated_document(got) == stl
    assert got.FrameOfReferenceUID == second.frame_of_reference_uid != first.frame_of_reference_uid
    assert got.ReferencedSeriesSequence[0].SeriesInstanceUID == second.series_uid
    assert main([*argv, "--yes"]) == 2
    assert "was exported already" in capsys.readouterr().err
