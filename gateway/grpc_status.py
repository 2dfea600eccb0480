"""The one translation between :mod:`gateway.errors` and gRPC status codes.

Servers: :func:`status_for` picks the code an error is answered with.
Clients: :func:`error_from_rpc` turns an :class:`grpc.RpcError` back into a
:class:`~gateway.errors.YigongError` with a message a person can act on.
"""

from __future__ import annotations

import grpc

from gateway import errors as e

_CODES: tuple[tuple[type[e.YigongError], grpc.StatusCode], ...] = (
    (e.CertificateError, grpc.StatusCode.UNAUTHENTICATED),
    (e.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (e.PKIError, grpc.StatusCode.UNAVAILABLE),  # e.g. CRL unverifiable: fail closed, retry later
    (e.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (e.OutboundRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (e.IdentifiableData, grpc.StatusCode.FAILED_PRECONDITION),
    (e.ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (e.NotFound, grpc.StatusCode.NOT_FOUND),
    (e.IntegrityError, grpc.StatusCode.DATA_LOSS),
    (e.ReceiptError, grpc.StatusCode.DATA_LOSS),
    (e.PeerUnavailable, grpc.StatusCode.UNAVAILABLE),
    (e.QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (e.ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (e.NotReady, grpc.StatusCode.UNAVAILABLE),
    (e.StorageError, grpc.StatusCode.UNAVAILABLE),
    (e.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (e.TransferError, grpc.StatusCode.ABORTED),
)

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
    """The gRPC status code a server answers ``exc`` with."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
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


def error_from_rpc(exc: grpc.RpcError, target: str) -> e.YigongError:
    """Translate a client-side RPC failure against ``target`` into a YigongError."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    hint = tls_hint(details) if code == grpc.StatusCode.UNAVAILABLE else None
    if hint is not None:
        return e.AuthenticationError(f"{target}: {hint} ({details})")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return e.ValidationError(
            f"{target} does not offer this call ({details}): it is a node of another role "
            "(hospital/factory) or of an older version"
        )
    cls = _ERRORS.get(code, e.YigongError)
    return cls(f"{target} answered {code.name}: {details}")
