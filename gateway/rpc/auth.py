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

from gateway.audit import AuditLog
from gateway.authz import NodeSelf, RequestContext, principal_of
from gateway.errors import AuthenticationError, YigongError
from gateway.gate import Gate, presented
from gateway.identity import Identity
from gateway.pki import TrustStore
from gateway.rpc.status import status_for
from gateway.rpc.terminator import Caller

log = logging.getLogger(__name__)

T = TypeVar("T")


class Gatekeeper(Gate):
    """Verifies each call's caller once (:meth:`Gate.admit`, the one gatekeeper of the
    node's edges) and keeps the result as the call's
    :class:`~gateway.authz.RequestContext` (servicers read it with :meth:`request`)."""

    def __init__(
        self,
        trust: TrustStore,
        node: NodeSelf,
        audit: AuditLog,
        callers: Callable[[str], Caller | None] | None = None,
    ) -> None:
        super().__init__(trust, node, audit)
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

    def request(self, context: grpc.ServicerContext) -> RequestContext:
        """The call's verified :class:`RequestContext`, made by :meth:`check` at the edge.

        A call that did not pass :meth:`check` (a servicer served without
        :class:`AuthInterceptor`) gets its certificate verified here, once."""
        with self._calls_lock:
            found = self._calls.get(context)
        if found is not None:
            return found
        pem, remote = self._connection(context)
        caller = self.verify(pem, behind_terminator=self.callers is not None)
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
        """Admit the call (:meth:`Gate.admit`: certificate verified — issuer, validity,
        revocation — and ``method`` authorized, refusals audited); keep the result as the
        call's context, or abort with the refusal's status."""
        pem, remote = self._connection(context)
        try:
            ctx = self.admit(pem, remote, method, behind_terminator=self.callers is not None)
        except YigongError as exc:
            context.abort(status_for(exc), str(exc))
            raise AssertionError("unreachable") from exc
        with self._calls_lock:
            self._calls[context] = ctx
        return ctx

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
        self.record_refusal(event, caller, method, exc, remote, presented(pem or None), why=True)


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
