"""Whom a received study is of: the identity a clinician needs before releasing it.

Two studies of two patients pushed in the same hour cannot be told apart by UIDs,
counts and geometry; a clinician who confirms an irreversible release (standard
§4.5) must see the patient. This module keeps, per Study Instance UID, the
identifying attributes of the *first* instance received (table
``hospital_study_identity`` in the hospital's catalog):

Patient's Name, Patient ID, Birth Date, Sex, Age, Accession Number, Study Date and
Time, Study Description and Referring Physician's Name (the modalities come from
the instance rows).

The row is encrypted at rest like the pseudonym vault (AES-256-GCM with a sub-key
derived by HKDF-SHA256 from the vault key, random 96-bit nonce, the Study Instance
UID as associated data so a row cannot be moved to another study). The plaintext
never touches disk, a log line or an audit entry; it is read only for the views of
the hospital's own clinicians and the node itself (:data:`gateway.authz.IDENTITY_VIEWERS`),
and every such view is audited with the study's UID — never a value.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from gateway.catalog import Catalog, utcnow
from hospital_node.sealed import RowSeal

log = logging.getLogger(__name__)

NAMESPACE = "hospital_study_identity"
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hospital_study_identity (
        study_uid   TEXT PRIMARY KEY,
        nonce       BLOB NOT NULL,
        ciphertext  BLOB NOT NULL,
        recorded_at TEXT NOT NULL
    )
    """,
)
_KEY_LABEL = b"yigong.study-identity.encryption.v1"
_AAD_LABEL = b"yigong.study-identity.row.v1\x00"
_KEYWORDS = {  # field -> DICOM keyword of the attribute it is read from
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "birth_date": "PatientBirthDate",
    "sex": "PatientSex",
    "age": "PatientAge",
    "accession_number": "AccessionNumber",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "study_description": "StudyDescription",
    "referring_physician": "ReferringPhysicianName",
}
MAX_CHARS = 200
_SOURCE_TAGS = (
    0x00080005,  # Specific Character Set: how the names are encoded
    0x00080020, 0x00080030, 0x00080050, 0x00080090, 0x00081030,
    0x00100010, 0x00100020, 0x00100030, 0x00100040, 0x00101010,
)  # fmt: skip


@dataclass(frozen=True, repr=False)
class StudyIdentity:
    """The patient and study a received study is of. Never log, audit or send one."""

    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    sex: str = ""
    age: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring_physician: str = ""

    def __repr__(self) -> str:  # keep values out of tracebacks and debug output
        return "StudyIdentity(<withheld>)"

    def to_bytes(self) -> bytes:
        return json.dumps(
            asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> StudyIdentity:
        raw = json.loads(data.decode("utf-8"))
        return cls(**{f.name: str(raw.get(f.name, "")) for f in fields(cls)})


IdentitySource = Mapping[Any, Any]
"""The identity attributes of an instance, undecoded: tag -> (Raw)DataElement."""


def identity_source(elements: Dataset | Mapping[Any, Any]) -> IdentitySource:
    """The identity attributes of an instance *undecoded* (a few small raw elements, from a
    data set or its raw element dict): taken for every instance at ingest (microseconds),
    decoded (:func:`identity_of`) only for a study's first."""
    if not isinstance(elements, Dataset):
        return {tag: elements[tag] for tag in _SOURCE_TAGS if tag in elements}
    out: dict[int, Any] = {}
    for tag in _SOURCE_TAGS:
        try:
            elem = elements.get_item(tag)
        except Exception:  # an odd element: left out, shown as absent
            continue
        if elem is not None:
            out[tag] = elem
    return out


def identity_of(source: Dataset | IdentitySource) -> StudyIdentity:
    """The identity attributes of a data set or an :func:`identity_source`; an attribute
    that is absent or cannot be decoded is empty (ingest never fails on it)."""
    ds = source if isinstance(source, Dataset) else Dataset({Tag(t): e for t, e in source.items()})
    values: dict[str, str] = {}
    for name, keyword in _KEYWORDS.items():
        try:
            value = ds.get(keyword, "")
            text = "" if value is None else str(value)
        except Exception:  # an undecodable value is shown as absent, never refused here
            text = ""
        values[name] = text.replace("\x00", "").strip()[:MAX_CHARS]
    return StudyIdentity(**values)


class StudyIdentities:
    """Encrypted Study Instance UID → :class:`StudyIdentity` in the node's catalog."""

    def __init__(self, catalog: Catalog, vault_key: bytes) -> None:
        self._seal = RowSeal(vault_key, _KEY_LABEL, _AAD_LABEL)
        self.catalog = catalog
        catalog.extend(NAMESPACE, MIGRATIONS)
        self._known: set[str] = set()  # studies with a row: skip the insert (ingest path)

    def __repr__(self) -> str:
        return "StudyIdentities(<key withheld>)"

    def record(self, study_uid: str, source: IdentitySource | StudyIdentity | None) -> None:
        """Keep the identity in ``source`` (:func:`identity_source` of an instance, or an
        identity) for ``study_uid`` unless one is kept already (the first instance received
        speaks for the study)."""
        if source is None or study_uid in self._known:
            return
        identity = source if isinstance(source, StudyIdentity) else identity_of(source)
        nonce, ciphertext = self._seal.seal(_row_id(study_uid), identity.to_bytes())
        with self.catalog.transaction() as db:
            db.execute(
                "INSERT INTO hospital_study_identity VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (study_uid, nonce, ciphertext, utcnow()),
            )
        self._known.add(study_uid)

    def get(self, study_uid: str) -> StudyIdentity | None:
        return self.many([study_uid]).get(study_uid)

    def many(self, study_uids: Iterable[str]) -> dict[str, StudyIdentity]:
        """The identities kept for ``study_uids`` (studies without one are left out)."""
        uids = sorted(set(study_uids))
        found: dict[str, StudyIdentity] = {}
        for start in range(0, len(uids), 500):
            part = uids[start : start + 500]
            rows = self.catalog.query(
                "SELECT study_uid, nonce, ciphertext FROM hospital_study_identity"
                f" WHERE study_uid IN ({','.join('?' * len(part))})",
                tuple(part),
            )
            for r in rows:
                uid = str(r["study_uid"])
                found[uid] = self._decrypt(uid, bytes(r["nonce"]), bytes(r["ciphertext"]))
        return found

    def _decrypt(self, study_uid: str, nonce: bytes, ciphertext: bytes) -> StudyIdentity:
        plain = self._seal.open(
            _row_id(study_uid), nonce, ciphertext, f"the identity row of study {study_uid}"
        )
        return StudyIdentity.from_bytes(plain)


def _row_id(study_uid: str) -> bytes:
    return study_uid.encode("ascii", "replace")
