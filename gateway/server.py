"""The running node: its services (built by the composition root, :mod:`yigong_node`)
behind one mTLS gRPC port with health and reflection; start and graceful stop."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import __version__
from gateway.audit import AuditLog
from gateway.audit_witness import WitnessSender, WitnessStore
from gateway.authz import NodeSelf
from gateway.cases import CaseService
from gateway.catalog import Catalog
from gateway.config import LiveConfig, NodeConfig
from gateway.errors import ConfigError
from gateway.exchange import Exchange
from gateway.fidelity.formats import (
    DesignFactsCache,
)
from gateway.node_setup import NodeKeys
from gateway.query import QueryService
from gateway.roles import RoleHooks
from gateway.rpc.auth import AuthInterceptor, Gatekeeper
from gateway.rpc.cases_service import SERVICE_NAME as CASE_SERVICE_NAME
from gateway.rpc.cases_service import add_case_service
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.servicers import ExchangeServicer, QueryServicer, TransferServicer
from gateway.rpc.terminator import HandshakeRefusal, TlsTerminator
from gateway.rpc.witness import SERVICE_NAME as AUDIT_SERVICE_NAME
from gateway.rpc.witness import AuditServicer
from gateway.storage import ObjectStore
from gateway.syslog_tls import AtnaForwarder
from gateway.telemetry import Telemetry
from gateway.transfer.janitor import SpoolJanitor
from gateway.transfer.outbox import Outbox
from gateway.transfer.receiver import Receiver
from gateway.web.cases import CaseServices
from gateway.web.serve import start_console
from gateway.web.server import ConsoleServer
from yigong.v1 import (
    audit_pb2_grpc,
    exchange_pb2,
    exchange_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    transfer_pb2,
    transfer_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    CASE_SERVICE_NAME,
    AUDIT_SERVICE_NAME,
    transfer_pb2.DESCRIPTOR.services_by_name["Transfer"].full_name,
    exchange_pb2.DESCRIPTOR.services_by_name["Exchange"].full_name,
    query_pb2.DESCRIPTOR.services_by_name["Query"].full_name,
)


class Node:
    """One running gateway node (hospital or factory): its services, as the composition
    root (:func:`yigong_node.compose.build_node`) built them in dependency order, and their
    lifecycle — one mTLS gRPC port, start and a graceful stop.

    Nothing here builds a domain service or knows a role: the role's object is
    ``hooks`` (a :class:`~gateway.roles.RoleHooks`), called at fixed points.
    """

    def __init__(
        self,
        config: LiveConfig,
        *,
        keys: NodeKeys,
        telemetry: Telemetry,
        audit: AuditLog,
        previous_run: Mapping[str, str | int],
        atna: AtnaForwarder | None,
        store: ObjectStore,
        catalog: Catalog,
        witness_store: WitnessStore,
        witness_sender: WitnessSender,
        client_credentials: ClientCredentials,
        outbox: Outbox,
        receiver: Receiver,
        exchange: Exchange,
        janitor: SpoolJanitor,
        query: QueryService,
        cases: CaseService,
        design_facts: DesignFactsCache,
        check_design_file: Callable[[Path, str, str], None],
        hooks: RoleHooks,
    ) -> None:
        self._config = config
        self.keys = keys
        self.trust, self.identity = keys.trust, keys.identity
        self.cert_pem, self.key_pem, self.ca_pem = keys.cert_pem, keys.key_pem, keys.ca_pem
        self.telemetry = telemetry
        self.audit = audit
        self._previous_run = dict(previous_run)
        self.atna = atna
        self.store = store
        self.catalog = catalog
        self.witness_store = witness_store
        self.witness_sender = witness_sender
        self.client_credentials = client_credentials
        self.outbox = outbox
        self.receiver = receiver
        self.exchange = exchange
        self.janitor = janitor
        self.query = query
        self.cases = cases
        self.design_facts = design_facts
        self.check_design_file = check_design_file
        self.hooks = hooks
        self.gate: Gatekeeper | None = None  # made by start(), with the TLS terminator
        self._server: grpc.Server | None = None
        self._terminator: TlsTerminator | None = None
        self._console: ConsoleServer | None = None
        self.console_port = 0
        self._health: health.HealthServicer | None = None
        self._stopped = threading.Event()
        self.port = 0

    @property
    def cfg(self) -> NodeConfig:
        """The configuration in force (what peer links and the PACS export read)."""
        return self._config()

    @cfg.setter
    def cfg(self, cfg: NodeConfig) -> None:
        self._config.replace(cfg)

    def _audit_config(self) -> None:
        """Record the configuration in force (its SHA-256) and whether it changed since
        the previous start: configuration changes are security-relevant events."""
        digest = hashlib.sha256(self.cfg.source.read_bytes()).hexdigest()
        previous = [
            e.details.get("config_sha256")
            for e in self.audit.events(event="config.loaded", limit=100_000)
            if e.details.get("scope") == "node"
        ]
        self.audit.record(
            "config.loaded",
            actor=f"node:{self.cfg.node.id}",
            details={
                "scope": "node",
                "config_sha256": digest,
                "changed": bool(previous) and previous[-1] != digest,
                "first_start": not previous,
            },
        )

    def sign(self, data: bytes) -> bytes:
        return self.keys.sign(data)

    def start(self) -> int:
        """Bind, start serving and start the outbox; returns the bound port."""
        cfg = self.cfg
        terminator = self._terminator_for(cfg) if cfg.server.tls_terminator == "gateway" else None
        # With the node's own TLS terminator in front, the gatekeeper finds each caller's
        # certificate by the terminator's internal connection (gateway.rpc.auth).
        gate = Gatekeeper(
            self.trust,
            NodeSelf(cfg.node.id, cfg.node.role),
            self.audit,
            callers=terminator.caller if terminator is not None else None,
        )
        self.gate = gate
        try:
            return self._start(cfg, gate, terminator)
        except BaseException:
            if terminator is not None and self._terminator is None:
                terminator.stop()  # never started serving: nothing to drain
            raise

    def _terminator_for(self, cfg: NodeConfig) -> TlsTerminator:
        """The node's own TLS terminator for the public port (not yet listening)."""

        def refused(refusal: HandshakeRefusal) -> None:
            if self.gate is not None:
                self.gate.refused_handshake(refusal)

        return TlsTerminator(
            cfg.server.listen,
            cert_pem=self.cert_pem,
            key_pem=self.key_pem,
            trust=self.trust,
            on_refused=refused,
            max_pending=cfg.server.max_pending_handshakes,
            max_pending_per_address=cfg.server.max_pending_handshakes_per_address,
            proxy_from=cfg.server.proxy_protocol_from,
        )

    def _start(self, cfg: NodeConfig, gate: Gatekeeper, terminator: TlsTerminator | None) -> int:
        options = [
            ("grpc.max_receive_message_length", cfg.server.max_message_bytes),
            ("grpc.max_send_message_length", cfg.server.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            ThreadPoolExecutor(max_workers=cfg.server.max_workers, thread_name_prefix="rpc"),
            interceptors=[self.telemetry.server_interceptor(), AuthInterceptor(gate)],
            options=options,
        )
        transfer_pb2_grpc.add_TransferServicer_to_server(
            TransferServicer(gate, self.receiver), server
        )
        exchange_pb2_grpc.add_ExchangeServicer_to_server(
            ExchangeServicer(gate, self.exchange), server
        )
        query_pb2_grpc.add_QueryServicer_to_server(QueryServicer(gate, self.query), server)
        add_case_service(server, gate, self.cases)
        audit_pb2_grpc.add_AuditServicer_to_server(
            AuditServicer(gate, self.witness_store), server
        )
        self.hooks.add_services(server, gate)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = (*SERVICE_NAMES, *self.hooks.service_names)
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.janitor.sweep_at_start()  # before any upload or push can start
        port = self._listen(server, terminator)
        self._server = server
        self.port = port
        for name in ("", *services):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.outbox.start()
        self.janitor.start()
        self.cases.resume()  # records appended but not yet queued (a stop in between)
        self.hooks.start()
        self.audit.record(
            "node.start",
            actor=f"node:{cfg.node.id}",
            details={
                "version": __version__,
                "listen": cfg.server.listen,
                "port": port,
                "store": self.store.describe(),
                "pid": os.getpid(),
                **self._previous_run,  # "crash": entries since were signed at start-up
            },
        )
        self._audit_config()
        if cfg.console.enabled:
            self._console = start_console(
                self._config,
                gate=gate,
                trust=self.trust,
                cert_pem=self.cert_pem,
                key_pem=self.key_pem,
                audit=self.audit,
                query=self.query,
                hooks=self.hooks,
                cases=CaseServices(self.cases, self.store, self.catalog, self.design_facts),
            )
            self.console_port = self._console.port
        self.witness_sender.start()
        if self.atna is not None:
            self.atna.start()
        log.info(
            "node %s (%s, region %s) listening on port %d, store %s",
            cfg.node.id,
            cfg.node.role,
            cfg.node.region,
            port,
            self.store.describe(),
        )
        return port

    def _listen(self, server: grpc.Server, terminator: TlsTerminator | None) -> int:
        """Open the node's one public port and start serving; returns the port.

        ``server.tls_terminator = "gateway"`` (default): the node's own TLS terminator
        holds the public port, audits every refused client certificate and forwards
        accepted connections to the gRPC server on a loopback-only port.
        ``"grpc"``: gRPC's TLS holds the port (handshake refusals are not audited).
        """
        cfg = self.cfg
        if terminator is not None:
            if server.add_insecure_port(terminator.backend_address) == 0:
                terminator.stop()
                raise ConfigError(
                    f"{cfg.source}: cannot open gRPC's internal socket {terminator.backend_address}"
                )
            server.start()
            try:
                port = terminator.start()
            except ConfigError as exc:
                server.stop(0)
                terminator.stop()
                raise ConfigError(f"{cfg.source}: {exc}") from exc
            self._terminator = terminator
            return port
        creds = grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.ca_pem,
            require_client_auth=True,
        )
        try:
            port = server.add_secure_port(cfg.server.listen, creds)
        except RuntimeError as exc:
            reason = str(exc).split(";")[0]  # drop gRPC's "set GRPC_VERBOSITY" advice
            raise ConfigError(
                f"{cfg.source}: cannot listen on {cfg.server.listen}: {reason}; is another "
                "process using the port, or is the address not one of this host's? "
                "([server] listen)"
            ) from exc
        if port == 0:
            raise ConfigError(
                f"{cfg.source}: cannot listen on {cfg.server.listen}; is the port in use?"
            )
        server.start()
        return port

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new calls, let in-flight transfers finish for ``grace``
        seconds, then cancel them (their verified bytes stay spooled for resume)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.cfg.server.grace_seconds if grace is None else grace
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._console is not None:
            self._console.stop()
        self.hooks.stop()
        self.outbox.stop(timeout=grace)
        if self._terminator is not None:
            self._terminator.close_listener()  # no new connections; open ones go on
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._terminator is not None:
            self._terminator.stop()
        self.janitor.stop()
        self.receiver.close()
        self.audit.record("node.stop", actor=f"node:{self.cfg.node.id}")
        self.witness_sender.stop(timeout=min(3.0, max(grace, 0.5)))  # signs and hands over
        if self.atna is not None:
            self.atna.stop()
        self.audit.close()
        self.witness_store.close()
        self.catalog.close()
        self.telemetry.shutdown()
        log.info("node %s stopped", self.cfg.node.id)

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()


def write_ready_file(path: Path, payload: str) -> None:
    """Atomically write the ready file a supervisor or test waits for."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(payload)
    os.replace(tmp, path)
