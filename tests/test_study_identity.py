"""The clinician sees whom they release — at the hospital only (issue #16, part 4).

Real nodes over mTLS; studies enter the hospital through its DICOM SCP (pynetdicom
C-STORE) as from a PACS. The last test runs both nodes as ``yigong serve`` child
processes, so their log files are real files, and searches them, the factory's whole
data directory and both nodes' ATNA exports for the patient's identity.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from gateway import authz
from gateway.audit import QUERY
from gateway.identity import Identity
from gateway.rpc.client import NodeClient
from hospital_node.ingest import parse_instance
from hospital_node.study_identity import StudyIdentities, StudyIdentity, identity_of
from tests.cluster import Federation, InProcessNode, NodeProcess, wait_for, write_config
from tests.dicom_factory import (
    ACCESSION,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    REFERRING_PHYSICIAN,
    StudyInfo,
    ct_series,
    to_part10,
)
from tests.test_hospital_release import (
    CASE,
    Pair,
    confirm,
    files_under,
    hospital_stub,
    person,
    push,
    role,
    settle,
)
from yigong.v1 import hospital_pb2, hospital_pb2_grpc
from yigong_node.cli import main

OTHER_NAME, OTHER_ID, OTHER_ACCESSION = "ROE^RICHARD", "MRN0099881", "ACC20240315777"
NEEDLES = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, OTHER_NAME, OTHER_ID)


def two_patients() -> tuple[list[Any], list[Any]]:
    """Two studies of two patients, pushed the same hour: only their identity tells them apart."""
    jane = list(ct_series(2, rows=16, cols=16, study=StudyInfo()))
    richard = StudyInfo(
        patient_name=OTHER_NAME,
        patient_id=OTHER_ID,
        accession=OTHER_ACCESSION,
        description="CT HIP RIGHT",
        study_time="101500",
    )
    return jane, list(ct_series(2, rows=16, cols=16, study=richard))


def conn(federation: Federation, address: str, who: str, role_name: str) -> list[str]:
    p = federation.person(who, role_name, "hospital-1")
    return ["--address", address, "--cert", str(p.cert_path), "--key", str(p.key_path),
            "--ca", str(federation.ca), "--node-id", "hospital-1"]  # fmt: skip


def identity_views(node: InProcessNode) -> list[tuple[str | None, str]]:
    """(actor, study UID) of every audited view of a study's identity."""
    return [
        (e.actor, str(e.details.get("study_instance_uid")))
        for e in node.node.audit.events(event=QUERY, limit=100000)
        if e.details.get("query") == "hospital.study_identity"
    ]


def test_clinician_sees_whom_each_study_is_of_in_list_and_show(
    pair: Pair, federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    jane, richard = two_patients()
    jane_uid, richard_uid = jane[0].StudyInstanceUID, richard[0].StudyInstanceUID
    push(hospital, [*jane, *richard])
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-id", "clinician"))
    confirmed = confirm(stub, jane_uid)
    pseudonym = role(hospital).vault.issued_pseudonym(CASE, "factory-1")
    assert pseudonym and pseudonym.startswith("YG-")
    assert confirmed.confirmation.pseudonym == pseudonym

    # gRPC: each study carries whom it is of, and the case with its pseudonym.
    listed = stub.ListStudies(hospital_pb2.ListHospitalStudiesRequest(), timeout=30).studies
    by_uid = {s.study_uid: s for s in listed}
    j, r = by_uid[jane_uid], by_uid[richard_uid]
    assert not j.identity_withheld and j.identity.recorded
    assert (j.identity.patient_name, j.identity.patient_id, j.identity.birth_date) == (
        PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE,
    )  # fmt: skip
    assert (j.identity.sex, j.identity.age, j.identity.accession_number) == ("F", "047Y", ACCESSION)
    assert (j.identity.study_date, j.identity.study_time) == ("20240315", "093012")
    assert j.identity.study_description == "CT KNEE LEFT W/O CONTRAST DR WANG"
    assert list(j.identity.modalities) == ["CT"]
    assert j.identity.referring_physician == REFERRING_PHYSICIAN
    assert (r.identity.patient_name, r.identity.patient_id) == (OTHER_NAME, OTHER_ID)
    assert (r.identity.accession_number, r.identity.study_time) == (OTHER_ACCESSION, "101500")
    ((case,),) = [list(j.cases)]
    assert (case.case_id, case.pseudonym, case.destination) == (CASE, pseudonym, "factory-1")
    assert case.confirmation_id == confirmed.confirmation.confirmation_id
    assert case.deid_study_uid and case.deid_study_uid != jane_uid
    assert list(r.cases) == []
    shown = stub.GetStudy(hospital_pb2.GetHospitalStudyRequest(study_uid=jane_uid), timeout=30)
    assert shown.study.identity.patient_name == PATIENT_NAME
    (c,) = shown.confirmations
    assert (c.pseudonym, c.deid_study_uid) == (pseudonym, case.deid_study_uid)

    # CLI: the table and the study page show the same, readable.
    args = conn(federation, hospital.address, "dr-id", "clinician")
    assert main(["study", "list", *args]) == 0
    out = capsys.readouterr().out
    for text in (PATIENT_NAME, PATIENT_ID, "1977-04-12", "F/047Y", ACCESSION, "2024-03-15 09:30",
                 "CT KNEE LEFT", REFERRING_PHYSICIAN, f"{CASE} ({pseudonym})", OTHER_NAME,
                 OTHER_ID, OTHER_ACCESSION, "2024-03-15 10:15", "CT HIP RIGHT"):  # fmt: skip
        assert text in out, text
    assert main(["study", "show", jane_uid, *args]) == 0
    out = capsys.readouterr().out
    for text in (f"patient: {PATIENT_NAME}", f"patient id: {PATIENT_ID}", "born: 1977-04-12",
                 "sex / age: F / 047Y", f"accession: {ACCESSION}", "modality: CT",
                 f"referring: {REFERRING_PHYSICIAN}", f"pseudonym {pseudonym}",
                 f"de-identified study {case.deid_study_uid}"):  # fmt: skip
        assert text in out, text
    assert OTHER_NAME not in out
    assert main(["study", "confirm", richard_uid, "--case", "CASE-R", "--to", "factory-1",
                 *args]) == 1  # fmt: skip
    preview = capsys.readouterr().out
    assert f"patient: {OTHER_NAME}" in preview and "--yes" in preview

    # The node itself (its operators on the node host) sees it too.
    with hospital.self_client() as nc:
        own = hospital_pb2_grpc.HospitalStub(nc.channel).ListStudies(
            hospital_pb2.ListHospitalStudiesRequest(), timeout=30
        )
    assert {s.identity.patient_id for s in own.studies} == {PATIENT_ID, OTHER_ID}


def test_officer_sees_uids_only(
    pair: Pair, federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    hospital, _ = pair
    jane, richard = two_patients()
    push(hospital, [*jane, *richard])
    settle(hospital)
    uids = {jane[0].StudyInstanceUID, richard[0].StudyInstanceUID}
    stub = hospital_stub(hospital, person(federation, "oscar", "officer"))
    listed = stub.ListStudies(hospital_pb2.ListHospitalStudiesRequest(), timeout=30).studies
    assert {s.study_uid for s in listed} == uids
    for s in listed:
        assert s.identity_withheld and not s.HasField("identity")
        assert not any(n.encode() in s.SerializeToString() for n in NEEDLES)
    shown = stub.GetStudy(
        hospital_pb2.GetHospitalStudyRequest(study_uid=jane[0].StudyInstanceUID), timeout=30
    )
    assert shown.study.identity_withheld and not shown.study.HasField("identity")
    assert not any(n.encode() in shown.SerializeToString() for n in NEEDLES)

    args = conn(federation, hospital.address, "oscar", "officer")
    assert main(["study", "list", *args]) == 0
    out = capsys.readouterr().out
    assert all(uid in out for uid in uids)
    assert "shown to this hospital's clinicians only" in out
    assert main(["study", "show", jane[0].StudyInstanceUID, "--json", *args]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["study"]["identity_withheld"] is True
    for needle in (*NEEDLES, "1977-04-12", ACCESSION, REFERRING_PHYSICIAN):
        assert needle not in out, needle
    assert identity_views(hospital) == []  # nothing shown, nothing to audit


def test_each_identity_view_is_audited_by_study_uid_never_the_values(
    pair: Pair, federation: Federation
) -> None:
    hospital, _ = pair
    jane, richard = two_patients()
    jane_uid, richard_uid = jane[0].StudyInstanceUID, richard[0].StudyInstanceUID
    push(hospital, [*jane, *richard])
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-audit", "clinician"))
    stub.ListStudies(hospital_pb2.ListHospitalStudiesRequest(), timeout=30)
    stub.GetStudy(hospital_pb2.GetHospitalStudyRequest(study_uid=richard_uid), timeout=30)
    hospital_stub(hospital, person(federation, "oscar", "officer")).ListStudies(
        hospital_pb2.ListHospitalStudiesRequest(), timeout=30
    )
    who = "clinician:dr-audit@hospital-1"
    assert sorted(identity_views(hospital)) == sorted(
        [(who, jane_uid), (who, richard_uid), (who, richard_uid)]
    )
    audit_db = hospital.node.cfg.audit.path
    blob = audit_db.read_bytes() + b"".join(
        p.read_bytes() for p in audit_db.parent.glob(audit_db.name + "-*")
    )
    for needle in (*NEEDLES, ACCESSION, REFERRING_PHYSICIAN):
        assert needle.encode() not in blob, needle
    assert hospital.node.audit.verify().ok


def test_identity_is_encrypted_at_rest_in_the_hospital_catalog(
    pair: Pair, federation: Federation
) -> None:
    hospital, _ = pair
    jane, _ = two_patients()
    push(hospital, jane)
    catalog_db = hospital.node.cfg.catalog.path
    rows = (
        sqlite3.connect(catalog_db)
        .execute("SELECT study_uid, ciphertext FROM hospital_study_identity")
        .fetchall()
    )
    assert [r[0] for r in rows] == [jane[0].StudyInstanceUID]
    for needle in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION):
        assert needle.encode() not in bytes(rows[0][1]), needle
    identities = role(hospital).identities
    kept = identities.get(jane[0].StudyInstanceUID)
    assert kept is not None and kept.patient_name == PATIENT_NAME
    assert "DOE" not in repr(kept) and "DOE" not in repr(identities)
    other_key = StudyIdentities(hospital.node.catalog, b"\x01" * 32)
    with pytest.raises(Exception, match=r"does not decrypt with this node's vault key"):
        other_key.get(jane[0].StudyInstanceUID)
    assert StudyIdentity.from_bytes(kept.to_bytes()) == kept


def test_identity_rule_is_one_authz_decision() -> None:
    node = authz.NodeSelf("hospital-1", "hospital")
    factory = authz.NodeSelf("factory-1", "factory")

    def ident(role_name: str, org: str = "hospital-1", is_node: bool = False) -> Identity:
        now = datetime.now(UTC)
        return Identity(
            kind="node" if is_node else "person",
            subject_id="hospital-1" if is_node else "x",
            role=role_name,
            region="cn-east",
            org_node="" if is_node else org,
            serial=1,
            not_before=now,
            not_after=now,
            fingerprint="f" * 64,
        )

    assert authz.may_see_identity(ident("clinician"), node)
    assert authz.may_see_identity(ident("hospital", is_node=True), node)
    assert not authz.may_see_identity(ident("officer"), node)
    assert not authz.may_see_identity(ident("engineer"), node)
    assert not authz.may_see_identity(ident("clinician", org="hospital-2"), node)
    assert not authz.may_see_identity(ident("clinician", org="factory-1"), factory)


# --- nothing of it leaves: factory data dir, both nodes' log files, ATNA exports -------------


def _push_to(port: int, datasets: list[Any]) -> None:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="YIGONG")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
    finally:
        assoc.release()


@pytest.fixture
def served(federation: Federation, tmp_path: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """Both nodes as ``yigong serve -v`` child processes writing their own log files."""
    fcfg = write_config(federation, tmp_path, "factory-1", "factory")
    factory = NodeProcess(fcfg, tmp_path / "factory.log")
    factory.start()
    hcfg = write_config(
        federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": factory.address},
        dicom={"quiet_period_seconds": 0.5},
    )  # fmt: skip
    hospital = NodeProcess(hcfg, tmp_path / "hospital.log")
    hospital.start()
    try:
        yield hospital, factory
    finally:
        hospital.stop()
        factory.stop()


def test_no_identity_reaches_the_factory_a_log_file_or_an_atna_message(
    served: tuple[NodeProcess, NodeProcess],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = served
    jane, richard = two_patients()
    ready = json.loads(hospital.config.with_suffix(".ready").read_text())
    _push_to(int(ready["dicom_port"]), [*jane, *richard])
    args = conn(federation, hospital.address, "dr-leak", "clinician")
    creds = federation.creds(federation.person("dr-leak", "clinician", "hospital-1"))
    with NodeClient(hospital.address, creds, node_id="hospital-1") as nc:
        stub = hospital_pb2_grpc.HospitalStub(nc.channel)

        def received() -> bool:
            req = hospital_pb2.ListHospitalStudiesRequest(status="received")
            found = stub.ListStudies(req, timeout=30).studies
            return len(found) == 2 and all(s.identity.patient_id for s in found)

        wait_for(received, 60, what="both studies received")
        reply = confirm(stub, jane[0].StudyInstanceUID)
        assert reply.transfer_ids

        def sent() -> bool:
            req = hospital_pb2.GetHospitalStudyRequest(study_uid=jane[0].StudyInstanceUID)
            study = stub.GetStudy(req, timeout=30)
            states = [r.transfer_status for i in study.instances for r in i.releases]
            return bool(states) and all(s == "done" for s in states)

        wait_for(sent, 60, what="the released instances delivered")
    for argv in (["study", "list"], ["study", "show", jane[0].StudyInstanceUID]):
        assert main([*argv, *args]) == 0
    assert PATIENT_NAME in capsys.readouterr().out  # the clinician saw whom they released
    time.sleep(0.5)
    hospital.stop()
    factory.stop()

    exports = []
    for node in (hospital, factory):
        out = tmp_path / f"{node.config.stem}-atna"
        assert main(["audit", "export", "--config", str(node.config), "-o", str(out)]) == 0
        exports += sorted(out.glob("*.xml"))
    capsys.readouterr()
    atna = b"".join(p.read_bytes() for p in exports)
    assert b"hospital.study_identity" in atna and jane[0].StudyInstanceUID.encode() in atna
    searched = {
        **{p: p.read_bytes() for p in files_under(tmp_path / "factory-1-data")},
        hospital.log_path: hospital.log_path.read_bytes(),
        factory.log_path: factory.log_path.read_bytes(),
        **{p: p.read_bytes() for p in exports},
    }
    assert any(p.parent.name != "factory-1-data" for p in searched)  # objects were searched
    assert len(searched[hospital.log_path]) > 0 and len(searched[factory.log_path]) > 0
    received = [p for p in searched if "objects" in p.parts]
    assert received, "the de-identified instances are in the factory's store"
    leaks = [
        f"{needle} in {p}"
        for p, blob in searched.items()
        for needle in (*NEEDLES, ACCESSION, OTHER_ACCESSION)
        if needle.encode() in blob or needle.encode("utf-16-le") in blob
    ]
    assert leaks == []
    # The search finds what is there: the hospital keeps the originals, identity included.
    originals = b"".join(p.read_bytes() for p in files_under(tmp_path / "hospital-1-data"))
    assert PATIENT_NAME.encode() in originals and OTHER_ID.encode() in originals


def test_identity_is_read_the_same_on_the_fast_and_the_full_parse() -> None:
    """Explicit VR Little Endian takes the one-pass fast path, Implicit VR the full one;
    both keep the same identity (decoded only for a study's first instance)."""
    (explicit,) = ct_series(1, rows=16, cols=16, study=StudyInfo(patient_name=OTHER_NAME))
    implicit = explicit.copy()
    implicit.file_meta = explicit.file_meta.copy()
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    fast = parse_instance(to_part10(explicit), defer_pixel_hash=True)
    full = parse_instance(to_part10(implicit))
    assert fast.identity is not None and full.identity is not None
    a, b = identity_of(fast.identity), identity_of(full.identity)
    assert a == b and a.patient_name == OTHER_NAME and a.birth_date == PATIENT_BIRTH_DATE
    assert OTHER_NAME not in repr(fast)  # the raw attributes stay out of reprs
