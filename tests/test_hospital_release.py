"""Clinician confirmation, pseudonym vault, de-identified release and the outgoing guard.

Real nodes (a hospital and a factory over mTLS), real certificates per role; studies
enter the hospital through its DICOM SCP (pynetdicom C-STORE), as from a PACS.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import stat
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from gateway import pki
from gateway.config import load_config
from gateway.errors import ConfigError, ReceiptError, YigongError
from hospital_node.deid import scan_for_identifiers
from hospital_node.deid.profile import Action, Treatment, default_profile, dictionary_vr
from hospital_node.role import AUTO_FORWARD_INTERVAL_SECONDS, HospitalRole
from hospital_node.studies import StudyCatalog
from hospital_node.vault import load_or_create_key, patient_of
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.dicom_factory import (
    CONTAINER,
    IDENTIFYING_STRINGS,
    INNER,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    StudyInfo,
    base_dataset,
    ct_series,
    sequence_token,
    to_part10,
    token_for,
)
from yigong.v1 import common_pb2, hospital_pb2, hospital_pb2_grpc
from yigong_node.cli import main
from yigong_node.compose import build_node

Pair = tuple[InProcessNode, InProcessNode]
CASE = "CASE-2024-0017"


# --- helpers -----------------------------------------------------------------------------


def role(node: InProcessNode) -> HospitalRole:
    hooks = node.node.hooks
    assert isinstance(hooks, HospitalRole)
    return hooks


def studies(node: InProcessNode) -> StudyCatalog:
    return role(node).studies


def push(node: InProcessNode, datasets: Iterable[Dataset], called_ae: str = "YIGONG") -> None:
    """C-STORE ``datasets`` to the hospital's DICOM SCP, as a PACS would."""
    ae = AE(ae_title="PACS")
    datasets = list(datasets)
    for sop_class in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", role(node).dicom_port, ae_title=called_ae)
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
    finally:
        assoc.release()
    node.settle()  # everything acknowledged is filed (what a query would wait for)


def settle(node: InProcessNode) -> list[str]:
    """End the quiet period now: every receiving study becomes 'received'."""
    return studies(node).tick(datetime.now(UTC), 0.0)


def hospital_stub(node: InProcessNode, creds: Any) -> hospital_pb2_grpc.HospitalStub:
    channel = node.client(creds).channel
    return hospital_pb2_grpc.HospitalStub(channel)


def person(federation: Federation, name: str, role_name: str, org: str = "hospital-1") -> Any:
    return federation.creds(federation.person(name, role_name, org))


def confirm(
    stub: hospital_pb2_grpc.HospitalStub,
    study_uid: str,
    case_id: str = CASE,
    to: str = "factory-1",
    allow_burned_in: bool = False,
) -> hospital_pb2.ConfirmStudyResponse:
    req = hospital_pb2.ConfirmStudyRequest(
        study_uid=study_uid, case_id=case_id, destination=to, allow_burned_in=allow_burned_in
    )
    reply: hospital_pb2.ConfirmStudyResponse = stub.ConfirmStudy(req, timeout=60)
    return reply


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def wait_done(node: InProcessNode, transfer_ids: Iterable[str], timeout: float = 30.0) -> None:
    catalog = node.node.catalog

    def done() -> bool:
        states = [catalog.get_transfer(t, "outbound") for t in transfer_ids]
        failed = [t for t in states if t.status == "failed"]
        assert not failed, [t.last_error for t in failed]
        return all(t.status == "done" for t in states)

    wait_for(done, timeout, what="outbound transfers done")


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in sorted(root.rglob("*")) if p.is_file())


def series(n: int = 3, **study: Any) -> list[Dataset]:
    return list(ct_series(n, rows=16, cols=16, study=StudyInfo(**study)))


# --- confirmation, release, receipts -----------------------------------------------------


def test_clinician_confirmation_releases_deidentified_study(
    pair: Pair, federation: Federation
) -> None:
    hospital, factory = pair
    datasets = series(3)
    study_uid = datasets[0].StudyInstanceUID
    push(hospital, datasets)
    assert settle(hospital) == [study_uid]
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))

    reply = confirm(stub, study_uid)
    assert len(reply.transfer_ids) == 3
    wait_done(hospital, reply.transfer_ids)

    # The signed record: canonical JSON, node signature, the clinician's identity.
    c = reply.confirmation
    record = json.loads(c.record_json)
    assert c.record_json == json.dumps(record, sort_keys=True, separators=(",", ":"))
    assert record["type"] == "data_confirmation" and record["study_uid"] == study_uid
    assert record["case_id"] == CASE and record["destination"] == "factory-1"
    assert record["clinician"]["label"] == "clinician:dr-x@hospital-1"
    assert record["node"] == "hospital-1" and record["instance_count"] == 3
    assert record["allow_burned_in"] is False and record["auto"] is False
    summary = studies(hospital).get_study(study_uid)
    assert record["report_sha256"] == summary.report_sha256 != ""
    node_cert = pki.load_certificate(hospital.node.cfg.tls.cert)
    pki.verify_signature(node_cert, c.record_json.encode(), c.signature)
    with pytest.raises(pki.BadSignature):
        pki.verify_signature(node_cert, c.record_json.encode() + b" ", c.signature)
    assert c.signer_certificate == hospital.node.cert_pem
    dr_x = pki.load_certificate(federation.person("dr-x", "clinician", "hospital-1").cert_path)
    assert record["clinician"]["serial"] == f"{dr_x.serial_number:x}" == c.certificate_serial
    assert len(c.certificate_fingerprint) == 64

    # What the factory holds: de-identified instances under the case pseudonym.
    pseudonym = role(hospital).vault.pseudonym(CASE)
    assert pseudonym.startswith("YG-") and len(pseudonym) == 15
    received = factory.node.catalog.list_objects(case_id=CASE)
    assert len(received) == 3
    for obj in received:
        data = b"".join(factory.node.store.open_read(obj.object_id))
        assert not [s for s in IDENTIFYING_STRINGS if s.encode() in data]
        ds = dcmread(io.BytesIO(data))
        assert ds.PatientName == pseudonym and ds.PatientID == pseudonym
        assert ds.StudyInstanceUID == record["deid_study_uid"] != study_uid
        assert scan_for_identifiers(ds, pseudonym) == []
        assert obj.labels == {"deid": "PS3.15-2024b"} and obj.media_type == "application/dicom"

    # Both sides hold the same receipt; its facts are what the release recorded.
    for tid in reply.transfer_ids:
        t = hospital.node.catalog.get_transfer(tid, "outbound")
        assert t.receipt == factory.node.catalog.get_transfer(tid, "inbound").receipt
        body = common_pb2.ReceiptBody.FromString(
            common_pb2.SignedReceipt.FromString(t.receipt).body
        )
        facts = role(hospital).release_records.released_facts(t.object_id)
        assert facts is not None
        assert body.facts["dicom.sop_instance_uid"] == facts.sop_instance_uid
        assert body.facts["dicom.pixel_sha256"] == facts.pixel_sha256
        assert body.facts["dicom.geometry_sha256"] == facts.geometry_sha256

    # GetStudy shows the confirmation and every instance released and done.
    detail = stub.GetStudy(hospital_pb2.GetHospitalStudyRequest(study_uid=study_uid), timeout=10)
    assert [x.confirmation_id for x in detail.confirmations] == [c.confirmation_id]
    assert {(r.status, r.transfer_status) for i in detail.instances for r in i.releases} == {
        ("released", "done")
    }
    assert json.loads(detail.study.report_json)["series"][0]["instance_count"] == 3

    events = hospital.node.audit.events(event="case.confirmation")
    assert [(e.actor, e.case_id, e.peer, e.outcome) for e in events] == [
        ("clinician:dr-x@hospital-1", CASE, "factory-1", "success")
    ]
    assert events[0].details["confirmation_id"] == c.confirmation_id

    # The same study, case and destination again: refused, nothing sent again.
    err = refused(lambda: confirm(stub, study_uid))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already confirmed" in (err.details() or "")
    assert len(hospital.node.catalog.list_transfers(direction="outbound")) == 3


def test_only_a_clinician_of_this_node_may_confirm(pair: Pair, federation: Federation) -> None:
    hospital, _ = pair
    datasets = series(2)
    push(hospital, datasets)
    settle(hospital)
    uid = datasets[0].StudyInstanceUID
    for creds in (
        person(federation, "eve-eng", "engineer"),
        person(federation, "olga", "officer"),
        person(federation, "dr-far", "clinician", "hospital-2"),
        hospital.node.client_credentials,
    ):
        err = refused(lambda creds=creds: confirm(hospital_stub(hospital, creds), uid))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    assert hospital.node.catalog.list_transfers() == []
    # Officers and the node itself may look.
    for creds in (person(federation, "olga", "officer"), hospital.node.client_credentials):
        stub = hospital_stub(hospital, creds)
        listed = stub.ListStudies(hospital_pb2.ListHospitalStudiesRequest(), timeout=10)
        assert [s.study_uid for s in listed.studies] == [uid]


def test_study_still_receiving_or_unknown_is_refused(pair: Pair, federation: Federation) -> None:
    hospital, _ = pair
    datasets = series(2)
    push(hospital, datasets)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    err = refused(lambda: confirm(stub, datasets[0].StudyInstanceUID))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "still 'receiving'" in (err.details() or "") and "quiet" in (err.details() or "")
    err = refused(lambda: confirm(stub, "1.2.3.4.5"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    settle(hospital)
    for bad_case, to in (("DOE JANE", "factory-1"), (CASE, "factory-9")):
        err = refused(lambda c=bad_case, t=to: confirm(stub, datasets[0].StudyInstanceUID, c, t))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DOE JANE" not in json.dumps([e.details for e in hospital.node.audit.events()])
    failures = hospital.node.audit.events(event="case.confirmation")
    assert len(failures) == 4 and {e.outcome for e in failures} == {"failure"}
    assert hospital.node.catalog.list_transfers() == []


def test_receipt_facts_that_differ_are_refused(pair: Pair, federation: Federation) -> None:
    hospital, _ = pair
    datasets = series(1)
    push(hospital, datasets)
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    reply = confirm(stub, datasets[0].StudyInstanceUID)
    wait_done(hospital, reply.transfer_ids)
    t = hospital.node.catalog.get_transfer(reply.transfer_ids[0], "outbound")
    obj = hospital.node.catalog.get_object(t.object_id)
    guard, store = role(hospital).guard, hospital.node.store
    body = common_pb2.ReceiptBody.FromString(common_pb2.SignedReceipt.FromString(t.receipt).body)
    good = dict(body.facts)
    guard.check_receipt(obj, good, store)
    for fact in ("dicom.sop_instance_uid", "dicom.pixel_sha256", "dicom.geometry_sha256"):
        with pytest.raises(ReceiptError, match=fact.replace(".", r"\.")):
            guard.check_receipt(obj, {**good, fact: "0" * 64}, store)
        with pytest.raises(ReceiptError, match="lacks"):
            guard.check_receipt(obj, {k: v for k, v in good.items() if k != fact}, store)
    with pytest.raises(ReceiptError, match="could not parse"):
        guard.check_receipt(obj, {**good, "dicom.parse_error": "not DICOM"}, store)

    # A release cut short before queueing (stop, crash) is finished at start-up.
    with hospital.node.catalog.transaction() as db:
        db.execute("UPDATE hospital_releases SET transfer_id = ''")
    assert role(hospital).releaser.resume() == 1
    transfers = hospital.node.catalog.list_transfers(direction="outbound")
    (again,) = [t for t in transfers if t.transfer_id not in reply.transfer_ids]
    wait_done(hospital, [again.transfer_id])


# --- the outgoing guard ------------------------------------------------------------------


def test_identifiable_dicom_upload_is_refused_and_nothing_leaves(
    pair: Pair, federation: Federation, tmp_path: Path
) -> None:
    hospital, factory = pair
    original = series(1)[0]
    path = tmp_path / "scan.bin"
    path.write_bytes(to_part10(original))
    client = hospital.client(person(federation, "dr-x", "clinician"))
    for media_type in ("application/dicom", "application/octet-stream"):
        with pytest.raises(YigongError) as err:
            client.submit(path, ["factory-1"], case_id=CASE, media_type=media_type)
        text = str(err.value)
        assert "FAILED_PRECONDITION" in text
        assert "PatientName" in text and "(0010,0010)" in text and "PatientBirthDate" in text
        assert not [s for s in IDENTIFYING_STRINGS if s in text]

    # A bare data set without preamble is recognised as DICOM too.
    part10 = to_part10(original)
    meta_end = 144 + int.from_bytes(part10[140:144], "little")  # after (0002,0000) UL
    path.write_bytes(part10[meta_end:])
    with pytest.raises(YigongError, match=r"FAILED_PRECONDITION.*PatientName"):
        client.submit(path, ["factory-1"], case_id=CASE)

    # Correctly de-identified with this node's own keys, but not released by a
    # confirmation: refused all the same.
    key = role(hospital).releaser.deid
    clean = key.deidentify_bytes(to_part10(original), role(hospital).vault.pseudonym(CASE))
    path.write_bytes(clean)
    with pytest.raises(YigongError, match="not produced by this node"):
        client.submit(path, ["factory-1"], case_id=CASE, media_type="application/dicom")
    # Every refused submission is a security alert naming who tried.
    alerts = hospital.node.audit.events(event="security.alert")
    assert len(alerts) == 4
    assert {a.actor for a in alerts} == {"clinician:dr-x@hospital-1"}
    assert {a.details["action"] for a in alerts} == {"submission refused"}

    # Design files pass (a real STL: design files are checked against their format).
    import trimesh

    path.write_bytes(trimesh.creation.box(extents=(10, 20, 30)).export(file_type="stl"))
    reply = client.submit(path, ["factory-1"], case_id=CASE, media_type="model/stl")
    wait_done(hospital, [t.transfer_id for t in reply.queued])
    assert [o.media_type for o in factory.node.catalog.list_objects()] == ["model/stl"]
    assert len(hospital.node.catalog.list_transfers(direction="outbound")) == 1


def test_guard_rechecks_before_every_send_attempt(pair: Pair) -> None:
    """An identifiable object already queued (bypassing Submit) is refused at send time."""
    hospital, factory = pair
    n = hospital.node
    data = to_part10(series(1)[0])
    digest = hashlib.sha256(data).hexdigest()
    n.store.put_stream(digest, [data])
    obj = n.catalog.add_object(
        object_id=digest,
        size=len(data),
        name="x.bin",
        media_type="application/octet-stream",
        case_id=CASE,
        origin_node="hospital-1",
    )
    transfer = n.outbox.queue(obj, "factory-1", actor="test")
    wait_for(lambda: n.catalog.get_transfer(transfer.transfer_id, "outbound").status == "failed")
    t = n.catalog.get_transfer(transfer.transfer_id, "outbound")
    assert "PatientName" in t.last_error and PATIENT_NAME not in t.last_error
    assert factory.node.catalog.list_objects() == []
    alerts = n.audit.events(event="security.alert")
    assert [a.transfer_id for a in alerts] == [transfer.transfer_id]


# --- burned-in annotation ----------------------------------------------------------------


def test_burned_in_instance_held_unless_allowed(pair: Pair, federation: Federation) -> None:
    hospital, factory = pair
    datasets = series(3)
    datasets[1].BurnedInAnnotation = "YES"
    push(hospital, datasets)
    settle(hospital)
    uid = datasets[0].StudyInstanceUID
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    reply = confirm(stub, uid)
    statuses = sorted((r.status, r.reason) for i in reply.instances for r in i.releases)
    assert [s for s, _ in statuses] == ["held", "released", "released"]
    assert "Burned In Annotation is YES" in statuses[0][1]
    assert len(reply.transfer_ids) == 2
    wait_done(hospital, reply.transfer_ids)
    detail = stub.GetStudy(hospital_pb2.GetHospitalStudyRequest(study_uid=uid), timeout=10)
    held = [i for i in detail.instances if i.releases[0].status == "held"]
    assert [i.sop_instance_uid for i in held] == [datasets[1].SOPInstanceUID]
    assert held[0].burned_in == "YES" and "--allow-burned-in" in held[0].releases[0].reason

    first = {r.deid_object_id for i in reply.instances for r in i.releases if r.deid_object_id}
    reply = confirm(stub, uid, case_id="CASE-2024-0018", allow_burned_in=True)
    assert len(reply.transfer_ids) == 3
    assert json.loads(reply.confirmation.record_json)["allow_burned_in"] is True
    wait_done(hospital, reply.transfer_ids)
    # One patient, one manufacturer: the same study under a second case is de-identified
    # exactly as before (same pseudonym, offset and UIDs), so the two instances released
    # before are the very same objects; only the formerly held one is new.
    second = {r.deid_object_id for i in reply.instances for r in i.releases if r.deid_object_id}
    assert len(second) == 3 and first < second
    held_now = factory.node.catalog.list_objects(case_id="CASE-2024-0018")
    assert [o.object_id for o in held_now] == list(second - first)
    assert {o.object_id for o in factory.node.catalog.list_objects(case_id=CASE)} == first


# --- the pseudonym vault -----------------------------------------------------------------


def test_vault_is_encrypted_and_looks_up_the_patient(pair: Pair, federation: Federation) -> None:
    hospital, _ = pair
    datasets = series(2)
    push(hospital, datasets)
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    wait_done(hospital, confirm(stub, datasets[0].StudyInstanceUID).transfer_ids)

    vault = role(hospital).vault
    patient = vault.lookup(CASE)
    assert (patient.patient_id, str(patient.patient_name), patient.birth_date) == (
        PATIENT_ID,
        PATIENT_NAME,
        PATIENT_BIRTH_DATE,
    )
    assert patient.issuer_of_patient_id == "HOSPITAL MRN"
    assert PATIENT_NAME not in repr(patient)
    assert vault.lookup_pseudonym(vault.pseudonym(CASE)) == (CASE, patient)
    rows = hospital.node.catalog.query("SELECT * FROM hospital_vault")
    assert len(rows) == 1 and rows[0]["pseudonym"] == vault.case_pseudonym(CASE)
    rows = hospital.node.catalog.query("SELECT * FROM hospital_vault_recipients")
    assert [(r["case_id"], r["destination"], r["pseudonym"], r["scheme"]) for r in rows] == [
        (CASE, "factory-1", vault.pseudonym(CASE), "patient-destination-v1")
    ]
    assert vault.pseudonym(CASE) == vault.pseudonym(CASE, "factory-1") != vault.case_pseudonym(
        CASE
    )
    data_dir = hospital.node.cfg.data_dir
    dbs = [p for p in files_under(data_dir) if p.name.startswith(("catalog", "audit"))]
    assert len(dbs) >= 2
    for path in dbs:
        blob = path.read_bytes()
        for secret in (PATIENT_NAME, "DOE^JANE", PATIENT_ID, PATIENT_BIRTH_DATE):
            assert secret.encode() not in blob, (path.name, secret)

    # A case belongs to one patient.
    other = series(1, patient_name="ROE^RICHARD", patient_id="MRN777")
    push(hospital, other)
    settle(hospital)
    err = refused(lambda: confirm(stub, other[0].StudyInstanceUID))
    assert "another patient" in (err.details() or "") and "MRN777" not in (err.details() or "")

    # Keys: 32 bytes, mode 0600, separate; a readable key file refuses the start.
    cfg = hospital.node.cfg
    assert cfg.deid.key_file is not None and cfg.deid.vault_key_file is not None
    for key_file in (cfg.deid.key_file, cfg.deid.vault_key_file):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert len(key_file.read_bytes()) == 32
    assert cfg.deid.key_file.read_bytes() != cfg.deid.vault_key_file.read_bytes()


def test_vault_reads_names_in_their_character_set() -> None:
    ds = series(1)[0]
    ds.SpecificCharacterSet = "GB18030"
    ds.PatientName = "张^三"
    assert str(patient_of(to_part10(ds)).patient_name) == "张^三"


def test_key_file_readable_by_others_refuses_start(federation: Federation, tmp_path: Path) -> None:
    config = write_config(federation, tmp_path, "hospital-1", "hospital")
    cfg = load_config(config)
    assert cfg.deid.vault_key_file is not None
    load_or_create_key(cfg.deid.vault_key_file, "pseudonym vault key")
    os.chmod(cfg.deid.vault_key_file, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        build_node(cfg)
    os.chmod(cfg.deid.vault_key_file, 0o600)
    cfg.deid.vault_key_file.write_bytes(b"short")
    with pytest.raises(ConfigError, match="holds 5 bytes"):
        load_or_create_key(cfg.deid.vault_key_file, "pseudonym vault key")


# --- auto-forward ------------------------------------------------------------------------


def test_auto_forward_is_off_by_default(pair: Pair) -> None:
    hospital, _ = pair
    assert hospital.node.cfg.dicom.auto_forward_to == ""
    assert role(hospital)._auto_thread is None
    push(hospital, series(1))
    settle(hospital)
    time.sleep(AUTO_FORWARD_INTERVAL_SECONDS + 0.3)  # a round would have run by now
    assert hospital.node.catalog.list_transfers() == []
    assert hospital.node.audit.events(event="case.confirmation") == []


def test_auto_forward_when_configured_is_audited(federation: Federation, tmp_path: Path) -> None:
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-1": factory.address},
            dicom={"auto_forward_called_ae": "TO_FACTORY", "auto_forward_to": "factory-1"},
        )
    )
    try:
        forwarded, kept = series(2), series(1)
        push(hospital, forwarded, called_ae="TO_FACTORY")
        push(hospital, kept, called_ae="YIGONG")
        settle(hospital)
        n = hospital.node
        wait_for(lambda: len(n.catalog.list_transfers(direction="outbound")) == 2, 15)
        wait_done(hospital, [t.transfer_id for t in n.catalog.list_transfers()])
        confirmations = role(hospital).release_records.confirmations
        assert confirmations(kept[0].StudyInstanceUID) == []
        (c,) = confirmations(forwarded[0].StudyInstanceUID)
        record = json.loads(c.record)
        assert record["auto"] is True and c.auto and c.actor == "node:hospital-1"
        assert record["rule"] == "dicom.auto_forward_called_ae=TO_FACTORY"
        assert record["case_id"].startswith("AUTO-")
        pki.verify_signature(pki.load_certificate(n.cfg.tls.cert), c.record.encode(), c.signature)
        (loaded,) = [
            e for e in n.audit.events(event="config.loaded") if "auto_forward_to" in e.details
        ]
        assert loaded.details["auto_forward_to"] == "factory-1"
        (used,) = n.audit.events(event="case.confirmation")
        assert used.details["auto"] is True and used.actor == "node:hospital-1"
        assert len(factory.node.catalog.list_objects(case_id=record["case_id"])) == 2
    finally:
        hospital.stop()
        factory.stop()


# --- the CLI ---------------------------------------------------------------------------


def test_cli_list_show_and_confirm_needs_yes(
    pair: Pair, federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    datasets = series(3)
    datasets[2].BurnedInAnnotation = "YES"
    uid = datasets[0].StudyInstanceUID
    push(hospital, datasets)
    settle(hospital)
    dr = federation.person("dr-x", "clinician", "hospital-1")
    conn = ["--address", hospital.address, "--cert", str(dr.cert_path), "--key",
            str(dr.key_path), "--ca", str(federation.ca), "--node-id", "hospital-1"]  # fmt: skip

    assert main(["study", "list", "--status", "received", *conn]) == 0
    out = capsys.readouterr().out
    assert uid in out and "received" in out
    assert main(["study", "list", "--json", *conn]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["study_uid"] == uid and listed["report"]["series"][0]["instance_count"] == 3

    assert main(["study", "confirm", uid, "--case", CASE, "--to", "factory-1", *conn]) == 1
    out = capsys.readouterr().out
    assert "--yes" in out and "3 in 1 series" in out and CASE in out and "factory-1" in out
    assert hospital.node.catalog.list_transfers() == []

    argv = ["study", "confirm", uid, "--case", CASE, "--to", "factory-1", "--yes", *conn]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "queued 2 transfer(s) to factory-1" in out and "held" in out
    assert main(["study", "show", uid, *conn]) == 0
    out = capsys.readouterr().out
    for text in (
        "slice thickness",
        "1 mm",
        "pixel spacing",
        "gaps",
        "gantry tilt",
        "clinician:dr-x@hospital-1",
        "1 held",
        "2 released",
        "Burned In Annotation",
    ):
        assert text in out, text  # fmt: skip
    assert main(["study", "show", uid, "--json", *conn]) == 0
    shown = json.loads(capsys.readouterr().out)
    (c,) = shown["confirmations"]
    assert c["record"]["case_id"] == CASE and len(c["signature_hex"]) > 100
    assert main(["study", "confirm", uid, "--case", CASE, "--to", "factory-1", "--yes", *conn]) == 2
    assert "already confirmed" in capsys.readouterr().err


# --- the per-attribute leak test generated from Table E.1-1 -------------------------------

REFUSE = Treatment.REFUSE
IDENTITY_UIDS = (0x00080018, 0x0020000D, 0x0020000E, 0x00200052)  # SOP, study, series, FoR
UID_CHARS = frozenset(b"0123456789.")
HOSPITAL_SIDE_LOGGERS = ("hospital_node", "pynetdicom")


def _date_token(k: int, vr: str) -> str:
    """Distinct dates within one year: a date shifted by the de-identifier (365-3650 days
    back) can never equal another token."""
    text = (date(2001, 1, 1) + timedelta(days=k)).strftime("%Y%m%d")
    return text + "101500.123456" if vr == "DT" else text


def tokenized_instance() -> tuple[Dataset, dict[str, list[bytes]]]:
    """One CT instance with a unique token in every attribute Table E.1-1 acts on — at
    top level, two sequence levels deep and in private attributes — and the bytes that
    must not reach the factory, by attribute.

    Not planted: command (0000,xxxx), file-meta (0002,xxxx) and directory (0004,xxxx)
    rows, which the SCP refuses in a data set (it writes the file meta itself; those UIDs
    are the instance's own UIDs, which are tokens), and C on TM (dates move by whole
    days, so times of day are kept by design).
    """
    ds = base_dataset()
    for tag in IDENTITY_UIDS:
        ds[tag].value = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.BurnedInAnnotation = "NO"
    needles = {f"{tag:08X} identity UID": [str(ds[tag].value).encode()] for tag in IDENTITY_UIDS}
    outer, inner, private = Dataset(), Dataset(), []
    dates = 0
    profile = default_profile()
    for i, row in enumerate(profile.concrete_rows()):
        assert row.tag is not None
        tag, vr = row.tag, dictionary_vr(row.tag)
        if (
            row.action is Action.KEEP
            or tag >> 16 in (0x0000, 0x0002, 0x0004)
            or tag in IDENTITY_UIDS
        ):
            continue
        if row.action is Action.CLEAN and vr == "TM":
            continue
        if vr == "SQ" and profile.treatment(tag, vr, in_clean_sequence=False)[0] is REFUSE:
            continue  # a plain-D sequence with items refuses the instance (tested apart)
        value: object
        if vr == "SQ":
            value, found = sequence_token(i, uid_only=row.action is Action.UID)
        elif vr in ("DA", "DT"):
            value = _date_token(dates, vr)
            found, dates = [value.encode()], dates + 1
        else:
            value, needle = token_for(vr, i)
            found = [needle] if needle else []
        for target in (ds, outer, inner):
            target.add_new(tag, vr, copy.deepcopy(value))
        private.append((vr, value))
        needles[f"{tag:08X} {row.name}"] = found
    assert dates < 365
    outer.add_new(INNER, "SQ", Sequence([inner]))
    ds.add_new(CONTAINER, "SQ", Sequence([outer]))
    for j, (vr, value) in enumerate(private):
        block = ds.private_block(0x0011, f"YIGONG LEAK TEST {j // 256}", create=True)
        block.add_new(j % 256, vr, copy.deepcopy(value))
    return ds, needles


def _leaks(blob: bytes, needle: bytes) -> bool:
    """Whether ``needle`` occurs in ``blob`` other than inside a long lower-case hex run
    (a SHA-256 digest may contain any 8 digits)."""
    start = blob.find(needle)
    while start >= 0:
        lo, hi = start, start + len(needle)
        while lo > 0 and blob[lo - 1] in HEX:
            lo -= 1
        while hi < len(blob) and blob[hi] in HEX:
            hi += 1
        if not (set(needle) <= HEX and hi - lo >= 32):
            return True
        start = blob.find(needle, start + 1)
    return False


HEX = frozenset(b"0123456789abcdef")


def test_no_token_of_any_attribute_reaches_the_factory(
    pair: Pair, federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hospital, factory = pair
    ds, needles = tokenized_instance()
    assert len(needles) > 500
    push(hospital, [ds])
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    reply = confirm(stub, ds.StudyInstanceUID)
    assert [r.status for i in reply.instances for r in i.releases] == ["released"], [
        r.reason for i in reply.instances for r in i.releases
    ]
    wait_done(hospital, reply.transfer_ids)

    # Every token went in: the hospital's original holds each of them.
    (instance,) = studies(hospital).instances(ds.StudyInstanceUID)
    original = b"".join(hospital.node.store.open_read(instance.object_id))
    assert [a for a, found in needles.items() for n in found if not _leaks(original, n)] == []

    stored = {p: p.read_bytes() for p in files_under(factory.node.cfg.data_dir)}
    names = {p.name for p in stored}
    assert {"catalog.sqlite", "audit.sqlite"} <= names
    objects = [p for p in stored if p.parent.parent.name == "objects" or "objects" in p.parts]
    assert objects, "the de-identified instance is in the factory's store"
    pseudonym = role(hospital).vault.pseudonym(CASE).encode()
    assert any(pseudonym in blob for blob in stored.values())
    records = [(r.name, r.getMessage()) for r in caplog.records]
    leaks = []
    for attribute, found in needles.items():
        for needle in found:
            leaks += [f"{attribute} in {p}" for p, blob in stored.items() if _leaks(blob, needle)]
            text = needle.decode("latin-1")
            uid = set(needle) <= UID_CHARS
            leaks += [
                f"{attribute} in log of {name}"
                for name, message in records
                if text in message and not (uid and name.startswith(HOSPITAL_SIDE_LOGGERS))
            ]
    assert leaks == []
