"""The pseudonym vault of the hospital node: case id / pseudonym ↔ the real patient.

What it holds: for each case, the patient's Patient ID, Patient's Name, Birth Date and
Issuer of Patient ID, read from the original instance when a clinician confirms a study
for the case. The row (table ``hospital_vault`` in the node's catalog) stores the case
id, the pseudonym and an AES-256-GCM ciphertext of the identity; the plaintext never
touches disk, a log line or an audit entry, and nothing in the vault is ever sent.

Keys (two separate 32-byte secrets, files created with mode 0600 on first start; a file
readable by group or others refuses the start):

- ``deid.key_file``: the de-identification key (UID mapping, date shift), used by
  :class:`hospital_node.deid.Deidentifier`;
- ``deid.vault_key_file``: the vault key. Two sub-keys are derived from it with
  HKDF-SHA256, one encrypts the vault rows (AES-GCM, random 96-bit nonce, the case id as
  associated data so a row cannot be moved to another case), one makes pseudonyms.

The pseudonym of a case is ``"YG-"`` + the first 12 hex digits (upper case) of
HMAC-SHA256(pseudonym key, case id): deterministic, unlinkable to the patient without
the key, and valid as Patient's Name / Patient ID of the de-identified instances.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydicom import dcmread

from gateway.catalog import Catalog, utcnow
from gateway.errors import ConfigError, NotFound, ValidationError

log = logging.getLogger(__name__)

KEY_BYTES = 32
PSEUDONYM_PREFIX = "YG-"
_CASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_AAD_LABEL = b"yigong.vault.row.v1\x00"
_PATIENT_TAGS = [0x00080005, 0x00100010, 0x00100020, 0x00100021, 0x00100030]  # + charset

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE hospital_vault (
        case_id    TEXT PRIMARY KEY,
        pseudonym  TEXT NOT NULL UNIQUE,
        nonce      BLOB NOT NULL,
        ciphertext BLOB NOT NULL,
        created_at TEXT NOT NULL
    )
    """,
)


def check_case_id(case_id: str) -> str:
    """Raise ValidationError unless ``case_id`` is 1-64 of [A-Za-z0-9._-]."""
    if not isinstance(case_id, str) or not _CASE_RE.fullmatch(case_id):
        raise ValidationError(
            f"case id {str(case_id)[:80]!r} must be 1-64 characters of A-Z, a-z, 0-9, '.', "
            "'_' or '-' starting with a letter or digit (and must not contain patient data)"
        )
    return case_id


def load_or_create_key(path: Path, what: str) -> bytes:
    """The 32-byte secret in ``path``; created (mode 0600) when the file does not exist.

    Refuses (ConfigError) a key file that group or others may access, that is not a
    regular file, or that does not hold exactly 32 bytes.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            pass  # created concurrently: read it below
        except OSError as exc:
            raise ConfigError(f"cannot create the {what} file {path}: {exc.strerror}") from exc
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            log.info("created a new %s in %s (mode 0600)", what, path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"the {what} file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"refusing to start: the {what} file {path} has mode "
            f"{stat.S_IMODE(st.st_mode):04o}, so group or others can read it; "
            f"run 'chmod 600 {path}' (and consider the key exposed)"
        )
    data = path.read_bytes()
    if len(data) != KEY_BYTES:
        raise ConfigError(
            f"the {what} file {path} holds {len(data)} bytes, not {KEY_BYTES}; restore it "
            "from backup (a new key cannot read what the old one wrote)"
        )
    return data


@dataclass(frozen=True, repr=False)
class PatientIdentity:
    """The real patient behind a case. Never log, audit or send one of these."""

    patient_id: str
    patient_name: str
    birth_date: str
    issuer_of_patient_id: str

    def __repr__(self) -> str:  # keep values out of tracebacks and debug output
        return "PatientIdentity(<withheld>)"

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "patient_id": self.patient_id,
                "patient_name": self.patient_name,
                "birth_date": self.birth_date,
                "issuer_of_patient_id": self.issuer_of_patient_id,
            },
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> PatientIdentity:
        raw = json.loads(data.decode("utf-8"))
        return cls(
            patient_id=str(raw["patient_id"]),
            patient_name=str(raw["patient_name"]),
            birth_date=str(raw["birth_date"]),
            issuer_of_patient_id=str(raw["issuer_of_patient_id"]),
        )

    def same_patient(self, other: PatientIdentity) -> bool:
        """Same Patient ID within the same issuer (names and dates get corrected)."""
        return (self.patient_id, self.issuer_of_patient_id) == (
            other.patient_id,
            other.issuer_of_patient_id,
        )


def patient_of(data: bytes) -> PatientIdentity:
    """Patient ID, Name, Birth Date and Issuer of Patient ID of a Part-10 instance."""
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_PATIENT_TAGS)
    except Exception as exc:
        raise ValidationError(f"not a readable DICOM instance: {type(exc).__name__}") from exc
    return PatientIdentity(
        patient_id=str(ds.get("PatientID", "") or "").strip(),
        patient_name=str(ds.get("PatientName", "") or "").strip(),
        birth_date=str(ds.get("PatientBirthDate", "") or "").strip(),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or "").strip(),
    )


def _derive(key: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(key)


class PseudonymVault:
    """Encrypted case ↔ patient map in the node's catalog."""

    def __init__(self, catalog: Catalog, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"the vault key must be {KEY_BYTES} bytes")
        self.catalog = catalog
        self._aead = AESGCM(_derive(key, b"yigong.vault.encryption.v1"))
        self._pseudonym_key = _derive(key, b"yigong.vault.pseudonym.v1")
        catalog.extend("hospital_vault", MIGRATIONS)

    def __repr__(self) -> str:
        return "PseudonymVault(<key withheld>)"

    def pseudonym(self, case_id: str) -> str:
        """The case's pseudonym: ``YG-`` + 12 upper-case hex digits of a keyed HMAC."""
        check_case_id(case_id)
        digest = hmac.new(self._pseudonym_key, case_id.encode("utf-8"), hashlib.sha256)
        return PSEUDONYM_PREFIX + digest.hexdigest()[:12].upper()

    def derived_case_id(self, study_uid: str) -> str:
        """Case id of a study released without a clinician (auto-forward): ``AUTO-`` + 16
        upper-case hex of a keyed HMAC of the Study Instance UID (unlinkable without the key).
        """
        label = b"yigong.vault.auto-case.v1\x00" + study_uid.encode("ascii", "replace")
        digest = hmac.new(self._pseudonym_key, label, hashlib.sha256).hexdigest()
        return "AUTO-" + digest[:16].upper()

    def store(self, case_id: str, patient: PatientIdentity) -> str:
        """Bind ``case_id`` to ``patient`` (idempotent); returns the pseudonym.

        A case belongs to one patient: binding it to another Patient ID raises
        ValidationError (the message names the case, never the patients).
        """
        pseudonym = self.pseudonym(case_id)
        with self.catalog.transaction() as db:
            row = db.execute(
                "SELECT nonce, ciphertext FROM hospital_vault WHERE case_id = ?", (case_id,)
            ).fetchone()
            if row is not None:
                known = self._decrypt(case_id, bytes(row[0]), bytes(row[1]))
                if not known.same_patient(patient):
                    raise ValidationError(
                        f"case {case_id} already belongs to another patient; a case ties one "
                        "patient's device together: use a new case id for this patient"
                    )
                return pseudonym
            nonce = os.urandom(12)
            ciphertext = self._aead.encrypt(nonce, patient.to_bytes(), self._aad(case_id))
            db.execute(
                "INSERT INTO hospital_vault VALUES (?, ?, ?, ?, ?)",
                (case_id, pseudonym, nonce, ciphertext, utcnow()),
            )
        log.info("vault: case %s bound to pseudonym %s", case_id, pseudonym)
        return pseudonym

    def lookup(self, case_id: str) -> PatientIdentity:
        """The patient of ``case_id`` (NotFound when the case has no vault entry)."""
        rows = self.catalog.query(
            "SELECT nonce, ciphertext FROM hospital_vault WHERE case_id = ?", (case_id,)
        )
        if not rows:
            raise NotFound(f"case {case_id} has no entry in the pseudonym vault of this node")
        return self._decrypt(case_id, bytes(rows[0][0]), bytes(rows[0][1]))

    def lookup_pseudonym(self, pseudonym: str) -> tuple[str, PatientIdentity]:
        """The case id and patient behind ``pseudonym`` (NotFound when unknown)."""
        rows = self.catalog.query(
            "SELECT case_id FROM hospital_vault WHERE pseudonym = ?", (pseudonym,)
        )
        if not rows:
            raise NotFound(f"pseudonym {pseudonym[:40]!r} is not in the vault of this node")
        case_id = str(rows[0][0])
        return case_id, self.lookup(case_id)

    def case_pseudonym(self, case_id: str) -> str | None:
        """The pseudonym this vault issued for ``case_id`` (None: it issued none): what the
        case's order must name and what the released instances carry."""
        rows = self.catalog.query(
            "SELECT pseudonym FROM hospital_vault WHERE case_id = ?", (case_id,)
        )
        return str(rows[0][0]) if rows else None

    def has_case(self, case_id: str) -> bool:
        return bool(
            self.catalog.query("SELECT 1 FROM hospital_vault WHERE case_id = ?", (case_id,))
        )

    def _aad(self, case_id: str) -> bytes:
        return _AAD_LABEL + case_id.encode("utf-8")

    def _decrypt(self, case_id: str, nonce: bytes, ciphertext: bytes) -> PatientIdentity:
        try:
            plain = self._aead.decrypt(nonce, ciphertext, self._aad(case_id))
        except InvalidTag as exc:
            raise ConfigError(
                f"vault entry of case {case_id} does not decrypt with this node's vault key "
                "(wrong deid.vault_key_file, or the row was altered)"
            ) from exc
        return PatientIdentity.from_bytes(plain)
