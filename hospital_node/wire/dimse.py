"""The one translation from :mod:`gateway.errors` to DIMSE C-STORE status codes.

Like :mod:`gateway.rpc.status` for gRPC: the SCP asks :func:`store_response` which
status (and Error Comment) an error is answered with; nothing else in the node picks a
status code. An error the sender should send again later
(:attr:`gateway.errors.YigongError.retryable`) gets an ``0xA7xx`` status and no other
error does: the same notion gRPC answers ``UNAVAILABLE`` / ``RESOURCE_EXHAUSTED`` for.

PS3.4 Annex B.2.3 (Storage Service Class) and PS3.7 Annex C give the meaning:

======  ======================================  =========================================
status  meaning                                 the PACS should
======  ======================================  =========================================
0x0000  Success: stored durably and catalogued  nothing (resending is harmless)
0xA700  Refused: out of resources — storage     retry later (storage full or failing,
                                                or a sender's quota reached)
0xA701  Refused: out of resources — catalog     retry later (catalog database failing)
0xA702  Refused: out of resources — audit log   retry later (audit log not writable)
0xA710  Refused: out of resources — stopping    retry later (node shutting down / not ready)
0xA7FF  Refused: out of resources — internal    retry later; the node operator checks the log
                                                (an unexpected exception, PKI material or
                                                a peer unusable now)
0xA900  Error: data set does not match SOP      not retry: fix the instance (UIDs, SOP Class,
        Class                                   pixel module) and resend
0xC000  Error: cannot understand                not retry: the data set cannot be parsed
0x0124  Refused: not authorized                 not retry (certificate, signature or
                                                permission refused)
0x0110  Failure: processing failure             not retry as is: the node's operator must act
                                                (configuration, a missing object, a failed
                                                transfer)
======  ======================================  =========================================

Every failure carries an Error Comment (0000,0902): for refused data sets the cause
(UIDs, tags, byte offsets — never a value); for the node's own failures a fixed text
(paths and internals stay in the node's log).
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset

from gateway import errors as e

SUCCESS: Final = 0x0000
OUT_OF_RESOURCES: Final = 0xA700
CATALOG_FAILED: Final = 0xA701
AUDIT_FAILED: Final = 0xA702
NOT_NOW: Final = 0xA710
INTERNAL: Final = 0xA7FF
DATASET_MISMATCH: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000
NOT_AUTHORIZED: Final = 0x0124
PROCESSING_FAILURE: Final = 0x0110

_LATER = "; send again later"
_OPERATOR = "; the node operator must act"
STATUSES: dict[type[e.YigongError], tuple[int, str]] = {
    # One row per class of gateway.errors (tests/test_error_tree.py checks it); a class
    # without a row is answered like its nearest ancestor. (status, Error Comment; "" =
    # the error's own message, which names UIDs/tags). Retryable errors, and only they,
    # get an 0xA7xx status.
    e.YigongError: (PROCESSING_FAILURE, "processing failed" + _OPERATOR),
    e.ConfigError: (PROCESSING_FAILURE, "node configuration error" + _OPERATOR),
    e.PKIError: (INTERNAL, "node certificates unusable" + _LATER),
    e.CertificateError: (NOT_AUTHORIZED, "certificate not accepted"),
    e.UntrustedCertificate: (NOT_AUTHORIZED, "certificate not accepted"),
    e.ExpiredCertificate: (NOT_AUTHORIZED, "certificate not accepted"),
    e.RevokedCertificate: (NOT_AUTHORIZED, "certificate not accepted"),
    e.BadSignature: (NOT_AUTHORIZED, "signature does not verify"),
    e.AuthError: (NOT_AUTHORIZED, "not authorized"),
    e.AuthenticationError: (NOT_AUTHORIZED, "not authorized"),
    e.PermissionDenied: (NOT_AUTHORIZED, "not authorized"),
    e.ResidencyViolation: (NOT_AUTHORIZED, "not authorized"),
    e.SignerRefused: (NOT_AUTHORIZED, "not authorized"),
    e.ValidationError: (CANNOT_UNDERSTAND, ""),
    e.IdentifiableData: (CANNOT_UNDERSTAND, ""),
    e.OutboundRefused: (CANNOT_UNDERSTAND, ""),
    e.ChainError: (CANNOT_UNDERSTAND, ""),
    e.Refused: (CANNOT_UNDERSTAND, ""),
    e.StageRefused: (CANNOT_UNDERSTAND, ""),
    e.RecordUnfounded: (CANNOT_UNDERSTAND, ""),
    e.CaseFormatError: (CANNOT_UNDERSTAND, ""),
    e.StudyNotReady: (CANNOT_UNDERSTAND, ""),
    e.UnreadableInstance: (CANNOT_UNDERSTAND, ""),
    e.DatasetMismatch: (DATASET_MISMATCH, ""),
    e.BurnedInAnnotationHeld: (CANNOT_UNDERSTAND, ""),
    e.DeidRefused: (CANNOT_UNDERSTAND, ""),
    e.MeshFormatError: (CANNOT_UNDERSTAND, ""),
    e.StepFormatError: (CANNOT_UNDERSTAND, ""),
    e.NotFound: (PROCESSING_FAILURE, "not found" + _OPERATOR),
    e.StorageError: (OUT_OF_RESOURCES, "storage failed" + _LATER),
    e.CatalogError: (CATALOG_FAILED, "catalog failed" + _LATER),
    e.AuditError: (AUDIT_FAILED, "audit log failed" + _LATER),
    e.TransferError: (PROCESSING_FAILURE, "transfer failed" + _OPERATOR),
    e.IntegrityError: (PROCESSING_FAILURE, "integrity check failed" + _OPERATOR),
    e.ReceiptError: (PROCESSING_FAILURE, "receipt check failed" + _OPERATOR),
    e.FactsDisagree: (PROCESSING_FAILURE, "receipt check failed" + _OPERATOR),
    e.QuotaExceeded: (OUT_OF_RESOURCES, "quota reached" + _LATER),
    e.PeerUnavailable: (INTERNAL, "peer unreachable" + _LATER),
    e.NotReady: (NOT_NOW, "node not ready" + _LATER),
    e.FactsPending: (NOT_NOW, "node not ready" + _LATER),
    e.ShuttingDown: (NOT_NOW, "node stopping" + _LATER),
}
_INTERNAL_COMMENT = "internal error" + _LATER


def retry_later(status: int) -> bool:
    """Whether ``status`` tells the sender to send the instance again later (0xA7xx)."""
    return status & 0xFF00 == OUT_OF_RESOURCES


ERROR_COMMENT_CHARS: Final = 64
"""Error Comment is LO: at most 64 characters."""


def _lookup(exc: BaseException) -> tuple[int, str]:
    """Status and Error Comment for ``exc``: its class's row, else its nearest ancestor's;
    anything that is not a YigongError (a bug) is 0xA7FF: the PACS keeps the instance and
    sends it again once the operator has read the log."""
    for cls in type(exc).__mro__:
        row = STATUSES.get(cls)
        if row is not None:
            status, comment = row
            return status, comment or str(exc)
    return INTERNAL, _INTERNAL_COMMENT


def reason(exc: BaseException) -> str:
    """What may be said about ``exc`` in logs and to the peer: our own errors' messages
    (UIDs only, by construction); for anything else only its type (its text may quote
    a value from the data set)."""
    if isinstance(exc, e.YigongError):
        return str(exc)
    return f"internal error ({type(exc).__name__})"


def error_comment(text: str) -> str:
    """``text`` fitted into an Error Comment (ASCII, no backslash, at most 64 chars)."""
    if text.startswith("instance ") and ": " in text:  # the PACS knows which instance
        text = text.split(": ", 1)[1]
    clean = "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in text)
    return clean if len(clean) <= ERROR_COMMENT_CHARS else clean[: ERROR_COMMENT_CHARS - 3] + "..."


def store_response(exc: BaseException) -> Dataset:
    """The status data set of a failed C-STORE: Status and Error Comment."""
    status, comment = _lookup(exc)
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = error_comment(comment)
    return rsp
