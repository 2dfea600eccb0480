"""The one gatekeeper of a node's edges: verify a caller's certificate, ask the one
authorization point, audit every refusal — whatever the transport.

The gRPC port (:class:`gateway.rpc.auth.Gatekeeper`) and the web console
(:mod:`gateway.web`) both admit each call or request here: :meth:`Gate.admit` takes the
client certificate the TLS terminator (:mod:`gateway.rpc.terminator`) accepted at the
handshake and checks it again *per call* — issuer, validity period, revocation (TLS
checks validity only at the handshake and knows no CRL, so an expired or revoked
certificate is refused on the next call, even on a connection that stays open) — reads
the identity from it and asks :func:`gateway.authz.authorize` whether it may take the
action. A refusal is audited (``auth.refused`` / ``authz.refused``: who, from where, the
certificate's serial and subject, why) and raised for the transport to answer in its
own terms (a gRPC status, an HTTP status page).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from cryptography import x509

from gateway.audit import AuditLog
from gateway.authz import NodeSelf, RequestContext, authorize
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

if TYPE_CHECKING:
    from gateway.rpc.terminator import HandshakeRefusal

log = logging.getLogger(__name__)


class Gate:
    """Admits one call or request: a verified identity allowed to take the action."""

    def __init__(self, trust: TrustStore, node: NodeSelf, audit: AuditLog) -> None:
        self.trust = trust
        self.node = node
        self.audit = audit

    def verify(self, pem: bytes | None, *, behind_terminator: bool = True) -> Identity:
        """The verified identity of ``pem`` (raises AuthError/CertificateError/PKIError)."""
        if pem is None and behind_terminator:
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

    def admit(
        self, pem: bytes | None, remote: str, action: str, *, behind_terminator: bool = True
    ) -> RequestContext:
        """Verify ``pem`` and authorize ``action`` (an RPC method or a console page);
        return the call's context, or audit the refusal and raise it."""
        try:
            caller = self.verify(pem, behind_terminator=behind_terminator)
        except (AuthError, CertificateError) as exc:
            self.record_refusal("auth.refused", None, action, exc, remote, presented(pem))
            raise
        except PKIError as exc:  # e.g. the CRL is unusable: fail closed
            log.error("cannot check certificates: %s", exc)
            public = NotReady(
                f"node {self.node.node_id} cannot check certificate revocation: its revocation "
                "list is unusable; calls are refused until its operator installs the "
                "federation CA's current crl.pem"
            )
            self.record_refusal("auth.refused", None, action, public, remote, presented(pem))
            raise public from exc
        try:
            principal = authorize(caller, action, self.node)
        except AuthError as exc:
            self.record_refusal("authz.refused", caller, action, exc, remote)
            raise
        assert pem is not None  # verify() refused a call without one
        return RequestContext(caller, self.node, remote, action, principal, pem)

    def record_refusal(
        self,
        event: str,
        caller: Identity | None,
        action: str,
        exc: YigongError,
        remote: str,
        facts: dict[str, str] | None = None,
        *,
        why: bool = False,
    ) -> None:
        """Audit one refused call or request: who, from where, what, why."""
        log.warning("refused %s from %s: %s", action, remote, exc)
        details = {"method": action, "remote": remote, "reason": type(exc).__name__}
        if why:
            details["why"] = str(exc)[:500]
        try:
            self.audit.record(
                event,
                actor=caller.label() if caller else None,
                outcome="failure",
                peer=caller.subject_id if why and caller is not None and caller.is_node else None,
                details={**details, **(facts or {})},
            )
        except YigongError:
            log.exception("could not audit refusal of %s", action)

    def refused_handshake(self, refusal: HandshakeRefusal) -> None:
        """Audit a certificate a TLS terminator refused during the handshake."""
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


def presented(pem: bytes | None) -> dict[str, str]:
    """Serial, subject and kind of the certificate a caller presented (for audit)."""
    if pem is None:
        return {}
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return {"cert_serial": "unparseable"}
    return certificate_facts(cert)


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
