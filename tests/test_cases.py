"""Case workflow of the standard: signed records, stage gates, both nodes' chains."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from factory_node.role import FactoryRole
from gateway import authz
from gateway.cases import CaseService
from gateway.cases.chain import Verified
from gateway.cases.records import Envelope, Record, canonical_bytes, genesis_hash
from gateway.cases.schema import CaseFormatError, validate_data
from gateway.cases.signing import PersonSigner
from gateway.cases.workflow import CaseState, Parties, SignerRefused, apply
from gateway.cli.cases import register as register_case_cli
from gateway.config import PeerSection, load_config
from gateway.errors import PermissionDenied, ValidationError
from gateway.pki import IssuedCert, load_private_key, sign
from gateway.rpc.cases_client import CaseClient
from gateway.rpc.client import NodeClient
from gateway.server import Node
from hospital_node.ingest import Ingest
from hospital_node.role import HospitalRole
from tests.cluster import Federation, wait_for, write_config
from tests.dicom_factory import StudyInfo, ct_series, to_part10
from yigong_node.compose import build_node

HOSPITAL, FACTORY = "hospital-1", "factory-1"
CASE_POLICY = {
    "/yigong.v1.Case/CreateCase": frozenset({"clinician"}),
    "/yigong.v1.Case/SubmitRecord": frozenset({"clinician", "engineer"}),
    "/yigong.v1.Case/GetCase": frozenset({authz.SELF, "clinician", "engineer", "officer"}),
    "/yigong.v1.Case/ListCases": frozenset({authz.SELF, "clinician", "engineer", "officer"}),
}
_FACETS = (  # a closed tetrahedron, outward normals: a valid mesh
    ("0 0 -1", "0 0 0", "0 10 0", "10 0 0"),
    ("0 -1 0", "0 0 0", "10 0 0", "0 0 10"),
    ("-1 0 0", "0 0 0", "0 0 10", "0 10 0"),
    ("0.57735 0.57735 0.57735", "10 0 0", "0 10 0", "0 0 10"),
)


def stl(name: str) -> bytes:
    """A small valid ASCII STL; ``name`` makes its bytes (and object id) unique."""
    facets = "".join(
        f"  facet normal {n}\n    outer loop\n"
        + "".join(f"      vertex {v}\n" for v in vs)
        + "    endloop\n  endfacet\n"
        for n, *vs in _FACETS
    )
    return f"solid {name}\n{facets}endsolid {name}\n".encode()


# --------------------------------------------------------------------------- harness
@dataclasses.dataclass
class CaseNode:
    node: Node
    cases: CaseService
    address: str

    def client(self, fed: Federation, person: IssuedCert) -> NodeClient:
        return NodeClient(self.address, fed.creds(person), node_id=self.node.cfg.node.id)

    def stop(self) -> None:
        self.node.stop(grace=1.0)


def _start(config: Path) -> CaseNode:
    """A node as the composition root builds it (Case service and case facts hook wired)."""
    node = build_node(load_config(config))
    port = node.start()
    return CaseNode(node, node.cases, f"127.0.0.1:{port}")


def _point(node: Node, peer: str, address: str) -> None:
    node.cfg = dataclasses.replace(node.cfg, peers=(PeerSection(peer, address),))


@dataclasses.dataclass(frozen=True)
class Released:
    """A real study released for a case: what its data confirmation and order must name."""

    study: str  # the de-identified Study Instance UID, as the factory received it
    pseudonym: str  # the pseudonym the hospital's vault issued for the case
    confirmation_id: str
    original: str  # the hospital-local Study Instance UID


@dataclasses.dataclass
class Env:
    fed: Federation
    hospital: CaseNode
    factory: CaseNode
    tmp: Path
    released: dict[str, Released] = dataclasses.field(default_factory=dict)

    def release(self, case_id: str, patient_id: str | None = None) -> Released:
        """Ingest a small CT study (of ``patient_id``, default the fictitious patient) at
        the hospital, confirm it for ``case_id`` as its clinician (de-identified, sent to
        the factory) and wait until the factory holds it."""
        if case_id in self.released:
            return self.released[case_id]
        node = self.hospital.node
        role = node.hooks
        assert isinstance(role, HospitalRole)
        ingest = Ingest(
            node.store, node.catalog, role.studies, node.audit, HOSPITAL, role.identities
        )
        study = StudyInfo() if patient_id is None else StudyInfo(patient_id=patient_id)
        for ds in ct_series(2, rows=16, cols=16, study=study):
            ingest.ingest(to_part10(ds), calling_ae="PACS", called_ae="YIGONG")
        role.studies.tick(datetime.now(UTC) + timedelta(seconds=1), 0.0)
        clinician = node.trust.verify_pem(self.person("clinician").cert_path.read_bytes())
        result = role.confirm_study(clinician, study.study_uid, case_id, FACTORY)
        deid = str(json.loads(result.confirmation.record)["deid_study_uid"])
        factory = self.factory.node.hooks
        assert isinstance(factory, FactoryRole)
        wait_for(
            lambda: any(
                s.study_uid == deid and s.instance_count == 2
                for s in factory.studies.list_studies(case_id, 100)
            ),
            30,
            what=f"the factory to receive the study of case {case_id}",
        )
        pseudonym = role.vault.issued_pseudonym(case_id, FACTORY)
        assert pseudonym is not None
        released = Released(deid, pseudonym, result.confirmation.confirmation_id, study.study_uid)
        self.released[case_id] = released
        return released

    def person(self, who: str) -> IssuedCert:
        people = {
            "clinician": ("case-dr-li", "clinician", HOSPITAL),
            "clinician2": ("case-dr-wang", "clinician", HOSPITAL),
            "engineer": ("case-erin", "engineer", FACTORY),
            "officer": ("case-oscar", "officer", HOSPITAL),
            "foreign": ("case-dr-zhou", "clinician", "hospital-2"),
        }
        return self.fed.person(*people[who])

    def node_of(self, who: str) -> CaseNode:
        return self.factory if who == "engineer" else self.hospital

    def sign(self, who: str, case_id: str, kind: str, data: dict[str, Any]) -> Any:
        person = self.person(who)
        signer = PersonSigner.from_files(person.cert_path, person.key_path)
        with self.node_of(who).client(self.fed, person) as nc:
            return CaseClient(nc).sign(signer, case_id, kind, data)

    def synced(self, case_id: str) -> int:
        """Wait until both nodes hold the same chain; returns its length."""

        def same() -> int | None:
            if self.factory.cases.cases.find_case(case_id) is None:
                return None
            h = [r.record_hash for r in self.hospital.cases.view(case_id).records]
            f = [r.record_hash for r in self.factory.cases.view(case_id).records]
            return len(h) if h == f else None

        return int(wait_for(same, timeout=15, what=f"both nodes to hold case {case_id}"))

    def upload(
        self, case_id: str, name: str = "implant.stl", to: tuple[str, ...] = (HOSPITAL,)
    ) -> str:
        """A design file uploaded at the factory for ``case_id`` and (by default) sent to
        the hospital, where the clinician confirms what arrived."""
        src = self.tmp / name
        src.write_bytes(stl(f"{case_id}-{name}"))
        with self.factory.client(self.fed, self.person("engineer")) as nc:
            reply = nc.submit(src, list(to), case_id=case_id, media_type="model/stl")
        oid = str(reply.object.object_id)
        if HOSPITAL in to:
            catalog = self.hospital.node.catalog
            wait_for(lambda: catalog.find_object(oid), 30, what=f"design {oid[:12]} at hospital")
        return oid


@pytest.fixture
def env(federation: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(authz, "POLICY", {**authz.POLICY, **CASE_POLICY})
    unset = "127.0.0.1:9"  # replaced once the other node listens
    hospital = _start(
        write_config(federation, tmp_path, HOSPITAL, "hospital", peers={FACTORY: unset})
    )
    factory = _start(
        write_config(federation, tmp_path, FACTORY, "factory", peers={HOSPITAL: unset})
    )
    _point(hospital.node, FACTORY, factory.address)
    _point(factory.node, HOSPITAL, hospital.address)
    try:
        yield Env(federation, hospital, factory, tmp_path)
    finally:
        hospital.stop()
        factory.stop()


# --------------------------------------------------------------------------- record data
def data_confirmation(study: str = "1.2.826.0.1.3680043.8.498.1") -> dict[str, Any]:
    """A data confirmation of ``study`` (a real one: :meth:`Env.release`)."""
    return {"studies": [study], "complete": True, "modalities": ["CT"]}


def order(manufacturer: str = FACTORY, pseudonym: str = "YG-3F2A9C01B7D4") -> dict[str, Any]:
    """An order for the patient of ``pseudonym`` (the case's: :meth:`Env.release`)."""
    return {
        "manufacturer": manufacturer,
        "institution": "Example University Hospital, orthopaedics",
        "patient": {"pseudonym": pseudonym, "age": 47, "sex": "female"},
        "clinical_description": "Giant cell tumour of the distal radius, resection planned.",
        "treatment_plan": "En-bloc resection, reconstruction with a custom implant.",
        "risks": "Infection, loosening, wrist stiffness.",
        "device": {
            "name": "Distal radius prosthesis",
            "site": "left distal radius",
            "purpose": "reconstruct the resected segment",
        },
        "material": "Ti6Al4V ELI powder (ISO 5832-3)",
        "structure": "solid stem, porous bone contact surface",
        "mechanical_requirements": "axial load 1500 N without yield",
        "specification": "resection length 62.0 mm",
        "surface": "sand-blasted stem, porous interface",
        "instruments": "patient-specific cutting guide",
        "post_processing_cleaning": "stress relief, support removal, ultrasonic cleaning",
        "packaging_sterilisation": "double sterile barrier, EO sterilisation",
        "delivery_time": "2026-07-01",
        "shrinkage_range": {"min_percent": 0.0, "max_percent": 0.5},
        "custom_reason": "no standard implant fits the resection geometry",
    }


def review(decision: str = "accepted") -> dict[str, Any]:
    out = {"decision": decision, "findings": "design inputs complete and unambiguous"}
    return out | ({"reason": "resection level missing"} if decision == "rejected" else {})


def design(object_id: str) -> dict[str, Any]:
    return {
        "files": [{"object_id": object_id, "name": "implant.stl", "kind": "model"}],
        "parameters": {"resection_length_mm": 62.0, "lattice": "diamond", "porosity": 0.65},
        "safety_features": [{"feature": "stem-plate junction", "requirement": "fillet >= 2 mm"}],
    }


def confirm(side: str, design_hash: str, decision: str = "confirmed") -> dict[str, Any]:
    out = {"side": side, "decision": decision, "design_hash": design_hash}
    return out | ({"reason": "plate too prominent"} if decision == "rejected" else {})


def production(design_hash: str, batch: str = "B-2026-0001") -> dict[str, Any]:
    return {
        "batch_number": batch,
        "serial_number": f"SN-{batch}",
        "design_hash": design_hash,
        "process_records": [
            {"step": "laser powder bed fusion", "result": "build 7 complete", "reference": "B7"},
            {"step": "cleaning", "result": "passed residue test"},
        ],
    }


def delivery(batch: str = "B-2026-0001", udi: str = "(01)06901234567892(21)SN1") -> dict[str, Any]:
    return {
        "udi": udi,
        "batch_number": batch,
        "items": [{"name": "implant", "quantity": 1}, {"name": "cutting guide", "quantity": 1}],
        "logistics": {
            "carrier": "MedExpress",
            "signed_off_by": "logistics desk",
            "dispatched_on": "2026-06-20",
        },
    }


def data_delivery(object_id: str) -> dict[str, Any]:
    return {"files": [{"object_id": object_id, "name": "implant.stl", "kind": "final design"}]}


def acceptance(
    udi: str = "(01)06901234567892(21)SN1", decision: str = "accepted", measured: float = 62.1
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "decision": decision,
        "udi": udi,
        "indicators": {
            "dimensional": [
                {
                    "feature": "resection length",
                    "nominal_mm": 62.0,
                    "measured_mm": measured,
                    "tolerance_mm": 0.2,
                },
            ],
            "fit": {"result": "pass"},
            "shrinkage_percent": 0.3,
            "surface": {"result": "pass"},
            "pore_size": {"result": "pass", "measured_um": 600},
            "mechanical_report": {"result": "pass", "reference": "MR-2026-17"},
            "biocompatibility_report": {"result": "pass", "reference": "ISO 10993 BR-9"},
        },
    }
    return out | ({"reason": "length out of tolerance"} if decision == "rejected" else {})


def last_hash(view: Any) -> str:
    return str(view.records[-1].record_hash)


def advance(env: Env, case_id: str, to: str) -> dict[str, str]:
    """Open ``case_id`` (unless open) and sign records until the case is at stage ``to``."""
    if env.hospital.cases.cases.find_case(case_id) is None:
        with env.hospital.client(env.fed, env.person("clinician")) as nc:
            CaseClient(nc).create(case_id, FACTORY)
    out: dict[str, str] = {}
    steps = [
        (
            "order",
            "clinician",
            "data_confirmation",
            lambda: data_confirmation(env.release(case_id).study),
        ),
        (
            "design_input_review",
            "clinician",
            "order",
            lambda: order(pseudonym=env.release(case_id).pseudonym),
        ),
        ("design_output", "engineer", "design_input_review", lambda: review()),
        (
            "design_confirmation",
            "engineer",
            "design_output",
            lambda: design(out.setdefault("file", env.upload(case_id))),
        ),
        (
            "design_confirmation+",
            "clinician",
            "design_confirmation",
            lambda: confirm("clinical", out["design"]),
        ),
        (
            "production",
            "engineer",
            "design_confirmation",
            lambda: confirm("production", out["design"]),
        ),
        ("delivery_list", "engineer", "production_record", lambda: production(out["design"])),
        ("data_delivery", "engineer", "delivery_list", lambda: delivery()),
        ("acceptance", "engineer", "data_delivery", lambda: data_delivery(out["file"])),
        ("follow_up", "clinician", "acceptance", lambda: acceptance()),
    ]
    at = "data_confirmation"
    for stage_after, who, kind, make in steps:
        if at == to:
            break
        view = env.sign(who, case_id, kind, make())
        env.synced(case_id)
        if kind == "design_output":
            out["design"] = last_hash(view)
        at = stage_after
    assert at == to, f"no such stage {to}"
    return out


# --------------------------------------------------------------------------- the full case
def test_full_case_across_two_nodes_holds_one_verified_chain(env: Env) -> None:
    """order → design files → confirmation → production → delivery → acceptance → follow-up:
    both nodes show the identical chain with every signature verified."""
    case_id = "C-FULL-1"
    with env.hospital.client(env.fed, env.person("clinician")) as nc:
        opened = CaseClient(nc).create(case_id, FACTORY)
    assert opened.stage == "data_confirmation" and opened.next_seq == 0
    assert opened.head_hash == genesis_hash(case_id)
    released = env.release(case_id)
    env.sign("clinician", case_id, "data_confirmation", data_confirmation(released.study))
    env.sign("clinician", case_id, "order", order(pseudonym=released.pseudonym))
    env.synced(case_id)
    env.sign("engineer", case_id, "design_input_review", review())
    model = env.upload(case_id, to=(HOSPITAL,))  # the design file itself goes to the hospital too
    view = env.sign("engineer", case_id, "design_output", design(model))
    design_hash = last_hash(view)
    assert view.stage == "design_confirmation"
    assert {a.role for a in view.next} == {"clinician", "engineer"}
    env.synced(case_id)
    env.sign("clinician", case_id, "design_confirmation", confirm("clinical", design_hash))
    env.synced(case_id)
    view = env.sign("engineer", case_id, "design_confirmation", confirm("production", design_hash))
    assert view.stage == "production"
    env.sign("engineer", case_id, "production_record", production(design_hash))
    env.sign("engineer", case_id, "delivery_list", delivery())
    view = env.sign("engineer", case_id, "data_delivery", data_delivery(model))
    assert view.stage == "acceptance"
    assert [a.description for a in view.next] == ["the acceptance by a clinician of hospital-1"]
    env.synced(case_id)
    env.sign("clinician", case_id, "acceptance", acceptance())
    view = env.sign(
        "clinician",
        case_id,
        "follow_up",
        {
            "date": "2026-09-01",
            "findings": "implant stable",
            "feedback": "fit was excellent",
            "outcome": "satisfactory",
        },
    )
    assert view.stage == "follow_up"
    assert env.synced(case_id) == 11

    def receipted(side: CaseNode, peer: str) -> bool:  # the receipts are back at the senders
        local = [r for r in side.cases.view(case_id).records if r.origin == "local"]
        return all(r.exchange == f"delivered to {peer} (signed receipt)" for r in local)

    wait_for(lambda: receipted(env.factory, HOSPITAL) and receipted(env.hospital, FACTORY))

    # Both query endpoints (GetCase, as the officer and as the engineer) show the same chain.
    with env.hospital.client(env.fed, env.person("officer")) as nc:
        at_hospital = CaseClient(nc).get(case_id)
    with env.factory.client(env.fed, env.person("engineer")) as nc:
        at_factory = CaseClient(nc).get(case_id)
    for v in (at_hospital, at_factory):
        assert v.verified and v.problem == "" and v.stage == "follow_up"
        assert all(r.verified for r in v.records)
        assert (v.hospital, v.manufacturer) == (HOSPITAL, FACTORY)
    assert [r.record_hash for r in at_hospital.records] == [
        r.record_hash for r in at_factory.records
    ]
    assert [r.envelope for r in at_hospital.records] == [r.envelope for r in at_factory.records]
    assert [r.type for r in at_hospital.records] == [
        "data_confirmation",
        "order",
        "design_input_review",
        "design_output",
        "design_confirmation",
        "design_confirmation",
        "production_record",
        "delivery_list",
        "data_delivery",
        "acceptance",
        "follow_up",
    ]
    assert [r.seq for r in at_factory.records] == list(range(11))
    # Each record: signed by the person, countersigned by their node, linked to the previous.
    prev = genesis_hash(case_id)
    for r in at_hospital.records:
        env_doc = json.loads(r.envelope)
        rec = json.loads(env_doc["record"])
        assert rec["prev_hash"] == prev and r.prev_hash == prev
        assert env_doc["node_id"] == rec["author"]["org"] == r.node_id
        prev = r.record_hash
    # Each node says what the other did with its records: delivered, with a signed receipt.
    local = [r for r in at_factory.records if r.origin == "local"]
    assert local and all(r.exchange == f"delivered to {HOSPITAL} (signed receipt)" for r in local)
    remote = [r for r in at_factory.records if r.origin == "remote"]
    assert remote and all(r.exchange == f"received from {HOSPITAL}" for r in remote)
    # The design file reached the hospital, and every record is an object on both nodes.
    assert env.hospital.node.catalog.find_object(model) is not None
    for r in at_hospital.records:
        for side in (env.hospital, env.factory):
            obj = side.node.catalog.get_object(r.record_hash)
            assert obj.media_type == "application/vnd.yigong.case-record+json"
            assert obj.case_id == case_id
    assert env.hospital.cases.is_own_record(at_hospital.records[0].record_hash)
    assert not env.hospital.cases.is_own_record(at_hospital.records[2].record_hash)  # factory's
    events = env.factory.node.audit.events(event="case.record")
    assert sum(1 for e in events if e.details.get("action") == "appended") == 11


# --------------------------------------------------------------------------- stage gates
def test_out_of_order_step_is_refused_naming_the_missing_stage(env: Env) -> None:
    case_id = "C-ORDER-1"
    with env.hospital.client(env.fed, env.person("clinician")) as nc:
        CaseClient(nc).create(case_id, FACTORY)
    with pytest.raises(ValidationError) as err:
        env.sign("clinician", case_id, "order", order())
    assert (
        f"case {case_id}: cannot record order: stage 'data_confirmation' is not complete "
        "(needs the data confirmation by a clinician of hospital-1)"
    ) in str(err.value)

    advance(env, case_id, "design_confirmation+")  # design output, clinical side confirmed
    with pytest.raises(ValidationError) as err:
        env.sign("engineer", case_id, "production_record", production("ab" * 32))
    assert (
        f"case {case_id}: cannot record production_record: stage 'design_confirmation' is not "
        "complete (needs the production confirmation by an engineer of factory-1)"
    ) in str(err.value)
    with pytest.raises(
        ValidationError,
        match=r"cannot record acceptance: stage 'design_confirmation' is not complete",
    ):
        env.sign("clinician", case_id, "acceptance", acceptance())
    with pytest.raises(ValidationError, match=r"cannot record follow_up: stage"):
        env.sign("clinician", case_id, "follow_up", {"date": "2026-09-01", "findings": "ok"})
    with pytest.raises(ValidationError) as err:
        env.sign("clinician", case_id, "order", order())
    assert "stage 'order' is already complete; the case is at stage 'design_confirmation'" in str(
        err.value
    )
    # Nothing refused was recorded, on either node; refusals are audited.
    assert env.synced(case_id) == 5
    refused = [
        e for e in env.hospital.node.audit.events(event="case.record") if e.outcome == "failure"
    ]
    assert {e.details["reason"] for e in refused} >= {"StageRefused"}


def test_wrong_role_is_refused(env: Env) -> None:
    case_id = "C-ROLE-1"
    advance(env, case_id, "order")
    with pytest.raises(PermissionDenied) as err:  # an engineer signing an order
        env.sign("engineer", case_id, "order", order())
    assert (
        f"case {case_id}: engineer:case-erin@factory-1 may not sign order: the order (§5.2.2) "
        "is signed by a clinician of hospital-1"
    ) in str(err.value)
    with pytest.raises(
        PermissionDenied,
        match=r"may not sign production_record: the production "
        "record .§6.2. is signed by an engineer of factory-1",
    ):
        env.sign("clinician", case_id, "production_record", production("ab" * 32))
    # An officer may read the case but not sign: the gatekeeper refuses the call...
    with pytest.raises(PermissionDenied, match=r"/yigong.v1.Case/SubmitRecord"):
        env.sign("officer", case_id, "order", order())
    # ...and the domain refuses it too, whoever lets it through.
    officer = env.person("officer")
    signer = PersonSigner.from_files(officer.cert_path, officer.key_path)
    pem = officer.cert_path.read_bytes()
    raw = signer.record(case_id, 1, env.hospital.cases.view(case_id).head_hash, "order", order())
    with pytest.raises(PermissionDenied, match=r"officer:case-oscar@hospital-1 may not sign case"):
        env.hospital.cases.submit(signer.identity, pem, raw, signer.sign(raw))
    # An engineer may not open a case, and only clinicians confirm the clinical side.
    with (
        env.hospital.client(env.fed, env.person("engineer")) as nc,
        pytest.raises(PermissionDenied),
    ):
        CaseClient(nc).create("C-ROLE-2", FACTORY)
    state = CaseState(Parties(case_id, HOSPITAL, FACTORY), stage="design_confirmation", design="d")
    rec = _record(env, "engineer", case_id, "design_confirmation", confirm("clinical", "ab" * 32))
    with pytest.raises(SignerRefused, match=r"may not sign the clinical confirmation"):
        apply(state, rec, "00" * 32)
    assert env.hospital.cases.view(case_id).next_seq == 1


def _record(env: Env, who: str, case_id: str, kind: str, data: dict[str, Any]) -> Record:
    person = env.person(who)
    signer = PersonSigner.from_files(person.cert_path, person.key_path)
    return Record.parse(signer.record(case_id, 0, genesis_hash(case_id), kind, data))


def test_person_of_the_wrong_node_is_refused(env: Env) -> None:
    case_id = "C-NODE-1"
    advance(env, case_id, "order")
    foreign = env.person("foreign")  # a clinician of hospital-2
    with pytest.raises(PermissionDenied, match=r"belongs to node 'hospital-2', not 'hospital-1'"):
        env.sign("foreign", case_id, "order", order())
    signer = PersonSigner.from_files(foreign.cert_path, foreign.key_path)
    head = env.hospital.cases.view(case_id).head_hash
    raw = signer.record(case_id, 1, head, "order", order())
    with pytest.raises(PermissionDenied, match=r"belongs to node hospital-2, not hospital-1"):
        env.hospital.cases.submit(
            signer.identity, foreign.cert_path.read_bytes(), raw, signer.sign(raw)
        )
    # The gate itself: a clinician of another hospital may not sign for this case.
    state = CaseState.start(Parties(case_id, HOSPITAL, FACTORY))
    rec = _record(env, "foreign", case_id, "data_confirmation", data_confirmation())
    with pytest.raises(
        SignerRefused,
        match=r"belongs to node hospital-2, but the data "
        "confirmation of this case is signed by a clinician of hospital-1",
    ):
        apply(state, rec, "00" * 32)
    # A record countersigned by a node that is not part of the case is refused by the peer.
    eng2 = env.fed.person("case-fay", "engineer", "factory-2")
    node2 = env.fed.node("factory-2", "factory")
    signer2 = PersonSigner.from_files(eng2.cert_path, eng2.key_path)
    head = env.hospital.cases.view(case_id).head_hash
    raw = signer2.record(case_id, 1, head, "design_input_review", review())
    envelope = Envelope(
        raw,
        signer2.sign(raw),
        eng2.cert_path.read_bytes(),
        "factory-2",
        node2.cert_path.read_bytes(),
    )
    envelope = dataclasses.replace(
        envelope,
        node_signature=sign(load_private_key(node2.key_path), envelope.node_signing_bytes()),
    )
    facts = env.hospital.cases.accept_remote(envelope.to_bytes())
    assert facts["case.status"] == "refused"
    assert "node factory-2 is not part of it" in facts["case.error"]
    assert env.hospital.cases.view(case_id).next_seq == 1
    assert any("factory-2" in rej[3] for rej in env.hospital.cases.view(case_id).rejected)


def test_design_change_reopens_confirmation(env: Env) -> None:
    case_id = "C-CHANGE-1"
    out = advance(env, case_id, "production")  # the design is confirmed by both sides
    old = out["design"]
    revised = env.upload(case_id, name="implant-v2.stl")
    change = {
        "reason": "plate too prominent at the styloid",
        "description": "thinner plate",
        **design(revised),
    }
    view = env.sign("engineer", case_id, "design_change", change)
    new = last_hash(view)
    assert view.stage == "design_confirmation"
    assert sorted(a.description for a in view.next) == [
        "the clinical confirmation by a clinician of hospital-1",
        "the production confirmation by an engineer of factory-1",
    ]
    with pytest.raises(ValidationError) as err:
        env.sign("engineer", case_id, "production_record", production(old))
    assert (
        "cannot record production_record: stage 'design_confirmation' is not complete (needs "
        "the clinical confirmation by a clinician of hospital-1 and the production confirmation "
        "by an engineer of factory-1)"
    ) in str(err.value)
    env.synced(case_id)
    with pytest.raises(ValidationError, match=r"it confirms design .*, but the design awaiting"):
        env.sign("clinician", case_id, "design_confirmation", confirm("clinical", old))
    env.sign("clinician", case_id, "design_confirmation", confirm("clinical", new))
    env.synced(case_id)
    view = env.sign("engineer", case_id, "design_confirmation", confirm("production", new))
    assert view.stage == "production"
    with pytest.raises(ValidationError, match=r"names a design other than the confirmed one"):
        env.sign("engineer", case_id, "production_record", production(old))
    env.sign("engineer", case_id, "production_record", production(new))
    env.synced(case_id)

    # A change request without the revised design (here by the clinician) goes back further:
    # the engineer must issue a new design output, then both confirm again.
    view = env.sign(
        "clinician",
        case_id,
        "design_change",
        {"reason": "patient's bone quality", "description": "longer stem"},
    )
    assert view.stage == "design_output"
    env.synced(case_id)
    with pytest.raises(PermissionDenied, match=r"may not sign design_output"):
        env.sign("clinician", case_id, "design_output", design(revised))
    view = env.sign("engineer", case_id, "design_output", design(revised))
    assert view.stage == "design_confirmation" and len(view.next) == 2
    env.synced(case_id)
    with pytest.raises(PermissionDenied, match=r"may not attach a revised design"):
        env.sign(
            "clinician",
            case_id,
            "design_change",
            {"reason": "r", "description": "d", **design(revised)},
        )


def test_rejections_send_the_case_back(env: Env) -> None:
    case_id = "C-REJECT-1"
    advance(env, case_id, "design_input_review")
    view = env.sign("engineer", case_id, "design_input_review", review("rejected"))
    assert view.stage == "order"  # a revised order is needed
    env.synced(case_id)
    with pytest.raises(ValidationError, match=r"data.reason is required"):
        env.sign(
            "engineer", case_id, "design_input_review", {"decision": "rejected", "findings": "x"}
        )
    env.sign("clinician", case_id, "order", order(pseudonym=env.release(case_id).pseudonym))
    env.synced(case_id)
    env.sign("engineer", case_id, "design_input_review", review())
    model = env.upload(case_id)
    first = last_hash(env.sign("engineer", case_id, "design_output", design(model)))
    env.synced(case_id)
    view = env.sign(
        "clinician", case_id, "design_confirmation", confirm("clinical", first, "rejected")
    )
    assert view.stage == "design_output"  # rejected design: back to design output
    env.synced(case_id)
    second = last_hash(env.sign("engineer", case_id, "design_output", design(model)))
    env.synced(case_id)
    env.sign("clinician", case_id, "design_confirmation", confirm("clinical", second))
    env.synced(case_id)
    env.sign("engineer", case_id, "design_confirmation", confirm("production", second))
    env.sign("engineer", case_id, "production_record", production(second, "B-7"))
    env.sign("engineer", case_id, "delivery_list", delivery("B-7", "UDI-7"))
    env.sign("engineer", case_id, "data_delivery", data_delivery(model))
    env.synced(case_id)
    # 62.4 mm against 62.0 ± 0.2: "accepted" contradicts the indicators and is refused.
    with pytest.raises(
        ValidationError,
        match=r"'accepted' contradicts the judgment indicators: "
        r"dimensional\[0\] deviates 0.4 mm > 0.2 mm",
    ):
        env.sign("clinician", case_id, "acceptance", acceptance("UDI-7", measured=62.4))
    with pytest.raises(ValidationError, match=r"its UDI is not the one of the delivery list"):
        env.sign("clinician", case_id, "acceptance", acceptance("UDI-X"))
    view = env.sign(
        "clinician", case_id, "acceptance", acceptance("UDI-7", "rejected", measured=62.4)
    )
    assert view.stage == "production"  # rejected device: remade from the confirmed design
    env.synced(case_id)
    with pytest.raises(ValidationError, match=r"batch_number is already used"):
        env.sign("engineer", case_id, "production_record", production(second, "B-7"))
    env.sign("engineer", case_id, "production_record", production(second, "B-8"))
    with pytest.raises(ValidationError, match=r"udi is already used"):
        env.sign("engineer", case_id, "delivery_list", delivery("B-8", "UDI-7"))
    env.sign("engineer", case_id, "delivery_list", delivery("B-8", "UDI-8"))
    env.sign("engineer", case_id, "data_delivery", data_delivery(model))
    env.synced(case_id)
    env.sign("clinician", case_id, "acceptance", acceptance("UDI-8"))
    with pytest.raises(ValidationError, match="record a nonconformity with disposition 'redesign'"):
        env.sign("clinician", case_id, "design_change", {"reason": "r", "description": "d"})
    view = env.sign(
        "clinician",
        case_id,
        "nonconformity",
        {
            "description": "plate loosening at 3 months",
            "disposition": "redesign",
            "udi": "UDI-8",
            "severity": "major",
        },
    )
    assert view.stage == "design_output"  # §9.4: nonconformity after acceptance → redesign
    assert env.synced(case_id) == view.next_seq
    # Batch numbers are unique across the node's cases, not only within one.
    advance(env, "C-REJECT-2", "production")
    design_hash = env.factory.cases.intact(env.factory.cases.case("C-REJECT-2")).state.design
    with pytest.raises(ValidationError, match=r"batch_number is already used by case C-REJECT-1"):
        env.sign("engineer", "C-REJECT-2", "production_record", production(design_hash, "B-8"))


# --------------------------------------------------------------------------- tampering
def _edit_envelope(
    node: Node, case_id: str, seq: int, old: bytes, new: bytes, *, fix_hash: bool = False
) -> None:
    """What an attacker with write access to the catalog file does."""
    db = sqlite3.connect(node.cfg.catalog.path)
    try:
        (envelope,) = db.execute(
            "SELECT envelope FROM case_records WHERE case_id = ? AND seq = ?", (case_id, seq)
        ).fetchone()
        assert old in envelope
        edited = bytes(envelope).replace(old, new, 1)
        db.execute(
            "UPDATE case_records SET envelope = ? WHERE case_id = ? AND seq = ?",
            (edited, case_id, seq),
        )
        if fix_hash:
            db.execute(
                "UPDATE case_records SET envelope_hash = ? WHERE case_id = ? AND seq = ?",
                (hashlib.sha256(edited).hexdigest(), case_id, seq),
            )
        db.commit()
    finally:
        db.close()


def test_modified_stored_record_fails_verification(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    case_id = "C-TAMPER-1"
    advance(env, case_id, "design_output")
    _edit_envelope(env.factory.node, case_id, 1, b'\\"age\\":47', b'\\"age\\":48')
    with env.factory.client(env.fed, env.person("engineer")) as nc:
        view = CaseClient(nc).get(case_id)
    assert not view.verified
    assert view.problem.startswith("record 1: ") and "(modified)" in view.problem
    assert [r.verified for r in view.records] == [True, False, False]
    assert view.records[2].problem.startswith("record 2: does not link to record 1")
    assert view.next == []  # nobody can act on a chain that does not verify
    # The node refuses to extend it, and the CLI shows the failure with exit status 1.
    with pytest.raises(ValidationError, match=r"the stored chain does not verify .record 1: "):
        env.sign("engineer", case_id, "design_output", design(env.upload(case_id)))
    assert _cli(env, "engineer", ["show", case_id]) == 1
    out = capsys.readouterr().out
    assert "VERIFICATION FAILED: record 1:" in out and "FAILED" in out
    # An attacker who also rewrites the stored hash is caught by the signatures.
    _edit_envelope(env.factory.node, case_id, 1, b'\\"age\\":48', b'\\"age\\":46', fix_hash=True)
    problem = env.factory.cases.view(case_id).problem
    assert problem.startswith("record 1: signature or certificate does not verify")
    # The hospital's copy is untouched and still verifies.
    assert env.hospital.cases.view(case_id).ok


def test_forged_author_signature_is_refused(env: Env) -> None:
    case_id = "C-FORGE-1"
    advance(env, case_id, "order")
    dr_li, dr_wang = env.person("clinician"), env.person("clinician2")
    li = PersonSigner.from_files(dr_li.cert_path, dr_li.key_path)
    wang = PersonSigner.from_files(dr_wang.cert_path, dr_wang.key_path)
    with env.hospital.client(env.fed, dr_li) as nc:
        client = CaseClient(nc)
        record = client.prepare(li, case_id, "order", order())
        with pytest.raises(
            ValidationError,
            match=r"author signature of the order record does "
            "not verify against the certificate of clinician:case-dr-li",
        ):
            client.submit(record, wang.sign(record))  # signed with someone else's key
        tampered = record.replace(b'"age":47', b'"age":48')
        with pytest.raises(ValidationError, match=r"does not verify"):
            client.submit(tampered, li.sign(record))  # record changed after signing
        pretty = json.dumps(json.loads(record), indent=1).encode()
        with pytest.raises(ValidationError, match=r"not in canonical form"):
            client.submit(pretty, li.sign(pretty))
        theirs = client.prepare(wang, case_id, "order", order())
        with pytest.raises(PermissionDenied, match=r"names author clinician:case-dr-wang"):
            client.submit(theirs, wang.sign(theirs))  # dr-li submits dr-wang's record
    # A forged countersignature from the peer is refused and recorded, never appended.
    raw = env.hospital.cases.cases.records(case_id)[0].envelope
    doc = json.loads(raw)
    sig = bytearray(base64.b64decode(doc["node_signature"]))
    sig[-1] ^= 1
    doc["node_signature"] = base64.b64encode(bytes(sig)).decode()
    facts = env.factory.cases.accept_remote(canonical_bytes(doc))
    assert "does not verify" in facts["case.error"] and facts["case.status"] == "refused"
    assert env.factory.cases.view(case_id).next_seq == 1
    assert env.hospital.cases.view(case_id).next_seq == 1


def _cli(env: Env, who: str, argv: list[str]) -> int:
    person = env.person(who)
    node = env.node_of(who)
    parser = argparse.ArgumentParser()
    register_case_cli(parser.add_subparsers())
    conn = [
        "--address",
        node.address,
        "--node-id",
        node.node.cfg.node.id,
        "--cert",
        str(person.cert_path),
        "--key",
        str(person.key_path),
        "--ca",
        str(env.fed.ca),
    ]
    args = parser.parse_args(["case", *argv, *conn] if argv[0] != "types" else ["case", *argv])
    return int(args.func(args))


# --------------------------------------------------------------------------- exchange
def _hold_sends(monkeypatch: pytest.MonkeyPatch, node: CaseNode) -> list[Verified]:
    """Keep ``node``'s records from leaving, to deliver them by hand in any order."""
    held: list[Verified] = []
    monkeypatch.setattr(node.cases, "send", held.append)
    return held


def test_records_arriving_out_of_order_wait_for_the_gap(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    case_id = "C-GAP-1"
    held = _hold_sends(monkeypatch, env.hospital)
    with env.hospital.client(env.fed, env.person("clinician")) as nc:
        CaseClient(nc).create(case_id, FACTORY)
    released = env.release(case_id)
    env.sign("clinician", case_id, "data_confirmation", data_confirmation(released.study))
    env.sign("clinician", case_id, "order", order(pseudonym=released.pseudonym))
    first, second = (v.envelope.to_bytes() for v in held)
    factory = env.factory.cases
    facts = factory.accept_remote(second)  # overtook record 0: the case is not even known yet
    assert facts["case.status"] == "pending" and facts["case.seq"] == "1"
    assert factory.cases.find_case(case_id) is None
    facts = factory.accept_remote(first)
    assert facts == {
        "case.id": case_id,
        "case.seq": "0",
        "case.record_hash": held[0].hash,
        "case.status": "appended",
    }
    view = factory.view(case_id)
    assert view.ok and view.next_seq == 2 and view.pending == 0
    assert (view.case.hospital, view.case.manufacturer) == (HOSPITAL, FACTORY)
    assert factory.accept_remote(second)["case.status"] == "held"  # a re-issued receipt
    # Through the real transfer from now on: the engineer's review reaches the hospital.
    monkeypatch.undo()
    monkeypatch.setattr(authz, "POLICY", {**authz.POLICY, **CASE_POLICY})
    env.sign("engineer", case_id, "design_input_review", review())
    assert env.synced(case_id) == 3
    # The hospital's two records were never queued (as after a crash): resume() sends them,
    # the factory acknowledges what it holds, and both sides show them delivered.
    assert env.hospital.cases.resume() == 2 and env.hospital.cases.resume() == 0

    def delivered() -> bool:
        local = [r for r in env.hospital.cases.view(case_id).records if r.origin == "local"]
        return all(r.exchange == f"delivered to {FACTORY} (signed receipt)" for r in local)

    wait_for(delivered, timeout=15, what="the resumed records to be delivered")


def test_concurrent_signing_is_resolved_by_the_hospital(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clinical and production confirmation signed at the same seq on both nodes: the
    hospital's record stays, the factory's is displaced and signed again."""
    case_id = "C-RACE-1"
    out = advance(env, case_id, "design_confirmation")
    from_hospital = _hold_sends(monkeypatch, env.hospital)
    from_factory = _hold_sends(monkeypatch, env.factory)
    env.sign("clinician", case_id, "design_confirmation", confirm("clinical", out["design"]))
    env.sign("engineer", case_id, "design_confirmation", confirm("production", out["design"]))
    (h,), (f,) = from_hospital, from_factory
    assert h.record.seq == f.record.seq == 4
    facts = env.hospital.cases.accept_remote(f.envelope.to_bytes())
    assert "signed concurrently" in facts["case.error"]
    facts = env.factory.cases.accept_remote(h.envelope.to_bytes())
    assert facts["case.status"] == "appended"
    hv, fv = env.hospital.cases.view(case_id), env.factory.cases.view(case_id)
    assert [r.record_hash for r in hv.records] == [r.record_hash for r in fv.records]
    assert hv.ok and fv.ok and fv.stage == "design_confirmation"
    assert [(seq, kind) for seq, _, kind, _ in fv.rejected] == [(4, "displaced")]
    assert [(seq, kind) for seq, _, kind, _ in hv.rejected] == [(4, "refused")]
    assert [a.role for a in fv.next] == ["engineer"]  # the engineer signs again
    monkeypatch.undo()
    monkeypatch.setattr(authz, "POLICY", {**authz.POLICY, **CASE_POLICY})
    view = env.sign(
        "engineer", case_id, "design_confirmation", confirm("production", out["design"])
    )
    assert view.stage == "production" and env.synced(case_id) == 6


# --------------------------------------------------------------------------- CLI
def test_cli_create_sign_show_list(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    case_id = "C-CLI-1"
    assert _cli(env, "clinician", ["create", "--case", case_id, "--manufacturer", FACTORY]) == 0
    assert f"case {case_id} opened" in capsys.readouterr().out
    released = env.release(case_id)
    sign = [
        "sign",
        "data_confirmation",
        "--case",
        case_id,
        "--set",
        "complete:=true",
        "--set",
        f'studies:=["{released.study}"]',
        "--set",
        "notes=all series present",
    ]
    assert _cli(env, "clinician", [*sign, "--json"]) == 1  # no --yes: what would be signed
    captured = capsys.readouterr()
    shown = json.loads(captured.out)
    assert shown["author"]["id"] == "case-dr-li" and shown["type"] == "data_confirmation"
    assert shown["data"] == {
        "complete": True,
        "studies": [released.study],
        "notes": "all series present",
    }
    assert captured.out.strip().encode() == canonical_bytes(shown)
    assert "--yes" in captured.err and env.hospital.cases.view(case_id).next_seq == 0
    assert _cli(env, "clinician", [*sign, "--yes"]) == 0
    assert "record 0 (data_confirmation) signed" in capsys.readouterr().out
    data = env.tmp / "order.json"
    data.write_text(json.dumps(order(pseudonym=released.pseudonym)))
    assert (
        _cli(
            env,
            "clinician",
            [
                "sign",
                "order",
                "--case",
                case_id,
                "--data",
                str(data),
                "--set",
                "patient.age:=48",
                "--yes",
            ],
        )
        == 0
    )
    capsys.readouterr()
    assert _cli(env, "clinician", ["show", case_id]) == 0
    out = capsys.readouterr().out
    assert "every signature, link and stage gate verified" in out
    assert "stage: design_input_review" in out
    assert "next: the design input review by an engineer of factory-1" in out
    assert "order" in out and "OK" in out and "FAILED" not in out
    assert _cli(env, "clinician", ["show", case_id, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verified"] is True and doc["records"][1]["record"]["data"]["patient"]["age"] == 48
    env.synced(case_id)
    assert _cli(env, "engineer", ["list"]) == 0
    assert case_id in capsys.readouterr().out
    assert _cli(env, "engineer", ["types"]) == 0
    assert "order (§5.2.2, the order) — signed by a clinician" in capsys.readouterr().out


# --------------------------------------------------------------------------- format
def test_record_format_and_field_checks_never_echo_values() -> None:
    assert genesis_hash("C-1") == hashlib.sha256(b"yigong-case-genesis:C-1").hexdigest()
    bad = order() | {"patient": {"pseudonym": "YG-1", "age": "forty-seven", "sex": "female"}}
    with pytest.raises(CaseFormatError) as err:
        validate_data("order", bad)
    assert str(err.value) == "data.patient.age must be an integer 0-150"
    with pytest.raises(CaseFormatError, match=r"unknown field.s. .patient_name."):
        validate_data("order", order() | {"patient_name": "Zhang San"})
    with pytest.raises(CaseFormatError, match=r"lacks the required field.s. custom_reason"):
        validate_data("order", {k: v for k, v in order().items() if k != "custom_reason"})
    with pytest.raises(CaseFormatError, match=r"patient.pseudonym must be 1-64 characters"):
        validate_data(
            "order", order() | {"patient": {"pseudonym": "Zhang San", "age": 4, "sex": "male"}}
        )
    with pytest.raises(CaseFormatError, match=r"measured_mm must be given to 0.1"):
        validate_data("acceptance", acceptance(measured=62.15))
    with pytest.raises(CaseFormatError, match=r"min_percent must be <= max_percent"):
        validate_data("order", order() | {"shrinkage_range": {"min_percent": 1, "max_percent": 0}})
    with pytest.raises(CaseFormatError, match=r"needs all of data.files"):
        validate_data(
            "design_change",
            {"reason": "r", "description": "d", "files": design("ab" * 32)["files"]},
        )
    with pytest.raises(CaseFormatError, match=r"unknown record type"):
        validate_data("invoice", {})
    with pytest.raises(CaseFormatError, match=r"acceptance.*|data.reason is required"):
        validate_data(
            "acceptance",
            {k: v for k, v in acceptance(decision="rejected").items() if k != "reason"},
        )
