"""The one translation between :mod:`gateway.errors` and HTTP status codes (the web
console's; gRPC has :mod:`gateway.rpc.status`, DICOM its DIMSE translator)."""

from __future__ import annotations

from gateway import errors as e

CODES: dict[type[e.YigongError], int] = {
    # A class without a row is answered like its nearest ancestor.
    e.YigongError: 500,
    e.ConfigError: 500,
    e.PKIError: 503,
    e.CertificateError: 401,
    e.BadSignature: 400,  # a record signature that does not verify: the request is bad
    e.AuthError: 403,
    e.AuthenticationError: 401,
    e.PermissionDenied: 403,
    e.ValidationError: 400,
    e.StageRefused: 409,
    e.StudyNotReady: 409,
    e.NotFound: 404,
    e.StorageError: 503,
    e.CatalogError: 503,
    e.AuditError: 503,
    e.TransferError: 502,
    e.QuotaExceeded: 429,
    e.NotReady: 503,
    e.ShuttingDown: 503,
}


def http_status_for(exc: e.YigongError) -> int:
    """The HTTP status a console request refused with ``exc`` is answered with."""
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return 500
