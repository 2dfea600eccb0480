"""The signed documents of a case: record, envelope, canonical encoding, hashes.

Record (what the acting person signs)::

    {"format": "yigong-case-record/1", "case_id": "C-1", "seq": 3,
     "prev_hash": "<hex SHA-256 of the envelope of record seq-1, or the genesis>",
     "type": "design_output", "time": "2026-05-01T08:00:00.000000Z",
     "author": {"id": "erin", "role": "engineer", "org": "factory-1",
                "cert_fingerprint": "<hex SHA-256 of the author's certificate (DER)>"},
     "data": {...fields of the record type, see gateway.cases.schema...}}

Canonical encoding: JSON with sorted keys, separators ``(',', ':')``,
``ensure_ascii=False``, no NaN/Infinity, UTF-8 (:func:`gateway.audit.canonical_json`,
the one canonical JSON of the project). A record is accepted only in exactly this
form, so its bytes are the signed bytes. The genesis ``prev_hash`` of a case is
``sha256_hex("yigong-case-genesis:" + case_id)``.

Envelope (what is stored on both nodes and exchanged)::

    {"format": "yigong-case-envelope/1",
     "record": "<the canonical record text>",
     "author_signature": "<base64 ECDSA-SHA256 (DER) by the person over the record bytes>",
     "author_certificate": "<PEM of the person's certificate>",
     "node_id": "<the node that countersigned: the author's organisation node>",
     "node_certificate": "<PEM of that node's certificate>",
     "node_signature": "<base64 ECDSA-SHA256 by the node over node_signing_bytes>"}

``node_signing_bytes`` is the canonical JSON of the envelope without
``node_signature``. The envelope is stored as its canonical bytes; its SHA-256 is
the record hash (the next record's ``prev_hash``) and its object id in the store.
The record is carried as text, not as a nested object, so verifying never depends
on re-encoding numbers the same way as the signer.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.audit import canonical_json
from gateway.cases.schema import CaseFormatError, is_hex64, shown, validate_data
from gateway.errors import ChainError as ChainError
from gateway.hashing import sha256_hex

RECORD_FORMAT = "yigong-case-record/1"
ENVELOPE_FORMAT = "yigong-case-envelope/1"
CASE_MEDIA_TYPE = "application/vnd.yigong.case-record+json"
MAX_RECORD_BYTES = 256 * 1024
MAX_ENVELOPE_BYTES = 1024 * 1024
OPENED_BY, OPENED_AT = "case.opened_by", "case.opened_at"
"""Labels of record 0's object: who opened the case at the hospital, and when."""

_CASE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z")
_PERSON_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_RECORD_KEYS = frozenset(
    {"format", "case_id", "seq", "prev_hash", "type", "time", "author", "data"}
)
_AUTHOR_KEYS = frozenset({"id", "role", "org", "cert_fingerprint"})
_ENVELOPE_KEYS = frozenset(
    {
        "format",
        "record",
        "author_signature",
        "author_certificate",
        "node_id",
        "node_certificate",
        "node_signature",
    }
)


def canonical_bytes(value: Any) -> bytes:
    """The canonical UTF-8 JSON bytes of ``value``."""
    try:
        return canonical_json(value).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CaseFormatError(f"value cannot be encoded as canonical JSON: {exc}") from exc


def genesis_hash(case_id: str) -> str:
    """``prev_hash`` of record 0 of ``case_id``."""
    return sha256_hex(f"yigong-case-genesis:{case_id}".encode())


def check_case_id(case_id: object) -> str:
    """Raise ValidationError unless ``case_id`` is 1-64 of [A-Za-z0-9._-]."""
    if not isinstance(case_id, str) or not _CASE_RE.fullmatch(case_id):
        raise CaseFormatError(
            "a case id must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-' starting "
            "with a letter or digit (and must not contain patient data)"
        )
    return case_id


def parse_time(value: object, what: str) -> datetime:
    """An ISO-8601 UTC time ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``."""
    if not isinstance(value, str) or not _TIME_RE.fullmatch(value):
        raise CaseFormatError(f"{what} must be ISO-8601 UTC like 2026-05-01T08:00:00.000000Z")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise CaseFormatError(f"{what} is not a valid date and time") from exc


def _strict_json(raw: bytes, what: str) -> Any:
    """Parse UTF-8 JSON refusing duplicate keys, NaN/Infinity and non-canonical form."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CaseFormatError(f"{what} has the key {shown(key)} twice")
            out[key] = value
        return out

    def no_constants(name: str) -> Any:
        raise CaseFormatError(f"{what} holds {name}; only finite numbers are allowed")

    try:
        value = json.loads(
            raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants
        )
    except UnicodeDecodeError as exc:
        raise CaseFormatError(f"{what} is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise CaseFormatError(f"{what} is not JSON ({exc.msg} at {exc.pos})") from exc
    if canonical_bytes(value) != raw:
        raise CaseFormatError(
            f"{what} is not in canonical form (sorted keys, no spaces, UTF-8, as "
            "gateway.cases.records.canonical_bytes makes it)"
        )
    return value


@dataclass(frozen=True)
class Author:
    id: str
    role: str
    org: str
    cert_fingerprint: str

    def label(self) -> str:
        return f"{self.role}:{self.id}@{self.org}"

    def to_dict(self) -> dict[str, str]:
        return {
            "id": self.id,
            "role": self.role,
            "org": self.org,
            "cert_fingerprint": self.cert_fingerprint,
        }


@dataclass(frozen=True)
class Record:
    """One parsed, well-formed record (its data checked against the type's schema)."""

    case_id: str
    seq: int
    prev_hash: str
    type: str
    time: str
    author: Author
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "case_id": self.case_id,
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "type": self.type,
            "time": self.time,
            "author": self.author.to_dict(),
            "data": self.data,
        }

    def canonical(self) -> bytes:
        return canonical_bytes(self.to_dict())

    @classmethod
    def parse(cls, raw: bytes) -> Record:
        """Check ``raw`` is a canonical, well-formed record and return it."""
        if len(raw) > MAX_RECORD_BYTES:
            raise CaseFormatError(f"record is {len(raw)} bytes; at most {MAX_RECORD_BYTES}")
        doc = _strict_json(raw, "record")
        if not isinstance(doc, dict) or set(doc) != _RECORD_KEYS:
            got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise CaseFormatError(
                f"record must have exactly the keys {sorted(_RECORD_KEYS)}; got {got}"
            )
        if doc["format"] != RECORD_FORMAT:
            raise CaseFormatError(f"record format must be {RECORD_FORMAT!r}")
        case_id = check_case_id(doc["case_id"])
        seq = doc["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1_000_000:
            raise CaseFormatError("record seq must be an integer 0-999999")
        if not is_hex64(doc["prev_hash"]):
            raise CaseFormatError("record prev_hash must be 64 lowercase hex digits")
        parse_time(doc["time"], "record time")
        author = doc["author"]
        if not isinstance(author, dict) or set(author) != _AUTHOR_KEYS:
            raise CaseFormatError(
                f"record author must have exactly the keys {sorted(_AUTHOR_KEYS)}"
            )
        if not all(isinstance(author[k], str) for k in _AUTHOR_KEYS):
            raise CaseFormatError("record author fields must be strings")
        if not (_PERSON_RE.fullmatch(author["id"]) and _PERSON_RE.fullmatch(author["org"])):
            raise CaseFormatError("record author id and org must be federation ids")
        if not is_hex64(author["cert_fingerprint"]):
            raise CaseFormatError("record author cert_fingerprint must be 64 lowercase hex digits")
        kind = doc["type"]
        if not isinstance(kind, str):
            raise CaseFormatError("record type must be a string")
        validate_data(kind, doc["data"])
        return cls(
            case_id=case_id,
            seq=seq,
            prev_hash=doc["prev_hash"],
            type=kind,
            time=doc["time"],
            author=Author(**author),
            data=doc["data"],
        )


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise CaseFormatError(f"envelope {what} must be non-empty base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise CaseFormatError(f"envelope {what} is not base64") from exc


@dataclass(frozen=True)
class Envelope:
    """A record with the author's signature and certificate, countersigned by a node."""

    record_bytes: bytes
    author_signature: bytes
    author_certificate: bytes  # PEM
    node_id: str
    node_certificate: bytes  # PEM
    node_signature: bytes = b""

    def _fields(self) -> dict[str, str]:
        return {
            "format": ENVELOPE_FORMAT,
            "record": self.record_bytes.decode("utf-8"),
            "author_signature": base64.b64encode(self.author_signature).decode("ascii"),
            "author_certificate": self.author_certificate.decode("ascii"),
            "node_id": self.node_id,
            "node_certificate": self.node_certificate.decode("ascii"),
        }

    def node_signing_bytes(self) -> bytes:
        """What the node signs: every envelope field except the node signature."""
        return canonical_bytes(self._fields())

    def to_bytes(self) -> bytes:
        """The canonical envelope bytes: what is stored, hashed and exchanged."""
        fields = self._fields()
        fields["node_signature"] = base64.b64encode(self.node_signature).decode("ascii")
        return canonical_bytes(fields)

    def hash(self) -> str:
        return sha256_hex(self.to_bytes())

    @classmethod
    def parse(cls, raw: bytes) -> Envelope:
        """Check ``raw`` is a canonical, well-formed envelope (signatures not checked)."""
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise CaseFormatError(f"envelope is {len(raw)} bytes; at most {MAX_ENVELOPE_BYTES}")
        doc = _strict_json(raw, "envelope")
        if not isinstance(doc, dict) or set(doc) != _ENVELOPE_KEYS:
            raise CaseFormatError(f"envelope must have exactly the keys {sorted(_ENVELOPE_KEYS)}")
        if doc["format"] != ENVELOPE_FORMAT:
            raise CaseFormatError(f"envelope format must be {ENVELOPE_FORMAT!r}")
        for key in ("record", "author_certificate", "node_id", "node_certificate"):
            if not isinstance(doc[key], str) or not doc[key]:
                raise CaseFormatError(f"envelope {key} must be non-empty text")
        for key in ("author_certificate", "node_certificate"):
            if not doc[key].isascii() or "-----BEGIN CERTIFICATE-----" not in doc[key]:
                raise CaseFormatError(f"envelope {key} must be a PEM certificate")
        return cls(
            record_bytes=doc["record"].encode("utf-8"),
            author_signature=_b64(doc["author_signature"], "author_signature"),
            author_certificate=doc["author_certificate"].encode("ascii"),
            node_id=doc["node_id"],
            node_certificate=doc["node_certificate"].encode("ascii"),
            node_signature=_b64(doc["node_signature"], "node_signature"),
        )
