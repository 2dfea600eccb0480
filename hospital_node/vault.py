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

Pseudonyms are per patient and destination. What one destination (manufacturer)
receives about one patient is de-identified under one :class:`Recipient`: the pseudonym
``"YG-"`` + the first 12 hex digits (upper case) of HMAC-SHA256(pseudonym key, label +
patient + destination), and a context from which the de-identifier derives that
recipient's UID-mapping and date-offset key (:meth:`Deidentifier.for_recipient`). The
patient is Patient ID + Issuer of Patient ID as stored in the vault (the same key
:meth:`PatientIdentity.same_patient` compares; names and birth dates get corrected and
do not count). So two cases of one patient sent to one manufacturer carry the same
pseudonym, the same date offset and the same UID mapping; the same patient sent to two
manufacturers shares nothing between them. The pseudonym is deterministic, unlinkable
to the patient without the key, and valid as Patient's Name / Patient ID.

Table ``hospital_vault_recipients`` records, per (case, destination), the pseudonym
used and its scheme. A case released to a destination before this scheme existed (a
confirmation recorded, no recipient row) keeps the per-case pseudonym it was released
under (scheme ``case-v0``: ``"YG-"`` + 12 hex of HMAC(pseudonym key, case id), still in
the ``pseudonym`` column of ``hospital_vault``) and the node-wide UID/date key, so
existing releases, receipts and resends stay consistent; nothing is rewritten.
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

from pydicom import dcmread

from gateway.catalog import Catalog, utcnow
from gateway.errors import ConfigError, NotFound, ValidationError
from hospital_node.sealed import RowSeal, derive_key

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
    """
    CREATE TABLE hospital_vault_recipients (
        case_id     TEXT NOT NULL,
        destination TEXT NOT NULL,
        pseudonym   TEXT NOT NULL,
        scheme      TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        PRIMARY KEY (case_id, destination)
    )
    """,
)
SCHEME_PATIENT_DESTINATION = "patient-destination-v1"
SCHEME_CASE = "case-v0"
_RECIPIENT_LABEL = b"yigong.vault.recipient-pseudonym.v1\x00"


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


@dataclass(frozen=True, repr=False)
class Recipient:
    """Everything one destination receives about one patient is de-identified with this.

    ``context`` (None for the legacy per-case scheme: the node-wide key) holds the
    patient's identifiers: it is only ever an HMAC input, never stored, logged or sent.
    """

    pseudonym: str
    scheme: str
    context: bytes | None

    def __repr__(self) -> str:
        return f"Recipient({self.pseudonym}, {self.scheme})"


def patient_context(patient: PatientIdentity, destination: str) -> bytes:
    """The (patient, destination) key material: Issuer + Patient ID + destination node id."""
    return json.dumps(
        ["yigong.patient-destination.v1", patient.issuer_of_patient_id, patient.patient_id,
         destination],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")  # fmt: skip


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


class PseudonymVault:
    """Encrypted case ↔ patient map in the node's catalog."""

    def __init__(self, catalog: Catalog, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"the vault key must be {KEY_BYTES} bytes")
        self.catalog = catalog
        self._seal = RowSeal(key, b"yigong.vault.encryption.v1", _AAD_LABEL)
        self._pseudonym_key = derive_key(key, b"yigong.vault.pseudonym.v1")
        catalog.extend("hospital_vault", MIGRATIONS)

    def __repr__(self) -> str:
        return "PseudonymVault(<key withheld>)"

    def case_pseudonym(self, case_id: str) -> str:
        """The legacy per-case pseudonym (scheme ``case-v0``): ``YG-`` + 12 hex of a keyed
        HMAC of the case id. Releases made before per-patient pseudonyms carry it."""
        check_case_id(case_id)
        digest = hmac.new(self._pseudonym_key, case_id.encode("utf-8"), hashlib.sha256)
        return PSEUDONYM_PREFIX + digest.hexdigest()[:12].upper()

    def recipient_for(self, patient: PatientIdentity, destination: str) -> Recipient:
        """The recipient of ``patient`` at ``destination`` (computed, nothing stored)."""
        context = patient_context(patient, destination)
        digest = hmac.new(self._pseudonym_key, _RECIPIENT_LABEL + context, hashlib.sha256)
        pseudonym = PSEUDONYM_PREFIX + digest.hexdigest()[:12].upper()
        return Recipient(pseudonym, SCHEME_PATIENT_DESTINATION, context)

    def recipient(self, case_id: str, destination: str) -> Recipient | None:
        """The recipient recorded for ``case_id`` at ``destination`` (None: none yet)."""
        rows = self.catalog.query(
            "SELECT pseudonym, scheme FROM hospital_vault_recipients"
            " WHERE case_id = ? AND destination = ?",
            (case_id, destination),
        )
        if not rows:
            return None
        pseudonym, scheme = str(rows[0][0]), str(rows[0][1])
        if scheme == SCHEME_CASE:
            return Recipient(pseudonym, scheme, None)
        found = self.recipient_for(self.lookup(case_id), destination)
        if found.pseudonym != pseudonym:
            raise ConfigError(
                f"vault entry of case {case_id} for {destination} does not match its patient "
                "under this node's vault key (wrong deid.vault_key_file, or the row was altered)"
            )
        return found

    def bind(self, case_id: str, destination: str, recipient: Recipient) -> None:
        """Record that ``case_id`` goes to ``destination`` as ``recipient`` (first one wins;
        the case must already be stored)."""
        with self.catalog.transaction() as db:
            db.execute(
                "INSERT INTO hospital_vault_recipients VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(case_id, destination) DO NOTHING",
                (case_id, destination, recipient.pseudonym, recipient.scheme, utcnow()),
            )

    def pseudonym(self, case_id: str, destination: str | None = None) -> str:
        """The pseudonym under which ``case_id`` was released (to ``destination``).

        With a destination: the recorded recipient's pseudonym, else (nothing released
        under the per-patient scheme) the legacy per-case one. Without: the one pseudonym
        recorded for the case (a case goes to its manufacturer); the legacy per-case one
        when none is recorded; ValidationError when its destinations have different ones.
        """
        check_case_id(case_id)
        if destination is not None:
            found = self.catalog.query(
                "SELECT pseudonym FROM hospital_vault_recipients"
                " WHERE case_id = ? AND destination = ?",
                (case_id, destination),
            )
        else:
            found = self.catalog.query(
                "SELECT DISTINCT pseudonym FROM hospital_vault_recipients WHERE case_id = ?",
                (case_id,),
            )
        if not found:
            return self.case_pseudonym(case_id)
        if len(found) > 1:
            raise ValidationError(
                f"case {case_id} was released to several destinations, each under its own "
                "pseudonym; name the destination"
            )
        return str(found[0][0])

    def derived_case_id(self, study_uid: str) -> str:
        """Case id of a study released without a clinician (auto-forward): ``AUTO-`` + 16
        upper-case hex of a keyed HMAC of the Study Instance UID (unlinkable without the key).
        """
        label = b"yigong.vault.auto-case.v1\x00" + study_uid.encode("ascii", "replace")
        digest = hmac.new(self._pseudonym_key, label, hashlib.sha256).hexdigest()
        return "AUTO-" + digest[:16].upper()

    def store(self, case_id: str, patient: PatientIdentity) -> str:
        """Bind ``case_id`` to ``patient`` (idempotent); returns the legacy case pseudonym
        (kept in the row: it keeps the row unique, and older releases carry it).

        A case belongs to one patient: binding it to another Patient ID raises
        ValidationError (the message names the case, never the patients).
        """
        pseudonym = self.case_pseudonym(case_id)
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
            nonce, ciphertext = self._seal.seal(case_id.encode("utf-8"), patient.to_bytes())
            db.execute(
                "INSERT INTO hospital_vault VALUES (?, ?, ?, ?, ?)",
                (case_id, pseudonym, nonce, ciphertext, utcnow()),
            )
        log.info("vault: case %s stored", case_id)
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
        """The (first) case id and the patient behind ``pseudonym`` (NotFound when unknown).

        A per-patient pseudonym may name several cases of one patient: the earliest
        bound is returned (the patient is the same for all of them).
        """
        rows = self.catalog.query(
            "SELECT case_id FROM hospital_vault_recipients WHERE pseudonym = ?"
            " ORDER BY created_at, case_id LIMIT 1",
            (pseudonym,),
        ) or self.catalog.query(
            "SELECT case_id FROM hospital_vault WHERE pseudonym = ?", (pseudonym,)
        )
        if not rows:
            raise NotFound(f"pseudonym {pseudonym[:40]!r} is not in the vault of this node")
        case_id = str(rows[0][0])
        return case_id, self.lookup(case_id)

    def issued_pseudonym(self, case_id: str, destination: str) -> str | None:
        """The pseudonym this vault issued for ``case_id`` at ``destination`` (None: the
        vault holds no patient for the case): what the case's order must name and what the
        instances released to that manufacturer carry."""
        if not self.has_case(case_id):
            return None
        return self.pseudonym(case_id, destination)

    def has_case(self, case_id: str) -> bool:
        return bool(
            self.catalog.query("SELECT 1 FROM hospital_vault WHERE case_id = ?", (case_id,))
        )

    def _decrypt(self, case_id: str, nonce: bytes, ciphertext: bytes) -> PatientIdentity:
        plain = self._seal.open(
            case_id.encode("utf-8"), nonce, ciphertext, f"vault entry of case {case_id}"
        )
        return PatientIdentity.from_bytes(plain)
