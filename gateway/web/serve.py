"""Build and start a node's console: the core's pages, the role's pages, the server."""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography import x509

from gateway.audit import AuditLog, VerifyReport
from gateway.authz import NodeSelf
from gateway.config import NodeConfig
from gateway.gate import Gate
from gateway.pki import TrustStore, verify_signature
from gateway.query import QueryService
from gateway.roles import RoleHooks
from gateway.rpc.peer_records import reconcile_peers
from gateway.rpc.terminator import Caller, HandshakeRefusal
from gateway.web.app import Console
from gateway.web.cases import CaseServices, case_pages
from gateway.web.officer import OfficerServices, core_pages
from gateway.web.server import ConsoleServer

log = logging.getLogger(__name__)


def start_console(
    config: Callable[[], NodeConfig],
    *,
    gate: Gate,
    trust: TrustStore,
    cert_pem: bytes,
    key_pem: bytes,
    audit: AuditLog,
    query: QueryService,
    hooks: RoleHooks,
    cases: CaseServices | None = None,
) -> ConsoleServer:
    """Start the console of a node on ``[console] listen``; returns the running server.

    ``cases``: the case workflow (its pages: :mod:`gateway.web.cases`)."""
    cfg = config()
    c = cfg.console
    server: ConsoleServer | None = None

    def callers(peer: str) -> Caller | None:
        return server.caller(peer) if server is not None else None

    console = Console(
        node=NodeSelf(cfg.node.id, cfg.node.role),
        gate=gate,
        callers=callers,
        audit=audit,
        page_size=c.page_size,
    )
    node_cert = x509.load_pem_x509_certificate(cert_pem)

    def verify() -> VerifyReport:
        """The whole chain and every checkpoint, signatures checked with the node's
        certificate (what ``yigong audit verify`` does)."""
        return audit.verify(lambda data, sig: verify_signature(node_cert, data, sig))

    officer = OfficerServices(
        config=config,
        query=query,
        audit=audit,
        verify=verify,
        reconcile=reconcile_peers,
    )
    parts = [core_pages(console, officer)]
    if cases is not None:
        parts.append(case_pages(console, cases))
    parts.extend(hooks.console_pages(console))
    app = console.app(parts)

    def refused(refusal: HandshakeRefusal) -> None:
        gate.refused_handshake(refusal)

    server = ConsoleServer(
        app,
        c.listen,
        cert_pem=cert_pem,
        key_pem=key_pem,
        trust=trust,
        on_refused=refused,
        max_pending=c.max_pending_handshakes,
        max_pending_per_address=c.max_pending_handshakes_per_address,
        idle_seconds=c.idle_seconds,
        proxy_from=cfg.server.proxy_protocol_from,
    )
    port = server.start()
    log.info("web console of node %s on https://%s", cfg.node.id, _url_host(c.listen, port))
    return server


def _url_host(listen: str, port: int) -> str:
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("0.0.0.0", "::", "*", ""):
        host = "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
