"""The audit log's format: event types, the stored schema and its triggers, the records,
the canonical JSON and the entry hash (the log itself is documented in gateway/audit.py)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from gateway.errors import AuditError
from gateway.hashing import sha256_hex

# --- event types ----------------------------------------------------------------------------
NODE_START: Final = "node.start"
NODE_STOP: Final = "node.stop"
CONFIG_LOADED: Final = "config.loaded"
AUTH_REFUSED: Final = "auth.refused"  # certificate refused
AUTHZ_REFUSED: Final = "authz.refused"  # identity known, role not allowed
TRANSFER_QUEUED: Final = "transfer.queued"
TRANSFER_BEGUN: Final = "transfer.begun"
TRANSFER_COMPLETED: Final = "transfer.completed"
TRANSFER_FAILED: Final = "transfer.failed"
TRANSFER_RECEIVED: Final = "transfer.received"
TRANSFER_INTEGRITY_FAILED: Final = "transfer.integrity_failed"
OBJECT_STORED: Final = "object.stored"
QUERY: Final = "query"  # a listing / metadata lookup
OBJECT_DOWNLOADED: Final = "object.downloaded"
RESIDENCY_REFUSED: Final = "residency.refused"
DICOM_ASSOCIATION_ACCEPTED: Final = "dicom.association_accepted"
DICOM_ASSOCIATION_REFUSED: Final = "dicom.association_refused"
DICOM_INSTANCE_RECEIVED: Final = "dicom.instance_received"
DEID_APPLIED: Final = "deid.applied"
CASE_CONFIRMATION: Final = "case.confirmation"
CASE_RECORD: Final = "case.record"  # a signed case document (order, design, delivery, ...)
FIDELITY_RESULT: Final = "fidelity.result"
SECURITY_ALERT: Final = "security.alert"
DESIGN_EXPORTED: Final = "design.exported"  # an approved design stored in the hospital's PACS
TRANSFER_REFUSED: Final = "transfer.refused"  # a peer's Offer/Push refused, or a receipt withheld
TRANSFER_ABANDONED: Final = "transfer.abandoned"  # an inbound transfer expired; its spool deleted
TRANSFER_BATCH_OPENED: Final = "transfer.batch.opened"  # a batch (study) transfer opened
TRANSFER_BATCH_BEGUN: Final = "transfer.batch.begun"  # one send attempt of a batch
TRANSFER_BATCH_COMPLETED: Final = "transfer.batch.completed"  # manifest receipt verified
TRANSFER_BATCH_FAILED: Final = "transfer.batch.failed"  # an attempt failed or was refused
TRANSFER_BATCH_RECEIVED: Final = "transfer.batch.received"  # receiver signed the manifest

EVENT_TYPES: Final[frozenset[str]] = frozenset({
    NODE_START, NODE_STOP, CONFIG_LOADED, AUTH_REFUSED, AUTHZ_REFUSED, TRANSFER_QUEUED,
    TRANSFER_BEGUN, TRANSFER_COMPLETED, TRANSFER_FAILED, TRANSFER_RECEIVED,
    TRANSFER_INTEGRITY_FAILED, OBJECT_STORED, QUERY, OBJECT_DOWNLOADED, RESIDENCY_REFUSED,
    DICOM_ASSOCIATION_ACCEPTED, DICOM_ASSOCIATION_REFUSED, DICOM_INSTANCE_RECEIVED,
    DEID_APPLIED, CASE_CONFIRMATION, CASE_RECORD, FIDELITY_RESULT, SECURITY_ALERT,
    DESIGN_EXPORTED, TRANSFER_REFUSED, TRANSFER_ABANDONED, TRANSFER_BATCH_OPENED,
    TRANSFER_BATCH_BEGUN, TRANSFER_BATCH_COMPLETED, TRANSFER_BATCH_FAILED,
    TRANSFER_BATCH_RECEIVED,
})  # fmt: skip

OUTCOMES: Final = frozenset({"success", "failure"})
SCHEMA_VERSION: Final = 1
CHECKPOINT_FORMAT: Final = "yigong-audit-checkpoint/1"
MAX_DETAIL_KEYS: Final = 32
MAX_DETAIL_CHARS: Final = 4096
REORDER_WINDOW: Final = 1000
"""How far (in seqs) verification looks for the true position of a misplaced entry."""

Scalar = str | int | float | bool | None
Signer = Callable[[bytes], bytes]
"""Signs checkpoint bytes with the node key (ECDSA P-256 / SHA-256 in the federation)."""
Verifier = Callable[[bytes, bytes], None]
Progress = Callable[[int], None]
PROGRESS_EVERY: Final = 10_000  # entries between progress reports of a verification
"""``verify(data, signature)``; raises (e.g. BadSignature) when the signature does not verify."""

_DENIED_KEYS: Final = frozenset(
    """name fullname firstname lastname givenname familyname birthname patient patientname
    patientsname patientid patientsid otherpatientids otherpatientnames birthdate dateofbirth
    dob patientbirthdate patientsbirthdate address patientaddress patientsaddress phone
    telephone phonenumber patienttelephonenumbers mobile email idcard idnumber nationalid ssn
    mrn medicalrecordnumber insurancenumber 姓名 患者姓名 病人姓名 身份证 身份证号 出生日期 住址
    地址 电话 手机 手机号 病历号 住院号 医保号""".split()
)
"""Keys (lowercased, punctuation and ``_`` removed) that name patient data."""

_COLUMNS: Final = (
    "seq, time, event, actor, outcome, object_id, transfer_id, peer, case_id, details, "
    "prev_hash, entry_hash"
)
_HEAD_SQL: Final = "SELECT seq, entry_hash FROM events ORDER BY seq DESC LIMIT 1"
_TABLES: Final = ("events", "checkpoints", "meta")
_TRIGGERS: Final = (
    "events_append_only",
    *(f"{t}_no_{o}" for t in _TABLES for o in ("update", "delete")),
)
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, event TEXT NOT NULL, actor TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('success', 'failure')), object_id TEXT,
    transfer_id TEXT, peer TEXT, case_id TEXT, details TEXT NOT NULL,
    prev_hash TEXT NOT NULL, entry_hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE INDEX IF NOT EXISTS events_event ON events(event);
CREATE INDEX IF NOT EXISTS events_object ON events(object_id);
CREATE INDEX IF NOT EXISTS events_transfer ON events(transfer_id);
CREATE INDEX IF NOT EXISTS events_case ON events(case_id);
CREATE INDEX IF NOT EXISTS events_actor ON events(actor);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY, time TEXT NOT NULL, head_hash TEXT NOT NULL,
    signature BLOB NOT NULL);
"""
_TRIGGER_SQL: Final = "".join(
    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op} BEFORE {op.upper()} ON {table} BEGIN "
    f"SELECT RAISE(ABORT, 'audit log is append-only: {op.upper()} of {table} is not allowed'); "
    "END;\n"
    for table in _TABLES
    for op in ("update", "delete")
) + (
    "CREATE TRIGGER IF NOT EXISTS events_append_only BEFORE INSERT ON events WHEN "
    "NEW.seq IS NOT (SELECT COALESCE(MAX(seq), 0) + 1 FROM events) OR NEW.prev_hash IS NOT "
    "COALESCE((SELECT entry_hash FROM events WHERE seq = NEW.seq - 1), "
    "(SELECT value FROM meta WHERE key = 'genesis')) BEGIN "
    "SELECT RAISE(ABORT, 'audit log is append-only: a new entry must extend the chain'); END;\n"
)


_PG_TRIGGERS: Final = (*_TRIGGERS, *(f"{t}_no_truncate" for t in _TABLES))
_PG_TRIGGER_SQL: Final = (
    "CREATE OR REPLACE FUNCTION audit_refuse() RETURNS trigger LANGUAGE plpgsql "
    "SET search_path FROM CURRENT AS $$ BEGIN "
    "RAISE EXCEPTION 'audit log is append-only: % of % is not allowed', TG_OP, TG_TABLE_NAME; "
    "END $$",
    "CREATE OR REPLACE FUNCTION audit_extend() RETURNS trigger LANGUAGE plpgsql "
    "SET search_path FROM CURRENT AS $$ BEGIN "  # the log's schema, whoever's session
    "IF NEW.seq IS DISTINCT FROM (SELECT COALESCE(MAX(seq), 0) + 1 FROM events) "
    "OR NEW.prev_hash IS DISTINCT FROM COALESCE((SELECT entry_hash FROM events "
    "WHERE seq = NEW.seq - 1), (SELECT value FROM meta WHERE key = 'genesis')) THEN "
    "RAISE EXCEPTION 'audit log is append-only: a new entry must extend the chain'; "
    "END IF; RETURN NEW; END $$",
    *(
        f"CREATE OR REPLACE TRIGGER {table}_no_{op} BEFORE {op.upper()} ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION audit_refuse()"
        for table in _TABLES
        for op in ("update", "delete")
    ),
    "CREATE OR REPLACE TRIGGER events_append_only BEFORE INSERT ON events "
    "FOR EACH ROW EXECUTE FUNCTION audit_extend()",
    *(  # TRUNCATE skips row triggers: a statement trigger each
        f"CREATE OR REPLACE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse()"
        for table in _TABLES
    ),
    *(f"ALTER TABLE {table} ENABLE TRIGGER ALL" for table in _TABLES),
)
"""The same rules on PostgreSQL (``CREATE OR REPLACE``: re-run at every start, which also
restores a dropped trigger; ``ENABLE``: a disabled one counts as missing)."""


# --- pure functions: the format -------------------------------------------------------------
def canonical_json(value: Any) -> str:
    """The canonical JSON text used for ``details`` and for hashing."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def genesis_hash(node_id: str) -> str:
    """``prev_hash`` of the first entry of ``node_id``'s log."""
    return sha256_hex(f"yigong-audit-genesis:{node_id}".encode())


def entry_hash(prev_hash: str, fields: Sequence[Any]) -> str:
    """Hash of one entry; ``fields`` = [seq, time, event, actor, outcome, object_id,
    transfer_id, peer, case_id, details-json-text]."""
    return sha256_hex(f"{prev_hash}\n{canonical_json(list(fields))}".encode())


def checkpoint_signing_bytes(node_id: str, seq: int, head_hash: str) -> bytes:
    """The exact bytes a checkpoint signature covers."""
    return f"yigong-audit-checkpoint\n{node_id}\n{seq}\n{head_hash}".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fmt_time(when: datetime) -> str:
    if when.tzinfo is None:
        raise AuditError(f"audit time filter {when.isoformat()} has no time zone; pass UTC")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _safe_hash(prev_hash: object, fields: Sequence[Any]) -> str | None:
    """:func:`entry_hash` of a stored row, or None when the row holds foreign types."""
    if not isinstance(prev_hash, str):
        return None
    try:
        return entry_hash(prev_hash, fields)
    except (TypeError, ValueError):
        return None


def _check_details(details: Mapping[str, Scalar] | None) -> str:
    if details is None:
        return "{}"
    if not isinstance(details, Mapping):
        raise AuditError(f"audit details must be a mapping, not {type(details).__name__}")
    if len(details) > MAX_DETAIL_KEYS:
        raise AuditError(f"audit details have {len(details)} keys; at most {MAX_DETAIL_KEYS}")
    for key, value in details.items():
        if not isinstance(key, str) or not key:
            raise AuditError(f"audit details key {key!r} must be a non-empty string")
        if re.sub(r"[\W_]", "", key.lower()) in _DENIED_KEYS:
            raise AuditError(
                f"audit details key {key!r} is not allowed: it names patient data; "
                "record UIDs, hashes, case ids or pseudonyms instead"
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise AuditError(
                f"audit details[{key!r}] is a {type(value).__name__}: values must be flat "
                "scalars (str, int, float, bool or None), never nested structures"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise AuditError(f"audit details[{key!r}] is {value}: only finite numbers")
        if isinstance(value, str) and len(value) > MAX_DETAIL_CHARS:
            raise AuditError(f"audit details[{key!r}] is longer than {MAX_DETAIL_CHARS} chars")
    return canonical_json(dict(details))


# --- records --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditEvent:
    """One row of ``events``; ``details`` parsed to a dict."""

    seq: int
    time: str
    event: str
    actor: str | None
    outcome: str
    object_id: str | None
    transfer_id: str | None
    peer: str | None
    case_id: str | None
    details: dict[str, Scalar] = field(hash=False)
    prev_hash: str
    entry_hash: str

    @property
    def timestamp(self) -> datetime:
        return datetime.fromisoformat(self.time)


@dataclass(frozen=True)
class Checkpoint:
    """A signature by the node over the chain head at ``seq``.

    ``source`` says where a checkpoint checked against the log came from (empty: the
    log's own table; ``"exported"``; ``"witnessed by factory-1"``); it is not signed."""

    node_id: str
    seq: int
    time: str
    head_hash: str
    signature: bytes
    source: str = field(default="", compare=False)

    def signing_bytes(self) -> bytes:
        return checkpoint_signing_bytes(self.node_id, self.seq, self.head_hash)

    def label(self) -> str:
        """``checkpoint at entry 17`` or ``checkpoint at entry 17 (witnessed by factory-1)``."""
        return f"checkpoint at entry {self.seq}" + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "source"}
        return {"format": CHECKPOINT_FORMAT, **data, "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        try:
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
            seq, head = data["seq"], data["head_hash"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError(f"seq {seq!r} is not a positive integer")
            if not isinstance(head, str) or not re.fullmatch(r"[0-9a-f]{64}", head):
                raise ValueError("head_hash is not 64 lowercase hex digits")
            return cls(
                str(data["node_id"]),
                seq,
                str(data["time"]),
                head,
                bytes.fromhex(data["signature"]),
                "exported",
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AuditError(f"exported audit checkpoint is malformed: {exc}") from exc


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of a verification; ``reason`` names the first bad entry and what is wrong.

    ``entries`` and ``checkpoints`` count what the log holds (including any exported
    checkpoint checked against it)."""

    ok: bool
    entries: int
    checkpoints: int
    first_bad_seq: int | None
    reason: str
    last_checkpoint: int = 0
    """Newest entry a checkpoint (of the log or given) covers; entries after it are
    proven by nothing but the chain itself."""
