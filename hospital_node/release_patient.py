"""The one-patient rule of a release, checked before anything leaves.

Every instance of a confirmed study must belong to the case's one patient (Patient ID
+ Issuer of Patient ID, :meth:`PatientIdentity.same_patient`). The pipelined release
sends the first instances while later ones are still being de-identified, so the rule
is checked first, for the whole study. Ingest keeps the identity of a study's *first*
instance only (:mod:`hospital_node.study_identity`, without the Issuer), so the rule
cannot be read from what ingest recorded; it is read here from the head of each
object instead: the first :data:`HEAD_BYTES` (the file meta and the groups up to the
Patient module; pixel data is never touched), parsed until the first element after
group 0010. An object whose Patient module does not end inside its head (a very long
group 0008) is read whole. The release then reads each object once more, whole, to
de-identify it, and its worker re-derives the patient from those bytes: an instance
whose patient differs from the study's is not released.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence

from pydicom.dataset import Dataset
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from gateway.errors import StudyNotReady, ValidationError
from gateway.storage import ObjectStore
from hospital_node.studies import InstanceRecord
from hospital_node.vault import PatientIdentity, patient_of

log = logging.getLogger(__name__)

HEAD_BYTES = 16 * 1024
_PATIENT_GROUP_END = 0x0010FFFF
_TAGS = [0x00080005, 0x00100010, 0x00100020, 0x00100021, 0x00100030]


def _identity(ds: Dataset) -> PatientIdentity:
    return PatientIdentity(
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        patient_name=str(ds.get("PatientName", "") or "").strip(),
        birth_date=str(ds.get("PatientBirthDate", "") or "").strip(),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or "").strip(),
    )


def patient_from_head(head: bytes) -> PatientIdentity | None:
    """The patient of a Part-10 object from its first bytes, or None when they do not
    hold the whole Patient module (or cannot be parsed: the caller reads it whole)."""
    passed = False

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        nonlocal passed
        if tag > _PATIENT_GROUP_END:
            passed = True
        return passed

    try:
        ds = read_partial(io.BytesIO(head), stop_when=stop, specific_tags=list(_TAGS))
        identity = _identity(ds)
    except Exception:
        return None
    return identity if passed else None


def file_patient(path: str) -> PatientIdentity:
    """The patient of a Part-10 file (head first, like :func:`instance_patient`)."""
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
        found = patient_from_head(head)
        if found is not None:
            return found
        return patient_of(head + fh.read())


def instance_patient(store: ObjectStore, inst: InstanceRecord) -> PatientIdentity:
    """The patient of one stored instance, reading as little of it as will do."""
    with store.open_read(inst.object_id, 0, HEAD_BYTES) as chunks:
        head = next(chunks, b"")
    found = patient_from_head(head)
    if found is not None:
        return found
    if len(head) < inst.size:
        with store.open_read(inst.object_id) as chunks:
            head = b"".join(chunks)
    return patient_of(head)


def study_patient(
    store: ObjectStore,
    study_uid: str,
    instances: Sequence[InstanceRecord],
    found: Sequence[PatientIdentity | str] | None = None,
) -> PatientIdentity:
    """The one patient of ``instances``; StudyNotReady if they are of more than one.

    ``found``: each instance's patient (or why it could not be read) as the release's
    workers read them; else they are read here."""
    patient: PatientIdentity | None = None
    for n, inst in enumerate(instances):
        try:
            if found is None:
                who = instance_patient(store, inst)
            elif isinstance(found[n], str):
                raise ValidationError(str(found[n]))
            else:
                who = found[n]  # type: ignore[assignment]
        except ValidationError as exc:
            raise StudyNotReady(
                f"instance {inst.sop_instance_uid} of study {study_uid} (object "
                f"{inst.object_id[:16]}) cannot be read for its patient ({exc}); nothing was "
                "sent. Have the study sent again from the PACS"
            ) from exc
        if patient is None:
            patient = who
        elif not patient.same_patient(who):
            raise StudyNotReady(
                f"the instances of study {study_uid} belong to more than one patient "
                "(different Patient ID / Issuer); nothing was sent. Have the study "
                "corrected in the PACS and sent again"
            )
    if patient is None:
        raise StudyNotReady(f"study {study_uid} has no instances to send")
    return patient
