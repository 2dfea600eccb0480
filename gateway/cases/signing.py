"""The person's side of a case record: build the canonical record and sign it.

Used by ``yigong case sign`` and the tests; any tool can do the same with the
person's certificate and key: build the record (see :mod:`gateway.cases.records`)
for the case's next seq and head hash (``GetCase``), encode it canonically, sign
the bytes with ECDSA-SHA256 and call ``SubmitRecord`` with the bytes and the
signature over an mTLS channel that presents the same certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.cases.records import Author, Record, canonical_bytes, check_case_id
from gateway.cases.schema import validate_data
from gateway.catalog import iso_utc
from gateway.errors import PKIError
from gateway.identity import Identity, identity_from_certificate
from gateway.pki import load_certificate, load_private_key, sign

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def author_of(identity: Identity) -> Author:
    """The author of a record signed by the person of ``identity`` (their verified
    certificate)."""
    i = identity
    return Author(i.subject_id, i.role, i.org_node, i.fingerprint)


def build_record(
    author: Author,
    case_id: str,
    seq: int,
    prev_hash: str,
    kind: str,
    data: dict[str, Any],
    time: datetime | None = None,
) -> bytes:
    """The canonical bytes of a new record by ``author`` at ``seq`` after ``prev_hash``
    (checked against the schema): the one construction the CLI (:class:`PersonSigner`) and
    the console's record forms (which hand the bytes to the person's browser to sign) use.
    No key is needed to build them."""
    check_case_id(case_id)
    validate_data(kind, data)
    record = Record(
        case_id=case_id,
        seq=seq,
        prev_hash=prev_hash,
        type=kind,
        time=iso_utc(time or datetime.now(UTC)),
        author=author,
        data=data,
    )
    raw = canonical_bytes(record.to_dict())
    Record.parse(raw)  # the same checks the node makes
    return raw


@dataclass(frozen=True)
class PersonSigner:
    """A person's certificate and private key, as used to sign case records."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    identity: Identity

    @classmethod
    def from_files(cls, cert_path: Path | str, key_path: Path | str) -> PersonSigner:
        cert = load_certificate(cert_path)
        key = load_private_key(key_path)
        if key.public_key().public_bytes(*_SPKI) != cert.public_key().public_bytes(*_SPKI):
            raise PKIError(f"key {key_path} does not belong to certificate {cert_path}")
        identity = identity_from_certificate(cert)
        if identity.is_node:
            raise PKIError(
                f"{cert_path} is the certificate of node {identity.subject_id}; case records "
                "are signed by persons (clinicians, engineers) with their own certificate"
            )
        return cls(cert, key, identity)

    @property
    def author(self) -> Author:
        return author_of(self.identity)

    def record(
        self,
        case_id: str,
        seq: int,
        prev_hash: str,
        kind: str,
        data: dict[str, Any],
        time: datetime | None = None,
    ) -> bytes:
        """The canonical bytes of a new record by this person (checked against the schema)."""
        return build_record(self.author, case_id, seq, prev_hash, kind, data, time)

    def sign(self, record_bytes: bytes) -> bytes:
        """ECDSA-SHA256 (DER) signature of the record bytes with this person's key."""
        return sign(self.key, record_bytes)
