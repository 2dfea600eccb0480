"""Node process wiring: configuration → PKI, storage, catalog, audit, transfer,
query → one mTLS gRPC port with health and reflection."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import grpc
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway import __version__
from gateway.audit import AuditLog
from gateway.audit_witness import WitnessLink, WitnessSender, WitnessStore
from gateway.authz import NodeSelf
from gateway.cases import CaseService, case_facts_hook
from gateway.cases.grpc_service import SERVICE_NAME as CASE_SERVICE_NAME
from gateway.cases.grpc_service import add_case_service
from gateway.catalog import Catalog
from gateway.config import NodeConfig
from gateway.errors import CertificateError, ConfigError, ResidencyViolation
from gateway.exchange import Exchange
from gateway.fidelity.formats import (
    DesignFactsCache,
    is_design_media_type,
    validate_design_file,
)
from gateway.hashing import MAX_CHUNK_BYTES
from gateway.pki import TrustStore, load_certificate, load_private_key, sign
from gateway.query import QueryService
from gateway.roles import RoleHooks
from gateway.rpc.auth import AuthInterceptor, Gatekeeper
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.peer_link import GrpcPeerLink
from gateway.rpc.servicers import ExchangeServicer, QueryServicer, TransferServicer
from gateway.rpc.terminator import TlsTerminator
from gateway.rpc.witness import SERVICE_NAME as AUDIT_SERVICE_NAME
from gateway.rpc.witness import AuditServicer, GrpcWitnessLink
from gateway.storage import ObjectStore
from gateway.storage.factory import open_store
from gateway.syslog_tls import AtnaForwarder, SyslogTLSSender, default_state_file
from gateway.telemetry import Telemetry
from gateway.transfer.janitor import SpoolJanitor
from gateway.transfer.model import Announce
from gateway.transfer.outbox import Outbox, OutboxSettings, PeerLink
from gateway.transfer.receiver import Receiver, ReceiverSettings
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
    """One running gateway node (hospital or factory)."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        node_id = cfg.node.id
        self.trust = TrustStore(cfg.tls.ca, cfg.tls.crl)
        cert = load_certificate(cfg.tls.cert)
        self._key = load_private_key(cfg.tls.key)
        try:
            me = self.trust.verify(cert)
        except CertificateError as exc:
            raise ConfigError(
                f"{cfg.source}: this node's own certificate {cfg.tls.cert}: {exc}"
            ) from exc
        claimed = (me.kind, me.subject_id, me.role, me.region)
        wanted = ("node", node_id, cfg.node.role, cfg.node.region)
        if claimed != wanted:
            raise ConfigError(
                f"{cfg.source}: certificate {cfg.tls.cert} asserts {me.kind} {me.subject_id!r}, "
                f"role {me.role!r}, region {me.region!r}, but the configuration says node "
                f"{node_id!r}, role {cfg.node.role!r}, region {cfg.node.region!r}"
            )
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        enc = serialization.Encoding.DER
        if self._key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(
            enc, pub
        ):
            raise ConfigError(f"{cfg.source}: key {cfg.tls.key} does not belong to {cfg.tls.cert}")
        self.identity = me
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.key_pem = cfg.tls.key.read_bytes()
        self.ca_pem = cfg.tls.ca.read_bytes()
        cfg.data_dir.mkdir(parents=True, exist_ok=True)

        tel = cfg.telemetry
        self.telemetry = Telemetry(
            node_id,
            cfg.node.role,
            otlp_endpoint=tel.otlp_endpoint,
            otlp_insecure=tel.otlp_insecure,
            metrics_interval_seconds=tel.metrics_interval_seconds,
        )
        self.audit = AuditLog(
            cfg.audit.path,
            node_id,
            signer=self.sign,
            checkpoint_every=cfg.audit.checkpoint_every,
        )
        last = self.audit.events(limit=1, newest=True)
        self._previous_run: dict[str, str | int] = {
            "previous_stop": "first start"
            if not last
            else ("clean" if last[0].event == "node.stop" else "crash"),
            "previous_head": last[0].seq if last else 0,
        }
        self.atna: AtnaForwarder | None = None
        if (a := cfg.atna).enabled:
            sender = SyslogTLSSender(
                a.host,
                a.port,
                ca=a.ca or cfg.tls.ca,
                cert=a.cert or cfg.tls.cert,
                key=a.key or cfg.tls.key,
                hostname=node_id,
                facility=a.facility,
            )
            self.atna = AtnaForwarder(
                cfg.audit.path,
                node_id,
                self.trust.federation_name,
                sender,
                default_state_file(cfg.audit.path),
                poll_seconds=a.poll_seconds,
                peer_addresses={p.id: p.address for p in cfg.peers},
            )
        try:
            self.store = open_store(cfg)
            try:
                self.store.check()
            except ResidencyViolation as exc:  # a bucket would be created in a forbidden region
                self._storage_region_refused(cfg.storage.s3.region or "us-east-1", exc)
            self._check_storage_region()
            self.catalog = Catalog(cfg.catalog.path)
            self.witness_store = WitnessStore(cfg.audit.path, self.audit)
        except BaseException:
            self.audit.close()
            raise
        self.witness_sender = WitnessSender(
            self.audit,
            [p.id for p in cfg.peers],
            self._witness_link,
            interval=cfg.audit.checkpoint_seconds,
            witness=cfg.audit.witness,
            timeout=cfg.transfer.connect_timeout_seconds,
        )
        self.client_credentials = ClientCredentials(self.ca_pem, self.cert_pem, self.key_pem)
        t = cfg.transfer
        self.outbox = Outbox(
            OutboxSettings(
                node_id=node_id,
                chunk_bytes=t.chunk_bytes,
                retry_initial_seconds=t.retry_initial_seconds,
                retry_max_seconds=t.retry_max_seconds,
                max_bytes_per_second=t.max_bytes_per_second,
                workers=t.workers,
                known_peers=frozenset(p.id for p in cfg.peers),
                allowed_peer_regions=cfg.peer_regions,
            ),
            self.store,
            self.catalog,
            self.audit,
            self.trust,
            self._link,
        )
        self.receiver = Receiver(
            ReceiverSettings(
                node_id=node_id,
                spool_dir=cfg.data_dir / "spool" / "inbound",
                # chunks as large as any sender may use, but never beyond what one
                # message of server.max_message_bytes carries
                max_chunk_bytes=min(
                    max(t.chunk_bytes, MAX_CHUNK_BYTES), cfg.server.max_message_bytes - 64 * 1024
                ),
                max_object_bytes=t.max_object_bytes,
                max_open_per_peer=t.max_open_inbound_per_peer,
                max_spooled_bytes_per_peer=t.max_spooled_bytes_per_peer,
            ),
            self.store,
            self.catalog,
            self.audit,
            self.sign,
            self.cert_pem,
        )
        self.exchange = Exchange(
            node_id,
            self.store,
            self.catalog,
            self.audit,
            self.outbox,
            cfg.data_dir / "spool" / "submit",
            t.max_object_bytes,
        )
        self.janitor = SpoolJanitor(
            self.receiver, cfg.data_dir / "spool" / "submit", t.inbound_expiry_seconds
        )
        self.query = QueryService(node_id, self.catalog, self.store, self.audit, t.chunk_bytes)
        self.hooks: RoleHooks = _role_hooks(self)
        self.outbox.hooks = self.hooks
        self.query.settle = self.hooks.settle
        self.outbox.telemetry = self.receiver.telemetry = self.telemetry
        self.cases = CaseService.from_node(self)
        self.design_facts = DesignFactsCache(
            spool_dir=cfg.data_dir / "spool" / "design",
            max_mesh_bytes=cfg.design.max_mesh_bytes,
            max_mesh_triangles=cfg.design.max_mesh_triangles,
        )
        self.outbox.design_facts = self.design_facts
        self.exchange.validate_design = self.check_design_file
        self.receiver.facts_hook = case_facts_hook(self.cases, self._receipt_facts)
        self.gate = Gatekeeper(self.trust, NodeSelf(node_id, cfg.node.role), self.audit)
        self._server: grpc.Server | None = None
        self._terminator: TlsTerminator | None = None
        self._health: health.HealthServicer | None = None
        self._stopped = threading.Event()
        self.port = 0

    def _check_storage_region(self) -> None:
        """Refuse to start on storage outside the allowed regions (invariant 3)."""
        region = self.store.region() or self.cfg.node.region
        allowed = self.cfg.storage_regions
        if region in allowed:
            return
        self._storage_region_refused(
            region,
            ResidencyViolation(
                f"{self.cfg.source}: storage {self.store.describe()} is in region {region!r}, "
                "but [residency] allowed_storage_regions allows only "
                f"{', '.join(sorted(allowed))}; use storage in an allowed region or change "
                "the policy"
            ),
        )

    def _storage_region_refused(self, region: str, exc: ResidencyViolation) -> NoReturn:
        for event in ("residency.refused", "security.alert"):
            self.audit.record(
                event,
                actor=f"node:{self.cfg.node.id}",
                outcome="failure",
                details={"reason": "storage region not allowed", "region": region},
            )
        raise exc

    def _receipt_facts(self, announce: Announce, store: ObjectStore) -> Mapping[str, str]:
        """Receipt facts: design files are read by the shared fidelity checks (both roles
        receive them), everything else by the role (e.g. DICOM at the factory)."""
        if is_design_media_type(announce.media_type):
            return self.design_facts(announce.media_type, store, announce.object_id)
        return self.hooks.receipt_facts(announce, store)

    def check_design_file(self, path: Path, media_type: str, name: str) -> None:
        """The format check of a design file under this node's `[design]` limits
        (raises ValidationError naming the file and what is wrong)."""
        d = self.cfg.design
        validate_design_file(
            path,
            media_type,
            name=name,
            max_mesh_bytes=d.max_mesh_bytes,
            max_mesh_triangles=d.max_mesh_triangles,
        )

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
        return sign(self._key, data)

    def _link(self, peer_id: str) -> PeerLink:
        peer = self.cfg.peer(peer_id)
        return GrpcPeerLink(
            peer_id,
            peer.address,
            self.client_credentials,
            self.cfg.transfer.connect_timeout_seconds,
            self.telemetry,
        )

    def _witness_link(self, peer_id: str) -> WitnessLink:
        return GrpcWitnessLink(peer_id, self.cfg.peer(peer_id).address, self.client_credentials)

    def start(self) -> int:
        """Bind, start serving and start the outbox; returns the bound port."""
        cfg = self.cfg
        options = [
            ("grpc.max_receive_message_length", cfg.server.max_message_bytes),
            ("grpc.max_send_message_length", cfg.server.max_message_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.server(
            ThreadPoolExecutor(max_workers=cfg.server.max_workers, thread_name_prefix="rpc"),
            interceptors=[self.telemetry.server_interceptor(), AuthInterceptor(self.gate)],
            options=options,
        )
        transfer_pb2_grpc.add_TransferServicer_to_server(
            TransferServicer(self.gate, self.receiver), server
        )
        exchange_pb2_grpc.add_ExchangeServicer_to_server(
            ExchangeServicer(self.gate, self.exchange), server
        )
        query_pb2_grpc.add_QueryServicer_to_server(QueryServicer(self.gate, self.query), server)
        add_case_service(server, self.gate, self.cases)
        audit_pb2_grpc.add_AuditServicer_to_server(
            AuditServicer(self.gate, self.witness_store), server
        )
        self.hooks.add_services(server, self.gate)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = (*SERVICE_NAMES, *self.hooks.service_names)
        reflection.enable_server_reflection(
            (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.janitor.sweep_at_start()  # before any upload or push can start
        port = self._listen(server)
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

    def _listen(self, server: grpc.Server) -> int:
        """Open the node's one public port and start serving; returns the port.

        ``server.tls_terminator = "gateway"`` (default): the node's own TLS terminator
        holds the public port, audits every refused client certificate and forwards
        accepted connections to the gRPC server on a loopback-only port.
        ``"grpc"``: gRPC's TLS holds the port (handshake refusals are not audited).
        """
        cfg = self.cfg
        if cfg.server.tls_terminator == "gateway":
            terminator = TlsTerminator(
                cfg.server.listen,
                cert_pem=self.cert_pem,
                key_pem=self.key_pem,
                trust=self.trust,
                on_refused=self.gate.refused_handshake,
                max_pending=cfg.server.max_pending_handshakes,
                max_pending_per_address=cfg.server.max_pending_handshakes_per_address,
            )
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
            self.gate.callers = terminator.caller
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


def _role_hooks(node: Node) -> RoleHooks:
    """The hooks of this node's role (hospital_node or factory_node)."""
    if node.cfg.node.role == "hospital":
        from hospital_node.role import HospitalRole

        return HospitalRole(node)
    from factory_node.role import FactoryRole

    return FactoryRole(node)


def write_ready_file(path: Path, payload: str) -> None:
    """Atomically write the ready file a supervisor or test waits for."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(payload)
    os.replace(tmp, path)
