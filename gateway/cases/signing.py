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
        i = self.identity
        return Author(i.subject_id, i.role, i.org_node, i.fingerprint)

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
        check_case_id(case_id)
        validate_data(kind, data)
        record = Record(
            case_id=case_id,
            seq=seq,
            prev_hash=prev_hash,
            type=kind,
            time=iso_utc(time or datetime.now(UTC)),
            author=self.author,
            data=data,
        )
        raw = canonical_bytes(record.to_dict())
        Record.parse(raw)  # the same checks the node makes
        return raw

    def sign(self, record_bytes: bytes) -> bytes:
        """ECDSA-SHA256 (DER) signature of the record bytes with this person's key."""
        return sign(self.key, record_bytes)
