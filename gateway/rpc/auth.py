"""Per-call authentication and authorization for the node's gRPC server.

TLS with a required client certificate is the first gate (no certificate,
or one from another CA, does not get past the handshake); the node's own TLS
terminator (:mod:`gateway.rpc.terminator`) runs it and reports each refusal
here to be audited (:meth:`Gatekeeper.refused_handshake`). TLS checks
validity only at the handshake and knows no CRL, so this interceptor checks
the caller's certificate on *every* call — issuer, validity period,
revocation — reads the identity from it, and asks the one decision point
(:func:`gateway.authz.authorize`) whether that identity may call the method.
Refusals are audited and answered with UNAUTHENTICATED or PERMISSION_DENIED
and a message saying why.

This happens once per call: :meth:`Gatekeeper.check` reads the client certificate
(the one place it is read, :meth:`Gatekeeper._connection`), verifies it, authorizes
the method and keeps the result as the call's :class:`~gateway.authz.RequestContext`;
servicers take the verified identity, certificate and remote address from it
(:meth:`Gatekeeper.request`, and :meth:`~Gatekeeper.identity`/:meth:`~Gatekeeper.remote`
which read it) and hand it to the domain, which asks :func:`gateway.authz.authorize`
for its own actions.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import grpc
from cryptography import x509

from gateway.audit import AuditLog
from gateway.authz import NodeSelf, RequestContext, authorize, principal_of
from gateway.errors import (
    AuthenticationError,
    AuthError,
    CertificateError,
    NotReady,
    PKIError,
    YigongError,
)
from gateway.identity import URN_PREFIX, Identity
from gateway.pki import TrustStore
from gateway.rpc.status import status_for
from gateway.rpc.terminator import Caller, HandshakeRefusal

log = logging.getLogger(__name__)

T = TypeVar("T")


class Gatekeeper:
    """Verifies each call's caller once and keeps the result as the call's
    :class:`~gateway.authz.RequestContext` (servicers read it with :meth:`request`)."""

    def __init__(
        self,
        trust: TrustStore,
        node: NodeSelf,
        audit: AuditLog,
        callers: Callable[[str], Caller | None] | None = None,
    ) -> None:
        self.trust = trust
        self.node = node
        self.audit = audit
        # With the node's own TLS terminator in front (gateway.rpc.terminator), the
        # caller's certificate is looked up by the internal connection's address;
        # otherwise it is in gRPC's auth context.
        self.callers = callers
        # The verified context of each call in flight, made once by check().
        self._calls: weakref.WeakKeyDictionary[grpc.ServicerContext, RequestContext] = (
            weakref.WeakKeyDictionary()
        )
        self._calls_lock = threading.Lock()

    def _connection(self, context: grpc.ServicerContext) -> tuple[bytes | None, str]:
        """The one place the client certificate (PEM, not yet verified) and the caller's
        network address (its own, not the terminator's loopback one) are read."""
        if self.callers is not None:
            caller = self.callers(context.peer())
            if caller is None:
                return None, context.peer()
            return caller.cert_pem, caller.remote
        pems: list[bytes] | bytes = context.auth_context().get("x509_pem_cert") or []
        pem = bytes(pems[0]) if pems and isinstance(pems, list) else None
        return pem, context.peer()

    def _verify(self, pem: bytes | None) -> Identity:
        """The verified identity of ``pem`` (raises AuthError/CertificateError/PKIError)."""
        if pem is None and self.callers is not None:
            raise AuthenticationError(
                f"connection to node {self.node.node_id} did not come through its TLS port; "
                "connect to the node's public address with a federation certificate"
            )
        if pem is None:
            raise AuthenticationError(
                f"no client certificate presented to node {self.node.node_id}; "
                "connect with a certificate issued by the federation CA"
            )
        return self.trust.verify_pem(pem)

    def request(self, context: grpc.ServicerContext) -> RequestContext:
        """The call's verified :class:`RequestContext`, made by :meth:`check` at the edge.

        A call that did not pass :meth:`check` (a servicer served without
        :class:`AuthInterceptor`) gets its certificate verified here, once."""
        with self._calls_lock:
            found = self._calls.get(context)
        if found is not None:
            return found
        pem, remote = self._connection(context)
        caller = self._verify(pem)
        ctx = RequestContext(
            caller, self.node, remote, "", principal_of(caller, self.node), pem or b""
        )
        with self._calls_lock:
            self._calls[context] = ctx
        return ctx

    def client_pem(self, context: grpc.ServicerContext) -> bytes | None:
        """The client certificate (PEM) of the call, as verified for its context."""
        with self._calls_lock:
            found = self._calls.get(context)
        return found.cert_pem if found is not None else self._connection(context)[0]

    def remote(self, context: grpc.ServicerContext) -> str:
        """The caller's network address (its own, not the terminator's loopback one)."""
        with self._calls_lock:
            found = self._calls.get(context)
        return found.remote if found is not None else self._connection(context)[1]

    def identity(self, context: grpc.ServicerContext) -> Identity:
        """The verified identity of the caller (raises AuthError/CertificateError); the
        one verified at the edge for this call (:meth:`request`)."""
        return self.request(context).identity

    def certificate_pem(self, context: grpc.ServicerContext) -> bytes:
        """PEM of the caller's verified certificate."""
        pem = self.request(context).cert_pem
        if not pem:
            raise AuthenticationError(f"no client certificate presented to {self.node.node_id}")
        return pem

    def check(self, context: grpc.ServicerContext, method: str) -> RequestContext:
        """Verify the caller's certificate (issuer, validity, revocation) and ask
        :func:`~gateway.authz.authorize` whether it may call ``method``; keep the result
        as the call's context, or audit and abort."""
        pem, remote = self._connection(context)
        try:
            caller = self._verify(pem)
        except (AuthError, CertificateError) as exc:
            self._refuse(context, "auth.refused", None, method, exc, remote, _presented(pem))
            raise AssertionError("unreachable") from exc
        except PKIError as exc:  # e.g. the CRL is unusable: fail closed
            log.error("cannot check certificates: %s", exc)
            public = NotReady(
                f"node {self.node.node_id} cannot check certificate revocation: its revocation "
                "list is unusable; calls are refused until its operator installs the "
                "federation CA's current crl.pem"
            )
            self._refuse(context, "auth.refused", None, method, public, remote, _presented(pem))
            raise AssertionError("unreachable") from exc
        try:
            principal = authorize(caller, method, self.node)
        except AuthError as exc:
            self._refuse(context, "authz.refused", caller, method, exc, remote)
            raise AssertionError("unreachable") from exc
        assert pem is not None  # _verify refused a call without one
        ctx = RequestContext(caller, self.node, remote, method, principal, pem)
        with self._calls_lock:
            self._calls[context] = ctx
        return ctx

    def refused_handshake(self, refusal: HandshakeRefusal) -> None:
        """Audit a certificate the node's TLS terminator refused during the handshake."""
        details: dict[str, str] = {
            "stage": "tls_handshake",
            "remote": refusal.remote,
            "reason": type(refusal.error).__name__,
            "refusal": refusal.kind,
            "detail": str(refusal.error)[:400],
        }
        if refusal.cert is not None:
            details.update(certificate_facts(refusal.cert))
            details["cert_issuer"] = refusal.cert.issuer.rfc4514_string()[:200]
        try:
            self.audit.record("auth.refused", outcome="failure", details=details)
        except YigongError:
            log.exception("could not audit the TLS handshake refused to %s", refusal.remote)

    def _refuse(
        self,
        context: grpc.ServicerContext,
        event: str,
        caller: Identity | None,
        method: str,
        exc: YigongError,
        peer: str,
        presented: dict[str, str] | None = None,
    ) -> None:
        log.warning("refused %s from %s: %s", method, peer, exc)
        try:
            self.audit.record(
                event,
                actor=caller.label() if caller else None,
                outcome="failure",
                details={
                    "method": method,
                    "remote": peer,
                    "reason": type(exc).__name__,
                    **(presented or {}),
                },
            )
        except YigongError:
            log.exception("could not audit refusal of %s", method)
        context.abort(status_for(exc), str(exc))

    def audit_refusal(
        self, context: grpc.ServicerContext, event: str, method: str, exc: YigongError
    ) -> None:
        """Audit a request refused after authorization: who (identity, certificate serial
        and subject), what (the method) and why (error class and message)."""
        caller: Identity | None
        try:
            ctx = self.request(context)
            caller, remote, pem = ctx.identity, ctx.remote, ctx.cert_pem
        except YigongError:
            caller = None
            pem_or_none, remote = self._connection(context)
            pem = pem_or_none or b""
        log.warning("refused %s from %s: %s", method, remote, exc)
        try:
            self.audit.record(
                event,
                actor=caller.label() if caller else None,
                outcome="failure",
                peer=caller.subject_id if caller is not None and caller.is_node else None,
                details={
                    "method": method,
                    "remote": remote,
                    "reason": type(exc).__name__,
                    "why": str(exc)[:500],
                    **_presented(pem or None),
                },
            )
        except YigongError:
            log.exception("could not audit refusal of %s", method)


def _presented(pem: bytes | None) -> dict[str, str]:
    """Serial, subject and kind of the certificate a caller presented (for audit)."""
    if pem is None:
        return {}
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return {"cert_serial": "unparseable"}
    return certificate_facts(cert)


_AUDITED_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED})


@contextmanager
def refusals_audited(
    gate: Gatekeeper, context: grpc.ServicerContext, method: str, event: str
) -> Iterator[None]:
    """Audit every request refused as malformed (INVALID_ARGUMENT) or over a per-peer
    limit (RESOURCE_EXHAUSTED) as ``event``, then let :func:`wire_errors` answer it."""
    try:
        yield
    except YigongError as exc:
        if status_for(exc) in _AUDITED_CODES:
            gate.audit_refusal(context, event, method, exc)
        raise


def certificate_facts(cert: x509.Certificate) -> dict[str, str]:
    """Serial and subject of a refused certificate, read without trusting it (for audit)."""
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    kind = "person" if any(u.startswith(f"{URN_PREFIX}person:") for u in uris) else "node"
    return {
        "cert_serial": f"{cert.serial_number:x}",
        "cert_subject": str(cns[0].value) if cns else "",
        "cert_kind": kind,
    }


class AuthInterceptor(grpc.ServerInterceptor):
    """Runs :meth:`Gatekeeper.check` before every handler."""

    def __init__(self, gate: Gatekeeper) -> None:
        self.gate = gate

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        gate = self.gate

        def guard(inner: Callable[..., Any] | None) -> Callable[..., Any]:
            assert inner is not None

            def behavior(request: Any, context: grpc.ServicerContext) -> Any:
                gate.check(context, method)
                return inner(request, context)

            return behavior

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                guard(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                guard(handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            guard(handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )


@contextmanager
def wire_errors(context: grpc.ServicerContext, what: str) -> Iterator[None]:
    """Answer domain errors with their status code; never leak a traceback to the caller.

    Code inside the block must not call ``context.abort`` itself.
    """
    try:
        yield
    except YigongError as exc:
        context.abort(status_for(exc), str(exc))
    except Exception:
        log.exception("internal error in %s", what)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {what}; see the node's log")


def stream_with_errors(context: grpc.ServicerContext, what: str, items: Iterator[T]) -> Iterator[T]:
    """Like :func:`wire_errors` for response streams (errors raised while iterating)."""
    with wire_errors(context, what):
        yield from items
