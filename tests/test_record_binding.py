"""Records bound to facts (issue #16, part 5): a signed record must say something true.

Two real nodes over mTLS (the harness of tests/test_cases.py); studies are ingested at
the hospital, confirmed by its clinician, de-identified and received by the factory.
For each record type that names a fact: one record refused (the message names the
field and why) and one accepted. Records that bypass the hospital's own check
(countersigned by hand with the hospital's node key) show that the factory checks
again on arrival.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gateway.audit import CASE_RECORD
from gateway.cases.records import Envelope, genesis_hash
from gateway.cases.signing import PersonSigner
from gateway.errors import ValidationError
from gateway.rpc.cases_client import CaseClient
from hospital_node.ingest import Ingest
from hospital_node.role import HospitalRole
from hospital_node.vault import PatientIdentity
from tests import test_cases
from tests.cluster import wait_for
from tests.dicom_factory import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    StudyInfo,
    ct_series,
    to_part10,
)
from tests.test_cases import (
    FACTORY,
    HOSPITAL,
    Env,
    acceptance,
    advance,
    confirm,
    data_confirmation,
    delivery,
    design,
    last_hash,
    order,
    production,
)

env = test_cases.env  # the fixture: two nodes with the Case service, over mTLS


def opened(env: Env, case_id: str) -> None:
    with env.hospital.client(env.fed, env.person("clinician")) as nc:
        CaseClient(nc).create(case_id, FACTORY)


def refusal_messages(env: Env, case_id: str) -> list[str]:
    return [
        str(e.details.get("message"))
        for e in env.hospital.node.audit.events(event=CASE_RECORD, limit=100000)
        if e.case_id == case_id and e.outcome == "failure"
    ]


def from_hospital(
    env: Env, case_id: str, seq: int, prev: str, kind: str, data: dict[str, Any]
) -> bytes:
    """A record signed by the hospital's clinician and countersigned with the hospital's
    node key *without* the hospital's checks (what a compromised or buggy hospital sends)."""
    person = env.person("clinician")
    signer = PersonSigner.from_files(person.cert_path, person.key_path)
    raw = signer.record(case_id, seq, prev, kind, data)
    node = env.hospital.node
    envelope = Envelope(
        raw, signer.sign(raw), person.cert_path.read_bytes(), HOSPITAL, node.cert_pem
    )
    envelope = dataclasses.replace(
        envelope, node_signature=node.sign(envelope.node_signing_bytes())
    )
    return envelope.to_bytes()


def factory_chain(env: Env, case_id: str) -> int:
    return len(env.factory.cases.cases.records(case_id))


# --- data confirmation (§4.5) -----------------------------------------------------------------


def test_data_confirmation_must_name_a_study_released_for_this_case_to_its_manufacturer(
    env: Env,
) -> None:
    case_id, other = "C-BIND-DC", "C-BIND-DC2"
    opened(env, case_id)
    with pytest.raises(ValidationError) as err:  # nothing released for the case yet
        env.sign("clinician", case_id, "data_confirmation", data_confirmation())
    assert (
        f"case {case_id}: data_confirmation refused on node {HOSPITAL}: data.studies names "
        f"studies, but hospital {HOSPITAL} has released no study for case {case_id} to {FACTORY}"
    ) in str(err.value)
    mine, theirs = env.release(case_id), env.release(other)
    for wrong in (theirs.study, mine.original, "MRN0012345"):  # another case's, the local UID
        with pytest.raises(ValidationError) as err:
            env.sign("clinician", case_id, "data_confirmation", data_confirmation(wrong))
        assert (
            f"data.studies[0] is not the de-identified UID of a study hospital {HOSPITAL} "
            f"released for case {case_id} to {FACTORY}"
        ) in str(err.value)
        assert "MRN0012345" not in str(err.value)  # the value given is never repeated
    with pytest.raises(ValidationError) as err:
        env.sign(
            "clinician",
            case_id,
            "data_confirmation",
            data_confirmation(mine.study) | {"confirmation_id": theirs.confirmation_id},
        )
    assert f"data.confirmation_id is not a confirmation of hospital {HOSPITAL}" in str(err.value)
    assert env.hospital.cases.view(case_id).next_seq == 0  # nothing refused was recorded
    assert any("data.studies[0]" in m for m in refusal_messages(env, case_id))

    accepted = data_confirmation(mine.study) | {"confirmation_id": mine.confirmation_id}
    view = env.sign("clinician", case_id, "data_confirmation", accepted)
    assert view.stage == "order"
    assert env.synced(case_id) == 1  # the factory checked it again and took it


# --- order (§5.2.2, §5.6) -----------------------------------------------------------------------


def test_order_must_name_the_pseudonym_the_vault_issued_for_the_case(env: Env) -> None:
    case_id = "C-BIND-ORDER"
    advance(env, case_id, "order")
    # issued by the vault, for another case of another patient (one patient's cases to one
    # manufacturer share their pseudonym)
    other = env.release("C-BIND-ORDER2", patient_id="MRN-OTHER-2").pseudonym
    for wrong in ("YG-000000000000", other):
        with pytest.raises(ValidationError) as err:
            env.sign("clinician", case_id, "order", order(pseudonym=wrong))
        assert (
            f"case {case_id}: order refused on node {HOSPITAL}: data.patient.pseudonym is not "
            f"the pseudonym the vault of {HOSPITAL} issued for case {case_id}"
        ) in str(err.value)
        assert wrong not in str(err.value)
    pseudonym = env.release(case_id).pseudonym
    assert pseudonym != other
    view = env.sign("clinician", case_id, "order", order(pseudonym=pseudonym))
    assert view.stage == "design_input_review"
    assert env.synced(case_id) == 2


# --- the factory checks again on arrival --------------------------------------------------------


def test_factory_checks_arriving_records_against_the_studies_it_received(env: Env) -> None:
    factory = env.factory.cases
    # A data confirmation naming a study the factory never received waits; it is not placed.
    facts = factory.accept_remote(
        from_hospital(env, "C-BIND-NONE", 0, genesis_hash("C-BIND-NONE"), "data_confirmation",
                      data_confirmation("1.2.826.0.1.3680043.8.498.99"))
    )  # fmt: skip
    assert facts["case.status"] == "pending"
    assert factory_chain(env, "C-BIND-NONE") == 0

    # One whose study is still on its way is placed when the study arrives.
    case_id = "C-BIND-WAIT"
    node, role = env.hospital.node, env.hospital.node.hooks
    assert isinstance(role, HospitalRole)
    study = StudyInfo()
    ingest = Ingest(node.store, node.catalog, role.studies, node.audit, HOSPITAL, role.identities)
    for ds in ct_series(2, rows=16, cols=16, study=study):
        ingest.ingest(to_part10(ds), calling_ae="PACS", called_ae="YIGONG")
    role.studies.tick(datetime.now(UTC) + timedelta(seconds=1), 0.0)
    patient = PatientIdentity(PATIENT_ID, PATIENT_NAME, PATIENT_BIRTH_DATE, "HOSPITAL MRN")
    recipient = role.releaser.recipient(case_id, FACTORY, patient)  # before the vault knows it
    deid = role.releaser.deidentifier_for(recipient).map_uid(study.study_uid)
    first = from_hospital(
        env, case_id, 0, genesis_hash(case_id), "data_confirmation", data_confirmation(deid)
    )
    facts = factory.accept_remote(first)
    assert facts["case.status"] == "pending" and factory_chain(env, case_id) == 0
    clinician = node.trust.verify_pem(env.person("clinician").cert_path.read_bytes())
    role.confirm_study(clinician, study.study_uid, case_id, FACTORY)
    wait_for(lambda: factory_chain(env, case_id) == 1, 30, what="the waiting record placed")
    head = facts["case.record_hash"]

    # An order whose pseudonym is not the one the received instances carry is refused.
    wrong = from_hospital(env, case_id, 1, head, "order", order(pseudonym="YG-000000000000"))
    facts = factory.accept_remote(wrong)
    assert facts["case.status"] == "refused"
    assert (
        f"data.patient.pseudonym is not the pseudonym the studies received for case {case_id} carry"
    ) in facts["case.error"]
    pseudonym = role.vault.issued_pseudonym(case_id, FACTORY)
    assert pseudonym is not None
    right = from_hospital(env, case_id, 1, head, "order", order(pseudonym=pseudonym))
    assert factory.accept_remote(right)["case.status"] == "appended"
    assert factory_chain(env, case_id) == 2


# --- design confirmation (§5.3.6.3) -------------------------------------------------------------


def test_design_confirmation_must_name_a_design_whose_files_this_node_received(env: Env) -> None:
    case_id = "C-BIND-DESIGN"
    advance(env, case_id, "design_output")
    model = env.upload(case_id, to=())  # at the factory only: not sent to the hospital yet
    view = env.sign("engineer", case_id, "design_output", design(model))
    design_hash = last_hash(view)
    env.synced(case_id)
    with pytest.raises(ValidationError) as err:
        env.sign("clinician", case_id, "design_confirmation", confirm("clinical", design_hash))
    assert (
        f"case {case_id}: design_confirmation refused on node {HOSPITAL}: data.design_hash "
        f"names a design whose file 0 (object {model[:16]}…) node {HOSPITAL} has not received "
        "for this case"
    ) in str(err.value)
    with pytest.raises(ValidationError, match=r"data.design_hash: it confirms design"):
        env.sign("clinician", case_id, "design_confirmation", confirm("clinical", "cd" * 32))
    assert env.upload(case_id) == model  # now sent to the hospital as well
    view = env.sign("clinician", case_id, "design_confirmation", confirm("clinical", design_hash))
    env.synced(case_id)
    view = env.sign("engineer", case_id, "design_confirmation", confirm("production", design_hash))
    assert view.stage == "production"
    env.synced(case_id)


# --- production record (§6.2), delivery list (§7.1), acceptance (§9) ----------------------------


def test_production_record_must_name_the_confirmed_design(env: Env) -> None:
    case_id = "C-BIND-PROD"
    out = advance(env, case_id, "production")
    with pytest.raises(ValidationError) as err:
        env.sign("engineer", case_id, "production_record", production("ab" * 32))
    assert (
        f"cannot record production_record: data.design_hash: it names a design other than "
        f"the confirmed one ({out['design'][:16]}…)"
    ) in str(err.value)
    view = env.sign("engineer", case_id, "production_record", production(out["design"]))
    assert view.stage == "delivery_list"
    env.synced(case_id)


def test_delivery_list_must_name_the_batch_of_the_production_record(env: Env) -> None:
    case_id = "C-BIND-DELIVERY"
    advance(env, case_id, "delivery_list")
    with pytest.raises(ValidationError) as err:
        env.sign("engineer", case_id, "delivery_list", delivery(batch="B-OTHER"))
    assert (
        "cannot record delivery_list: data.batch_number: its batch number is not the one of "
        "the production record"
    ) in str(err.value)
    view = env.sign("engineer", case_id, "delivery_list", delivery())
    assert view.stage == "data_delivery"
    env.synced(case_id)


def test_acceptance_must_name_the_delivered_unique_device_identifier(env: Env) -> None:
    case_id = "C-BIND-ACCEPT"
    advance(env, case_id, "acceptance")
    with pytest.raises(ValidationError) as err:
        env.sign("clinician", case_id, "acceptance", acceptance(udi="(01)0690000000000(21)X"))
    assert (
        "cannot record acceptance: data.udi: its UDI is not the one of the delivery list"
    ) in str(err.value)
    view = env.sign("clinician", case_id, "acceptance", acceptance())
    assert view.stage == "follow_up"
    env.synced(case_id)


def test_design_confirmation_arriving_before_the_design_files_waits_for_them(env: Env) -> None:
    """The engineer's production confirmation reaches the hospital before the design's
    file: the hospital holds the record back until the file arrives, then places it."""
    case_id = "C-BIND-DESIGN-WAIT"
    advance(env, case_id, "design_output")
    model = env.upload(case_id, to=())  # at the factory only, for now
    design_hash = last_hash(env.sign("engineer", case_id, "design_output", design(model)))
    env.synced(case_id)
    env.sign("engineer", case_id, "design_confirmation", confirm("production", design_hash))
    factory_length = factory_chain(env, case_id)
    pending = env.hospital.cases.cases.pending
    wait_for(lambda: pending(case_id), 30, what="the confirmation waiting at the hospital")
    assert len(env.hospital.cases.cases.records(case_id)) == factory_length - 1
    env.upload(case_id)  # the file reaches the hospital: the waiting record is placed
    assert env.synced(case_id) == factory_length
    assert pending(case_id) == []
    view = env.sign("clinician", case_id, "design_confirmation", confirm("clinical", design_hash))
    assert view.stage == "production"
