"""One pseudonym, date offset and UID mapping per patient and destination (real release path).

A hospital with two manufacturers (factory-1, factory-2) over mTLS; studies enter through
the hospital's DICOM SCP as from a PACS, a clinician confirms them, and what each factory
stored is read back from its own store:

- one patient, two cases, one manufacturer: the same pseudonym and the same date offset
  (so the interval between the patient's studies is kept), consistent UIDs;
- the same patient to two manufacturers: no pseudonym, offset or UID in common;
- a case released before per-patient pseudonyms keeps its per-case scheme, and the vault
  schema migration keeps every existing row;
- a Structured Report in a study is refused with its reason, the images are released.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from gateway.catalog import Catalog
from gateway.errors import ValidationError
from hospital_node.sealed import derive_key
from hospital_node.vault import (
    MIGRATIONS,
    SCHEME_CASE,
    PatientIdentity,
    PseudonymVault,
)
from tests.cluster import Federation, InProcessNode, write_config
from tests.dicom_factory import PATIENT_ID
from tests.test_hospital_release import (
    confirm,
    hospital_stub,
    person,
    push,
    role,
    series,
    settle,
    wait_done,
)

Trio = tuple[InProcessNode, InProcessNode, InProcessNode]
DEID_KEY = bytes(range(32))  # fixed, so the two manufacturers' offsets are known to differ


@pytest.fixture
def trio(federation: Federation, tmp_path: Path) -> Iterator[Trio]:
    """A hospital (fixed de-identification key) and two manufacturers it knows as peers."""
    f1 = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    f2 = InProcessNode(write_config(federation, tmp_path, "factory-2", "factory"))
    key_file = tmp_path / "hospital-1-data" / "deid.key"
    key_file.parent.mkdir(parents=True)
    fd = os.open(key_file, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, DEID_KEY)
    os.close(fd)
    config = write_config(
        federation,
        tmp_path,
        "hospital-1",
        "hospital",
        peers={"factory-1": f1.address, "factory-2": f2.address},
    )
    hospital = InProcessNode(config)
    yield hospital, f1, f2
    hospital.stop()
    f1.stop()
    f2.stop()


def received(factory: InProcessNode, case_id: str) -> list[Dataset]:
    """The DICOM instances ``factory`` stored for ``case_id``, parsed."""
    found = []
    for obj in factory.node.catalog.list_objects(case_id=case_id):
        if obj.media_type == "application/dicom":
            data = b"".join(factory.node.store.open_read(obj.object_id))
            found.append(dcmread(io.BytesIO(data)))
    return found


def uids(datasets: list[Dataset]) -> set[str]:
    """Every UID value at any depth, well-known DICOM UIDs (transfer syntax, classes) aside."""
    found: set[str] = set()
    for ds in datasets:
        for elem in ds.iterall():
            if elem.VR == "UI" and elem.value:
                values = elem.value if isinstance(elem.value, list) else [elem.value]
                found |= {str(v) for v in values if not str(v).startswith("1.2.840.10008.")}
        found.add(str(ds.file_meta.MediaStorageSOPInstanceUID))
    return found


def day(text: str) -> date:
    return date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def offset(original: Dataset, released: list[Dataset]) -> int:
    """The date shift (days) the released copies of ``original``'s study got."""
    shifts = {(day(ds.StudyDate) - day(original.StudyDate)).days for ds in released}
    assert len(shifts) == 1
    return shifts.pop()


def release(
    hospital: InProcessNode, stub: object, study: list[Dataset], case: str, to: str
) -> None:
    reply = confirm(stub, study[0].StudyInstanceUID, case_id=case, to=to)  # type: ignore[arg-type]
    assert [r.status for i in reply.instances for r in i.releases] == ["released"] * len(study)
    wait_done(hospital, reply.transfer_ids)


def test_one_patient_two_cases_one_manufacturer_same_pseudonym_and_offset(
    trio: Trio, federation: Federation
) -> None:
    hospital, f1, _f2 = trio
    first = series(2, study_date="20240315")
    second = series(2, study_date="20240901")
    assert first[0].PatientID == second[0].PatientID == PATIENT_ID
    push(hospital, [*first, *second])
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    release(hospital, stub, first, "CASE-A", "factory-1")
    release(hospital, stub, second, "CASE-B", "factory-1")

    got_a, got_b = received(f1, "CASE-A"), received(f1, "CASE-B")
    assert len(got_a) == len(got_b) == 2
    names = {str(ds.PatientName) for ds in got_a + got_b}
    ids = {str(ds.PatientID) for ds in got_a + got_b}
    assert len(names) == 1 and names == ids
    vault = role(hospital).vault
    assert names == {vault.pseudonym("CASE-A")} == {vault.pseudonym("CASE-B")}
    # the same offset: the interval between the patient's two studies is kept
    assert offset(first[0], got_a) == offset(second[0], got_b)
    assert day(got_b[0].StudyDate) - day(got_a[0].StudyDate) == day("20240901") - day("20240315")
    # and the UID mapping is the one of this patient at this manufacturer
    releaser = role(hospital).releaser
    for original, copies in ((first, got_a), (second, got_b)):
        mapped = releaser.map_uid_for("CASE-A", "factory-1", original[0].StudyInstanceUID)
        assert {str(ds.StudyInstanceUID) for ds in copies} == {mapped}
        assert mapped == releaser.map_uid_for("CASE-B", "factory-1", original[0].StudyInstanceUID)


def test_same_patient_two_manufacturers_nothing_in_common(
    trio: Trio, federation: Federation
) -> None:
    hospital, f1, f2 = trio
    study = series(3, study_date="20240315")
    push(hospital, study)
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    release(hospital, stub, study, "CASE-A", "factory-1")
    release(hospital, stub, study, "CASE-A", "factory-2")
    release(hospital, stub, study, "CASE-Z", "factory-2")  # the patient's other case there

    got1, got2 = received(f1, "CASE-A"), received(f2, "CASE-A")
    assert len(got1) == len(got2) == 3
    pseudonyms1 = {str(ds.PatientName) for ds in got1} | {str(ds.PatientID) for ds in got1}
    pseudonyms2 = {str(ds.PatientName) for ds in got2} | {str(ds.PatientID) for ds in got2}
    assert len(pseudonyms1) == len(pseudonyms2) == 1 and not pseudonyms1 & pseudonyms2
    assert len(uids(got1)) >= 6 and not uids(got1) & uids(got2)  # not one UID in common
    assert offset(study[0], got1) != offset(study[0], got2)
    original_uids = uids([s for s in study])
    assert not original_uids & (uids(got1) | uids(got2))

    vault = role(hospital).vault
    assert vault.pseudonym("CASE-A", "factory-1") == pseudonyms1.pop()
    assert vault.pseudonym("CASE-A", "factory-2") == pseudonyms2.pop()
    assert vault.pseudonym("CASE-Z") == vault.pseudonym("CASE-A", "factory-2")
    with pytest.raises(ValidationError, match=r"several destinations.*name the destination"):
        vault.pseudonym("CASE-A")
    # the same study under the patient's other case at factory-2: the very same objects
    ids_a = {o.object_id for o in hospital.node.catalog.list_objects(case_id="CASE-A")}
    assert all(
        r.deid_object_id in ids_a
        for c in role(hospital).release_records.confirmations_for_case("CASE-Z", "factory-2")
        for r in role(hospital).release_records.releases(c.confirmation_id)
    )


def test_case_released_before_per_patient_pseudonyms_keeps_its_scheme(
    trio: Trio, federation: Federation
) -> None:
    """A confirmation recorded without a vault recipient row (a database from before the
    migration): later studies of that case to that destination keep the per-case pseudonym
    and the node-wide key, so what the manufacturer already holds stays consistent."""
    hospital, f1, _f2 = trio
    first, second = series(1, study_date="20240315"), series(1, study_date="20240601")
    push(hospital, [*first, *second])
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    release(hospital, stub, first, "CASE-OLD", "factory-1")
    with hospital.node.catalog.transaction() as db:
        db.execute("DELETE FROM hospital_vault_recipients")  # as before the migration
    release(hospital, stub, second, "CASE-OLD", "factory-1")

    vault = role(hospital).vault
    legacy = vault.case_pseudonym("CASE-OLD")
    recipient = vault.recipient("CASE-OLD", "factory-1")
    assert recipient is not None and recipient.scheme == SCHEME_CASE
    assert recipient.pseudonym == legacy == vault.pseudonym("CASE-OLD", "factory-1")
    by_study = {str(ds.StudyInstanceUID): str(ds.PatientName) for ds in received(f1, "CASE-OLD")}
    assert len(by_study) == 2 and legacy in by_study.values()
    node_wide = role(hospital).releaser.deid
    assert any(
        str(ds.StudyInstanceUID) == node_wide.map_uid(second[0].StudyInstanceUID)
        for ds in received(f1, "CASE-OLD")
    )


def test_structured_report_is_refused_with_its_reason_and_the_images_released(
    trio: Trio, federation: Federation
) -> None:
    hospital, f1, _f2 = trio
    images = series(2)
    sr = Dataset()
    sr.file_meta = images[0].file_meta.__class__()
    for elem in images[0].file_meta:
        sr.file_meta.add(elem)
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.SOPInstanceUID = generate_uid()
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "IssuerOfPatientID",
                    "StudyDate", "PatientBirthDate"):  # fmt: skip
        if keyword in images[0]:
            setattr(sr, keyword, images[0].data_element(keyword).value)  # type: ignore[union-attr]
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.ValueType = "CONTAINER"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "fracture of the left mandible"
    sr.ContentSequence = Sequence([item])
    push(hospital, [*images, sr])
    settle(hospital)
    stub = hospital_stub(hospital, person(federation, "dr-x", "clinician"))
    reply = confirm(stub, images[0].StudyInstanceUID, case_id="CASE-SR")
    rows = {i.sop_instance_uid: r for i in reply.instances for r in i.releases}
    assert rows[sr.SOPInstanceUID].status == "failed"
    assert "(0040,A730) ContentSequence holds 1 item(s)" in rows[sr.SOPInstanceUID].reason
    assert sorted(r.status for uid, r in rows.items() if uid != sr.SOPInstanceUID) == [
        "released",
        "released",
    ]
    wait_done(hospital, reply.transfer_ids)
    assert len(received(f1, "CASE-SR")) == 2


def test_vault_schema_migration_keeps_every_existing_row(tmp_path: Path) -> None:
    """A catalog with the first vault schema (per-case pseudonyms only) gains the recipient
    table; its rows, their patients and their per-case pseudonyms are unchanged."""
    key = bytes(range(1, 33))
    path = tmp_path / "catalog.sqlite"
    old = Catalog(path)
    old.extend("hospital_vault", MIGRATIONS[:1])  # the schema before this change
    patient = PatientIdentity("MRN-1", "DOE^JANE", "19800101", "HOSPITAL MRN")
    aead = AESGCM(derive_key(key, b"yigong.vault.encryption.v1"))
    nonce = b"\x01" * 12
    legacy = "YG-" + hmac.new(
        derive_key(key, b"yigong.vault.pseudonym.v1"), b"CASE-OLD", hashlib.sha256
    ).hexdigest()[:12].upper()
    with old.transaction() as db:
        db.execute(
            "INSERT INTO hospital_vault VALUES (?, ?, ?, ?, ?)",
            ("CASE-OLD", legacy, nonce,
             aead.encrypt(nonce, patient.to_bytes(), b"yigong.vault.row.v1\x00CASE-OLD"),
             "2026-01-01T00:00:00Z"),
        )  # fmt: skip
    vault = PseudonymVault(Catalog(path), key)  # applies the second migration
    assert vault.lookup("CASE-OLD").same_patient(patient)
    assert vault.case_pseudonym("CASE-OLD") == legacy == vault.pseudonym("CASE-OLD")
    assert vault.pseudonym("CASE-OLD", "factory-1") == legacy  # nothing newer recorded
    assert vault.lookup_pseudonym(legacy)[0] == "CASE-OLD"
    assert vault.recipient("CASE-OLD", "factory-1") is None
    fresh = vault.recipient_for(patient, "factory-1")
    assert fresh.pseudonym != legacy and "MRN-1" not in repr(fresh)
    assert fresh != vault.recipient_for(patient, "factory-2")
    versions = Catalog(path).query(
        "SELECT version FROM schema_versions WHERE namespace = 'hospital_vault'"
    )
    assert [int(r[0]) for r in versions] == [len(MIGRATIONS)] == [2]
