"""The one error hierarchy of yigong-gateway.

Every error raised by domain code is a :class:`YigongError`. Exceptions from
libraries (cryptography, sqlite3, minio, OS errors) are translated where they
enter our code (``raise StorageError(...) from exc``). Exactly one translator
maps these to gRPC status codes (:mod:`gateway.rpc.status`); the DICOM node
has one translator to DIMSE status codes.

Messages say what was wrong, with which file/peer/attribute, and what to do.
They never contain patient data: only UIDs, hashes, case ids and pseudonyms.

Tree (``[retry]``: :attr:`YigongError.retryable` — the condition is the node's, not the
request's, and passes by itself or by its operator's hand; the sender keeps the data and
sends again later. Both wire translators derive "retry later" from it: gRPC answers
``UNAVAILABLE`` or ``RESOURCE_EXHAUSTED``, DIMSE ``0xA7xx``; every other error is final
for that request: fix it, then send again)::

    YigongError                     no more specific kind (internal; not retried)
    ├── ConfigError                 bad or missing configuration (file, key, value)
    ├── PKIError                    [retry] CA / certificate / key material unusable (e.g. CRL)
    │   ├── CertificateError        a certificate is not acceptable
    │   │   ├── UntrustedCertificate    not issued by the federation CA
    │   │   ├── ExpiredCertificate      outside its validity period
    │   │   └── RevokedCertificate      listed in the federation CRL
    │   └── BadSignature            a signature does not verify against its certificate
    ├── AuthError                   authentication or authorization failed
    │   ├── AuthenticationError     no usable client identity
    │   └── PermissionDenied        identity known, action not allowed for its role
    │       ├── ResidencyViolation  data would go to / be stored in a region the policy forbids
    │       └── SignerRefused       the author may not sign this record type for this case
    ├── ValidationError             a request or input is malformed
    │   ├── IdentifiableData        an object still identifies a patient: never sent
    │   │   └── OutboundRefused     the hospital's outbound gate refused a file (type, content)
    │   ├── ChainError              a case record or chain does not verify / cannot be extended
    │   │   └── Refused             a record from the peer that is not taken into the chain
    │   ├── StageRefused            a case record out of order, or contradicting the case
    │   │   └── RecordUnfounded     a signed record names something this node's facts contradict
    │   ├── CaseFormatError         a case record or envelope is not well formed
    │   ├── StudyNotReady           the study cannot be confirmed now (receiving, confirmed)
    │   ├── UnreadableInstance      a DICOM data set cannot be parsed (DIMSE 0xC000)
    │   ├── DatasetMismatch         a DICOM data set does not match its SOP Class (DIMSE 0xA900)
    │   ├── BurnedInAnnotationHeld  pixels may show patient data: held for a clinician
    │   ├── DeidRefused             cannot be de-identified into a valid, useful object
    │   ├── MeshFormatError         not a valid mesh file of its declared format (STL/OBJ/PLY/3MF)
    │   └── StepFormatError         not a well-formed ISO 10303-21 (STEP) file
    ├── NotFound                    a requested object / transfer / record does not exist
    ├── StorageError                [retry] object store failed (I/O, S3)
    ├── CatalogError                [retry] catalog database failed or is inconsistent
    ├── AuditError                  [retry] the audit log could not be written or read
    ├── TransferError               a transfer could not complete
    │   ├── IntegrityError          bytes did not match their SHA-256
    │   ├── ReceiptError            a receipt is unsigned, badly signed or disagrees
    │   │   └── FactsDisagree       the receiver's format facts differ from the sender's
    │   ├── QuotaExceeded           [retry] a peer's open inbound transfers / bytes are at the cap
    │   └── PeerUnavailable         [retry] the peer could not be reached
    ├── NotReady                    [retry] the node cannot serve now (e.g. unusable CRL)
    │   └── FactsPending            [retry] a record names a fact not yet arrived here
    └── ShuttingDown                [retry] the node is stopping

Control flow, not errors: these never leave the module (package) that raises them; each is
caught there and translated into a YigongError above, or into a fallback::

    Exception
    ├── gateway.fidelity.formats._Invalid           a design file fails its format check
    ├── hospital_node.ingest_fast._Unusual          the fast parser steps aside for pydicom
    ├── hospital_node.deid.fast.FastPathUnsupported the engine de-identifies instead
    ├── hospital_node.outbound.scanners.Unscannable becomes OutboundRefused (check names why)
    ├── factory_node.role._Unparseable              becomes the receipt's dicom.parse_error
    ├── gateway.audit_witness._Conflict             rolls back, then alert + ValidationError
    ├── gateway.rpc.proxy_protocol.ProxyHeaderError the terminator closes that connection
    └── gateway.web.cases._FieldError               shown next to its field in a record form

Every class above is checked against the code by ``tests/test_error_tree.py``: the drawing,
the ``[retry]`` marks, and a row in both translators' tables.
"""

from __future__ import annotations

from typing import ClassVar


class YigongError(Exception):
    """Base of every error raised by yigong-gateway code."""

    retryable: ClassVar[bool] = False
    """True when the request may succeed if sent again unchanged later (see the tree)."""


def is_retryable(exc: BaseException) -> bool:
    """Whether the sender should keep the data and send ``exc``'s request again later."""
    return isinstance(exc, YigongError) and type(exc).retryable


class ConfigError(YigongError):
    """The node configuration is invalid."""


class PKIError(YigongError):
    """Creating, loading or using federation PKI material failed."""

    retryable = True


class CertificateError(PKIError):
    """A certificate is not acceptable to this federation."""

    retryable = False


class UntrustedCertificate(CertificateError):
    """The certificate was not issued by the federation CA."""


class ExpiredCertificate(CertificateError):
    """The certificate is not yet valid or no longer valid."""


class RevokedCertificate(CertificateError):
    """The certificate's serial number is on the federation revocation list."""


class BadSignature(PKIError):
    """A signature does not verify against the certificate that should have made it."""

    retryable = False


class AuthError(YigongError):
    """Base of authentication and authorization failures."""


class AuthenticationError(AuthError):
    """The caller could not be identified from a valid certificate."""


class PermissionDenied(AuthError):
    """The caller is known but may not perform this action."""


class ResidencyViolation(PermissionDenied):
    """Data would go to, or be stored in, a region the node's residency policy forbids."""


class ValidationError(YigongError):
    """A request or an input file is malformed."""


class IdentifiableData(ValidationError):
    """An object bound for another node still carries patient-identifying data."""


class OutboundRefused(IdentifiableData):
    """The hospital's outbound gate refused a file: DICOM outside its door, a type that
    may not leave, a declared type the content contradicts, content that cannot be
    checked, or an identifier of the case's patient found in it. ``check`` names the
    rule (for the audit; never a value)."""

    def __init__(self, message: str, check: str = "") -> None:
        super().__init__(message)
        self.check = check


class NotFound(YigongError):
    """The requested object, transfer or record does not exist."""


class StorageError(YigongError):
    """The object store failed."""

    retryable = True


class CatalogError(YigongError):
    """The catalog database failed or is inconsistent."""

    retryable = True


class AuditError(YigongError):
    """The audit log could not be written, read or verified."""

    retryable = True


class TransferError(YigongError):
    """A transfer could not complete."""


class IntegrityError(TransferError):
    """Bytes did not match the SHA-256 they were sent with."""


class ReceiptError(TransferError):
    """A receipt is missing, badly signed, or disagrees with what was sent."""


class PeerUnavailable(TransferError):
    """The peer node could not be reached; the send stays queued."""

    retryable = True


class NotReady(YigongError):
    """The node cannot serve calls now (e.g. its CRL is unusable); its operator must act."""

    retryable = True


class ShuttingDown(YigongError):
    """The node is shutting down and does not take new work."""

    retryable = True


class QuotaExceeded(TransferError):
    """A peer has as many open inbound transfers or spooled bytes as this node allows
    (``transfer.max_open_inbound_per_peer`` / ``transfer.max_spooled_bytes_per_peer``);
    retry when some of them have completed or expired."""

    retryable = True


# -- kinds that were defined next to the code raising them; that code re-exports them --


class SignerRefused(PermissionDenied):
    """The author may not sign this record type for this case (role or node)."""


class ChainError(ValidationError):
    """A case record or chain does not verify, or cannot be extended with a record."""


class Refused(ChainError):
    """A record from the peer that is not taken into the chain."""


class StageRefused(ValidationError):
    """A record is out of the standard's order, or contradicts the case so far."""


class RecordUnfounded(StageRefused):
    """A signed record names something this node's facts contradict."""


class CaseFormatError(ValidationError):
    """A record or envelope is not well formed (bytes, JSON, canonical form, fields)."""


class StudyNotReady(ValidationError):
    """The study cannot be confirmed now (still receiving, already confirmed, ...)."""


class UnreadableInstance(ValidationError):
    """The data set cannot be parsed (PS3.4 B.2.3 "Error: Cannot understand")."""


class DatasetMismatch(ValidationError):
    """The data set does not match its SOP class ("Error: Data Set does not match SOP Class")."""


class BurnedInAnnotationHeld(ValidationError):
    """The instance may show patient data in its pixels; it is held for a clinician."""


class DeidRefused(ValidationError):
    """The instance cannot be de-identified into a valid, useful object; not produced."""


class MeshFormatError(ValidationError):
    """The file is not a valid file of the format it was read as (message: why)."""


class StepFormatError(ValidationError):
    """The file is not a well-formed ISO 10303-21 file (message: why)."""


class FactsDisagree(ReceiptError):
    """The receiver's format-aware facts differ from the sender's: do not retry."""


class FactsPending(NotReady):
    """A record from the other node names a fact that has not reached this node yet."""
