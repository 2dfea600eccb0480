"""Verification of a case record and of a whole case chain.

:func:`verify_envelope` checks one envelope: canonical form and fields, the author's
signature against the certificate embedded in the envelope and that certificate
against the federation CA (at the record's time), that the certificate is the author
the record names, and the countersignature of the author's own node.

:func:`verify_chain` re-checks a stored chain from its bytes: every envelope as above,
the hash recorded at storage, seq and ``prev_hash`` links, and the stage gates replayed
from the start. Its report names the first bad record by seq. A certificate revoked or
expired since fails verification too, but is told apart (``integrity`` stays true), so
the case can continue while an officer looks at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from gateway.cases.records import ChainError, Envelope, Record
from gateway.cases.store import CaseRow, StoredRecord
from gateway.cases.workflow import CaseState, SignerRefused, StageRefused, apply
from gateway.errors import (
    BadSignature,
    CertificateError,
    ExpiredCertificate,
    PKIError,
    RevokedCertificate,
    ValidationError,
)
from gateway.hashing import sha256_hex
from gateway.identity import Identity
from gateway.pki import TrustStore, verify_signature


@dataclass(frozen=True)
class Verified:
    """An envelope whose signatures and certificates verified."""

    envelope: Envelope
    record: Record
    author: Identity
    node: Identity
    hash: str


@dataclass(frozen=True)
class RecordCheck:
    seq: int
    envelope_hash: str
    ok: bool
    problem: str  # "" when ok
    integrity: bool  # False: bytes, signatures, links or gates are wrong (not only trust)
    verified: Verified | None
    record: Record | None


@dataclass(frozen=True)
class ChainReport:
    case: CaseRow
    checks: tuple[RecordCheck, ...]
    state: CaseState  # replayed up to the first record that failed

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def intact(self) -> bool:
        """Bytes, signatures, links and gates are right (certificates may since be revoked)."""
        return all(c.integrity for c in self.checks)

    @property
    def problem(self) -> str:
        bad = next((c for c in self.checks if not c.ok), None)
        return bad.problem if bad else ""


def verify_envelope(raw: bytes, trust: TrustStore) -> Verified:
    """Parse ``raw`` and check both signatures and certificates (at the record's time).

    Raises CaseFormatError (malformed), BadSignature, CertificateError (untrusted,
    expired at the record's time, revoked) or ChainError (identity mismatch)."""
    env = Envelope.parse(raw)
    record = Record.parse(env.record_bytes)
    at = datetime.fromisoformat(record.time)
    author = trust.verify_pem(env.author_certificate, at)
    a = record.author
    claimed = (author.subject_id, author.role, author.org_node)
    if author.is_node or claimed != (a.id, a.role, a.org):
        raise ChainError(
            f"the author certificate is {author.label()}, but the record names {a.label()}"
        )
    if author.fingerprint != a.cert_fingerprint:
        raise ChainError("the author certificate's fingerprint is not the one the record names")
    verify_signature(_cert(env.author_certificate), env.record_bytes, env.author_signature)
    node = trust.verify_pem(env.node_certificate, at)
    if not node.is_node or node.subject_id != env.node_id:
        raise ChainError(
            f"the countersigning certificate is {node.label()}, not node {env.node_id}"
        )
    if a.org != env.node_id:
        raise ChainError(
            f"{a.label()} was countersigned by node {env.node_id}, not by their own node"
        )
    verify_signature(_cert(env.node_certificate), env.node_signing_bytes(), env.node_signature)
    return Verified(env, record, author, node, sha256_hex(raw))


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _check_stored(
    row: StoredRecord, n: int, prev: str, case_id: str, trust: TrustStore
) -> tuple[Record | None, Verified | None, str, bool]:
    """(record, verified, problem, trust_only) for the stored record expected at seq ``n``."""
    record: Record | None = None
    trust_only = False
    try:
        if row.seq != n:
            raise ChainError(f"is stored at seq {row.seq}, expected {n} (a record is missing)")
        if sha256_hex(row.envelope) != row.envelope_hash:
            raise ChainError("its bytes do not match the hash recorded when stored (modified)")
        record = Record.parse(Envelope.parse(row.envelope).record_bytes)
        if record.case_id != case_id or record.seq != n:
            raise ChainError(f"names case {record.case_id} seq {record.seq}")
        if record.prev_hash != prev:
            raise ChainError(f"does not link to record {n - 1}: prev_hash differs (modified)")
        try:
            return record, verify_envelope(row.envelope, trust), "", False
        except (ExpiredCertificate, RevokedCertificate) as exc:
            trust_only = _signatures_hold(row.envelope)
            raise ChainError(f"certificate no longer trusted: {exc}") from exc
        except (BadSignature, CertificateError, PKIError) as exc:
            raise ChainError(f"signature or certificate does not verify: {exc}") from exc
    except ValidationError as exc:  # ChainError, CaseFormatError
        return record, None, f"record {n}: {exc}", trust_only


def verify_chain(case: CaseRow, stored: Sequence[StoredRecord], trust: TrustStore) -> ChainReport:
    """Verify every stored record of ``case`` and replay the gates from the start."""
    state = CaseState.start(case.parties)
    prev, replay = state.head, True
    checks: list[RecordCheck] = []
    for n, row in enumerate(stored):
        record, verified, problem, trust_only = _check_stored(row, n, prev, case.case_id, trust)
        actual = sha256_hex(row.envelope)
        if record is not None and replay:
            try:
                state = apply(state, record, actual)
            except (StageRefused, SignerRefused) as exc:
                problem = problem or f"record {n}: gate: {exc}"
                trust_only = replay = False
        else:
            replay = False
        integrity = not problem or trust_only
        checks.append(RecordCheck(n, actual, not problem, problem, integrity, verified, record))
        prev = actual
    return ChainReport(case, tuple(checks), state)


def _signatures_hold(raw: bytes) -> bool:
    """Whether both signatures verify against the embedded certificates (trust aside)."""
    try:
        env = Envelope.parse(raw)
        verify_signature(_cert(env.author_certificate), env.record_bytes, env.author_signature)
        verify_signature(_cert(env.node_certificate), env.node_signing_bytes(), env.node_signature)
    except (ValidationError, BadSignature, ValueError):
        return False
    return True
