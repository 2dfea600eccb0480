"""Build one node: every service in dependency order, each given only what it uses.

The order (drawn in docs/architecture.md):

1. configuration in force (:class:`~gateway.config.LiveConfig`), the node's keys and
   certificate (checked), telemetry, the audit log, ATNA forwarding;
2. infrastructure: object store (residency-checked), catalog, witness store;
3. the role's hooks (:attr:`Role.hooks <gateway.roles.Role.hooks>`), from the
   infrastructure only: what the core calls (outgoing and receipt checks, receipt facts,
   case-record facts, settle);
4. the core's domain services, the hooks as constructor arguments: witness sender,
   outbox, case service, receiver (its receipt facts: case envelopes, design files, the
   role's), exchange, spool janitor, query;
5. the role's own services on top of the core (:attr:`Role.services
   <gateway.roles.Role.services>`: e.g. the hospital's release uses the outbox);
6. the :class:`~gateway.server.Node` that starts, serves and stops them.

No service is handed the node, and nothing is set on a service after it is built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.audit import AuditLog, AuditSource
from gateway.audit_witness import WitnessLink, WitnessSender, WitnessStore
from gateway.cases import CaseService, case_facts_hook
from gateway.catalog import Catalog
from gateway.config import LiveConfig, NodeConfig
from gateway.exchange import Exchange
from gateway.fidelity.formats import DesignFactsCache, is_design_media_type
from gateway.hashing import MAX_CHUNK_BYTES
from gateway.node_setup import (
    design_file_check,
    load_node_keys,
    open_checked_store,
    previous_run,
)
from gateway.query import QueryService
from gateway.roles import CoreServices, RoleContext, RoleHooks, RoleRegistry
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.peer_link import GrpcPeerLink
from gateway.rpc.witness import GrpcWitnessLink
from gateway.server import Node
from gateway.storage import ObjectStore
from gateway.syslog_tls import AtnaForwarder, SyslogTLSSender, default_state_file
from gateway.telemetry import Telemetry
from gateway.transfer.janitor import SpoolJanitor
from gateway.transfer.model import Announce
from gateway.transfer.outbox import Outbox, OutboxSettings, PeerLink
from gateway.transfer.receiver import FactsHook, Receiver, ReceiverSettings


def build_node(cfg: NodeConfig, roles: RoleRegistry | None = None) -> Node:
    """Every service of the node ``cfg`` describes, built in dependency order.

    ``roles``: the registry to find the node's role in (default: every role this program
    knows, :data:`yigong_node.roles.ROLES`); tests of the core pass one in which a role is
    :data:`gateway.roles.CORE_ONLY`.
    """
    if roles is None:
        from yigong_node.roles import ROLES

        roles = ROLES
    role = roles.get(cfg.node.role, cfg.source)
    config = LiveConfig(cfg)
    node_id = cfg.node.id

    # 1. keys, telemetry, audit
    keys = load_node_keys(cfg)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    tel = cfg.telemetry
    telemetry = Telemetry(
        node_id,
        cfg.node.role,
        otlp_endpoint=tel.otlp_endpoint,
        otlp_insecure=tel.otlp_insecure,
        metrics_interval_seconds=tel.metrics_interval_seconds,
    )
    audit = AuditLog.for_config(
        cfg, signer=keys.sign, checkpoint_every=cfg.audit.checkpoint_every
    )
    previous = previous_run(audit)
    atna = _atna(cfg, keys.trust.federation_name, audit.source)

    # 2. infrastructure
    try:
        store = open_checked_store(cfg, audit)
        catalog = Catalog.for_config(cfg)
        witness_store = WitnessStore(cfg.audit.path, audit)
    except BaseException:
        audit.close()
        raise
    credentials = ClientCredentials(keys.ca_pem, keys.cert_pem, keys.key_pem)
    check_design_file = design_file_check(config)

    try:
        # 3. the role's hooks: what the core calls
        ctx = RoleContext(
            config=config,
            identity=keys.identity,
            cert_pem=keys.cert_pem,
            sign=keys.sign,
            catalog=catalog,
            store=store,
            audit=audit,
            telemetry=telemetry,
            check_design_file=check_design_file,
        )
        hooks = role.hooks(ctx)

        # 4. the core's domain services
        t = cfg.transfer
        witness_sender = WitnessSender(
            audit,
            [p.id for p in cfg.peers],
            _witness_links(config, credentials),
            interval=cfg.audit.checkpoint_seconds,
            witness=cfg.audit.witness,
            timeout=t.connect_timeout_seconds,
        )
        design_facts = DesignFactsCache(
            spool_dir=cfg.data_dir / "spool" / "design",
            max_mesh_bytes=cfg.design.max_mesh_bytes,
            max_mesh_triangles=cfg.design.max_mesh_triangles,
        )
        outbox = Outbox(
            OutboxSettings(
                node_id=node_id,
                chunk_bytes=t.chunk_bytes,
                retry_initial_seconds=t.retry_initial_seconds,
                retry_max_seconds=t.retry_max_seconds,
                max_bytes_per_second=t.max_bytes_per_second,
                workers=t.workers,
                known_peers=frozenset(p.id for p in cfg.peers),
                allowed_peer_regions=cfg.peer_regions,
                replica_lease_seconds=cfg.database.replica_lease_seconds,
            ),
            store,
            catalog,
            audit,
            keys.trust,
            _peer_links(config, credentials, telemetry),
            hooks=hooks,
            telemetry=telemetry,
            design_facts=design_facts,
        )
        cases = CaseService(
            node_id=node_id,
            node_role=cfg.node.role,
            catalog=catalog,
            store=store,
            audit=audit,
            trust=keys.trust,
            sign=keys.sign,
            cert_pem=keys.cert_pem,
            outbox=outbox,
            facts=hooks.check_case_record,
        )
        receiver = Receiver(
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
                shared_segment_bytes=t.shared_segment_bytes,
            ),
            store,
            catalog,
            audit,
            keys.sign,
            keys.cert_pem,
            facts_hook=case_facts_hook(cases, receipt_facts(design_facts, hooks)),
            telemetry=telemetry,
        )
        submit_dir = cfg.data_dir / "spool" / "submit"
        exchange = Exchange(
            node_id,
            store,
            catalog,
            audit,
            outbox,
            submit_dir,
            t.max_object_bytes,
            validate_design=check_design_file,
            alert_on_type_refusal=hooks.alert_on_type_refusal,
        )
        janitor = SpoolJanitor(receiver, submit_dir, t.inbound_expiry_seconds)
        query = QueryService(node_id, catalog, store, audit, t.chunk_bytes, settle=hooks.settle)

        # 5. the role's own services, on top of the core
        role_services = role.services(
            hooks, ctx, CoreServices(outbox=outbox, cases=cases, exchange=exchange, query=query)
        )
    except BaseException:  # a refused role configuration: close what is open
        witness_store.close()
        catalog.close()
        audit.close()
        raise

    # 6. the running node
    return Node(
        config,
        keys=keys,
        telemetry=telemetry,
        audit=audit,
        previous_run=previous,
        atna=atna,
        store=store,
        catalog=catalog,
        witness_store=witness_store,
        witness_sender=witness_sender,
        client_credentials=credentials,
        outbox=outbox,
        receiver=receiver,
        exchange=exchange,
        janitor=janitor,
        query=query,
        cases=cases,
        design_facts=design_facts,
        check_design_file=check_design_file,
        hooks=role_services,
    )


def receipt_facts(design_facts: DesignFactsCache, hooks: RoleHooks) -> FactsHook:
    """Receipt facts: design files are read by the shared fidelity checks (both roles
    receive them), everything else by the role (e.g. DICOM at the factory)."""

    def facts(announce: Announce, store: ObjectStore) -> Mapping[str, str]:
        if is_design_media_type(announce.media_type):
            return design_facts(announce.media_type, store, announce.object_id)
        return hooks.receipt_facts(announce, store)

    return facts


def _peer_links(
    config: LiveConfig, credentials: ClientCredentials, telemetry: Telemetry
) -> Callable[[str], PeerLink]:
    """The outbox's links: to each peer's address in the configuration in force."""

    def link(peer_id: str) -> PeerLink:
        cfg = config()
        return GrpcPeerLink(
            peer_id,
            cfg.peer(peer_id).address,
            credentials,
            cfg.transfer.connect_timeout_seconds,
            telemetry,
        )

    return link


def _witness_links(
    config: LiveConfig, credentials: ClientCredentials
) -> Callable[[str], WitnessLink]:
    def link(peer_id: str) -> WitnessLink:
        return GrpcWitnessLink(peer_id, config().peer(peer_id).address, credentials)

    return link


def _atna(cfg: NodeConfig, federation: str, source: AuditSource) -> AtnaForwarder | None:
    """Forwarding of the audit log to an ATNA repository, if ``[atna]`` enables it."""
    a = cfg.atna
    if not a.enabled:
        return None
    sender = SyslogTLSSender(
        a.host,
        a.port,
        ca=a.ca or cfg.tls.ca,
        cert=a.cert or cfg.tls.cert,
        key=a.key or cfg.tls.key,
        hostname=cfg.node.id,
        facility=a.facility,
    )
    return AtnaForwarder(
        source,
        cfg.node.id,
        federation,
        sender,
        default_state_file(cfg.audit.path),
        poll_seconds=a.poll_seconds,
        peer_addresses={p.id: p.address for p in cfg.peers},
    )
