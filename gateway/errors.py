"""The one error hierarchy of yigong-gateway.

Every error raised by domain code is a :class:`YigongError`. Exceptions from
libraries (cryptography, sqlite3, minio, OS errors) are translated where they
enter our code (``raise StorageError(...) from exc``). Exactly one translator
maps these to gRPC status codes (:mod:`gateway.grpc_status`); the DICOM node
has one translator to DIMSE status codes.

Messages say what was wrong, with which file/peer/attribute, and what to do.
They never contain patient data: only UIDs, hashes, case ids and pseudonyms.

Tree::

    YigongError
    ├── ConfigError                 bad or missing configuration (file, key, value)
    ├── PKIError                    CA / certificate / key handling failed
    │   ├── CertificateError        a certificate is not acceptable
    │   │   ├── UntrustedCertificate    not issued by the federation CA
    │   │   ├── ExpiredCertificate      outside its validity period
    │   │   └── RevokedCertificate      listed in the federation CRL
    │   └── BadSignature            a signature does not verify against its certificate
    ├── AuthError
    │   ├── AuthenticationError     no usable client identity
    │   └── PermissionDenied        identity known, action not allowed for its role
    │       └── ResidencyViolation  data would go to / be stored in a region the policy forbids
    ├── ValidationError             a request or input is malformed
    │   └── IdentifiableData        an object still identifies a patient: never sent
    │       └── OutboundRefused     the hospital's outbound gate refused a file (type, content)
    ├── NotFound                    a requested object / transfer / record does not exist
    ├── StorageError                object store failed (I/O, S3)
    ├── CatalogError                catalog database failed or is inconsistent
    ├── AuditError                  the audit log could not be written or read
    ├── TransferError               a transfer could not complete
    │   ├── IntegrityError          bytes did not match their SHA-256
    │   ├── ReceiptError            a receipt is unsigned, badly signed or disagrees
    │   ├── QuotaExceeded           a peer's open inbound transfers / spooled bytes are at the cap
    │   └── PeerUnavailable         the peer could not be reached (retry later)
    ├── NotReady                    the node cannot serve now (e.g. unusable CRL); retry later
    └── ShuttingDown                the node is stopping; retry against it later
"""

from __future__ import annotations


class YigongError(Exception):
    """Base of every error raised by yigong-gateway code."""


class ConfigError(YigongError):
    """The node configuration is invalid."""


class PKIError(YigongError):
    """Creating, loading or using federation PKI material failed."""


class CertificateError(PKIError):
    """A certificate is not acceptable to this federation."""


class UntrustedCertificate(CertificateError):
    """The certificate was not issued by the federation CA."""


class ExpiredCertificate(CertificateError):
    """The certificate is not yet valid or no longer valid."""


class RevokedCertificate(CertificateError):
    """The certificate's serial number is on the federation revocation list."""


class BadSignature(PKIError):
    """A signature does not verify against the certificate that should have made it."""


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


class CatalogError(YigongError):
    """The catalog database failed or is inconsistent."""


class AuditError(YigongError):
    """The audit log could not be written, read or verified."""


class TransferError(YigongError):
    """A transfer could not complete."""


class IntegrityError(TransferError):
    """Bytes did not match the SHA-256 they were sent with."""


class ReceiptError(TransferError):
    """A receipt is missing, badly signed, or disagrees with what was sent."""


class PeerUnavailable(TransferError):
    """The peer node could not be reached; the send stays queued."""


class NotReady(YigongError):
    """The node cannot serve calls now (e.g. its CRL is unusable); its operator must act."""


class ShuttingDown(YigongError):
    """The node is shutting down and does not take new work."""


class QuotaExceeded(TransferError):
    """A peer has as many open inbound transfers or spooled bytes as this node allows
    (``transfer.max_open_inbound_per_peer`` / ``transfer.max_spooled_bytes_per_peer``);
    retry when some of them have completed or expired."""
