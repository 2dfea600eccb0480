"""The one translation between :mod:`gateway.errors` and gRPC status codes.

Servers: :func:`status_for` picks the code an error is answered with.
Clients: :func:`error_from_rpc` turns an :class:`grpc.RpcError` back into a
:class:`~gateway.errors.YigongError` with a message a person can act on.

"Send again later" is decided by the error class (``YigongError.retryable``, the
``[retry]`` marks of the tree in :mod:`gateway.errors`), not here: retryable errors,
and only they, are answered with a code in :data:`RETRY_LATER` (as the DIMSE
translator answers them ``0xA7xx``), and a client rebuilds a retryable error from
such a code. ``tests/test_error_tree.py`` holds both tables to that.
"""

from __future__ import annotations

import grpc

from gateway import errors as e

_S = grpc.StatusCode

CODES: dict[type[e.YigongError], grpc.StatusCode] = {
    # One row per class of gateway.errors (tests/test_error_tree.py checks it). A class
    # without a row (defined later, elsewhere) is answered like its nearest ancestor.
    # Retryable errors (YigongError.retryable) and only they get a RETRY_LATER code.
    e.YigongError: _S.INTERNAL,
    e.ConfigError: _S.FAILED_PRECONDITION,
    e.PKIError: _S.UNAVAILABLE,  # e.g. CRL unverifiable: fail closed, retry later
    e.CertificateError: _S.UNAUTHENTICATED,
    e.UntrustedCertificate: _S.UNAUTHENTICATED,
    e.ExpiredCertificate: _S.UNAUTHENTICATED,
    e.RevokedCertificate: _S.UNAUTHENTICATED,
    e.BadSignature: _S.UNAUTHENTICATED,  # a bad signature stays bad: not UNAVAILABLE
    e.AuthError: _S.PERMISSION_DENIED,
    e.AuthenticationError: _S.UNAUTHENTICATED,
    e.PermissionDenied: _S.PERMISSION_DENIED,
    e.ResidencyViolation: _S.PERMISSION_DENIED,
    e.SignerRefused: _S.PERMISSION_DENIED,
    e.ValidationError: _S.INVALID_ARGUMENT,
    e.IdentifiableData: _S.FAILED_PRECONDITION,
    e.OutboundRefused: _S.FAILED_PRECONDITION,
    e.ChainError: _S.INVALID_ARGUMENT,
    e.Refused: _S.INVALID_ARGUMENT,
    e.StageRefused: _S.INVALID_ARGUMENT,
    e.RecordUnfounded: _S.INVALID_ARGUMENT,
    e.CaseFormatError: _S.INVALID_ARGUMENT,
    e.StudyNotReady: _S.INVALID_ARGUMENT,
    e.UnreadableInstance: _S.INVALID_ARGUMENT,
    e.DatasetMismatch: _S.INVALID_ARGUMENT,
    e.BurnedInAnnotationHeld: _S.INVALID_ARGUMENT,
    e.DeidRefused: _S.INVALID_ARGUMENT,
    e.MeshFormatError: _S.INVALID_ARGUMENT,
    e.StepFormatError: _S.INVALID_ARGUMENT,
    e.NotFound: _S.NOT_FOUND,
    e.StorageError: _S.UNAVAILABLE,
    e.CatalogError: _S.UNAVAILABLE,  # was INTERNAL: a failing catalog passes; retry later
    e.AuditError: _S.UNAVAILABLE,  # was INTERNAL: nothing is done unaudited; retry later
    e.TransferError: _S.ABORTED,
    e.IntegrityError: _S.DATA_LOSS,
    e.ReceiptError: _S.DATA_LOSS,
    e.FactsDisagree: _S.DATA_LOSS,
    e.QuotaExceeded: _S.RESOURCE_EXHAUSTED,
    e.PeerUnavailable: _S.UNAVAILABLE,
    e.NotReady: _S.UNAVAILABLE,
    e.FactsPending: _S.UNAVAILABLE,
    e.ShuttingDown: _S.UNAVAILABLE,
}

RETRY_LATER: frozenset[grpc.StatusCode] = frozenset({_S.UNAVAILABLE, _S.RESOURCE_EXHAUSTED})
"""The codes that tell a caller to send the same call again later (with backoff)."""

_ERRORS: dict[grpc.StatusCode, type[e.YigongError]] = {
    grpc.StatusCode.UNAUTHENTICATED: e.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: e.PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: e.ValidationError,
    grpc.StatusCode.NOT_FOUND: e.NotFound,
    grpc.StatusCode.DATA_LOSS: e.IntegrityError,
    grpc.StatusCode.UNAVAILABLE: e.PeerUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: e.PeerUnavailable,
    grpc.StatusCode.ABORTED: e.TransferError,
    grpc.StatusCode.FAILED_PRECONDITION: e.TransferError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: e.QuotaExceeded,
}

# What handshake failures mean for a person reading the error. Under TLS 1.3 a
# server that refuses the client certificate just closes the connection: the
# client sees "failed to connect ... Socket closed" and no alert text.
_HANDSHAKE_CLOSED = (
    "the node closed the connection during the TLS handshake: it did not accept our client "
    "certificate (no client certificate sent, expired, revoked at handshake, or not issued "
    "by the federation CA). Check the certificate with 'yigong pki show CERT'; the node's "
    "audit log names the reason (auth.refused, stage tls_handshake)"
)
_TLS_HINTS = (
    (
        "HOSTNAME VERIFICATION",
        "the server's certificate is not the certificate of the node we expected "
        "(wrong address, or another node answering there)",
    ),
    ("CERTIFICATE_REQUIRED", "the node requires a client certificate and none was sent"),
    ("CERTIFICATE_EXPIRED", "the node refused our certificate: it has expired"),
    ("UNKNOWN_CA", "the certificate is not from the federation CA"),
    ("CERTIFICATE_UNKNOWN", "the node refused our certificate"),
    ("BAD_CERTIFICATE", "the node refused our certificate"),
    ("CERTIFICATE_VERIFY_FAILED", "the node's certificate is not trusted by our federation CA"),
    ("HANDSHAKE_FAILURE", "the TLS handshake failed (certificate not accepted)"),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code a server answers ``exc`` with: its class's row, else its
    nearest ancestor's; anything that is not a YigongError (a bug) is INTERNAL."""
    for cls in type(exc).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def tls_hint(details: str) -> str | None:
    """A readable reason for a TLS handshake failure in a gRPC error text, if any."""
    upper = details.upper()
    if "FAILED TO CONNECT" in upper and "SOCKET CLOSED" in upper:
        return _HANDSHAKE_CLOSED
    for marker, hint in _TLS_HINTS:
        if marker in upper:
            return hint
    return None


def error_from_rpc(exc: grpc.RpcError, target: str, call: str = "") -> e.YigongError:
    """Translate a client-side RPC failure of ``call`` (a name like ``"Offer"``, or "")
    against ``target`` into a YigongError. Call sites use :mod:`gateway.rpc.call`."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    hint = tls_hint(details) if code == grpc.StatusCode.UNAVAILABLE else None
    if hint is not None:
        return e.AuthenticationError(f"{target}: {hint} ({details})")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return e.ValidationError(
            f"{target} does not offer {call or 'this call'} ({details}): it is a node of "
            "another role (hospital/factory) or of an older version"
        )
    cls = _ERRORS.get(code, e.YigongError)
    to = f" to {call}" if call else ""
    return cls(f"{target} answered {code.name}{to}: {details}")
