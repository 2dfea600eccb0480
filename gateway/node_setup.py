"""The checks a node makes while the composition root (:mod:`yigong_node`) builds it.

Core infrastructure, not wiring: each function takes what it checks and returns the
checked thing, or raises a :class:`~gateway.errors.ConfigError` /
:class:`~gateway.errors.ResidencyViolation` naming the configuration file and what to do.

- :func:`load_node_keys`: the node's own certificate (verified against the federation CA,
  asserting the configured node id, role and region) and the private key that belongs to it.
- :func:`open_checked_store`: the object store, refused (and audited) outside the allowed
  storage regions (invariant 3).
- :func:`previous_run`: whether the previous run stopped cleanly (for ``node.start``).
- :func:`design_file_check`: the one design-file format check under ``[design]`` limits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit import AuditLog
from gateway.config import LiveConfig, NodeConfig
from gateway.errors import CertificateError, ConfigError, ResidencyViolation
from gateway.fidelity.formats import validate_design_file
from gateway.identity import Identity
from gateway.pki import TrustStore, load_certificate, load_private_key, sign
from gateway.storage import ObjectStore
from gateway.storage.factory import open_store


@dataclass(frozen=True)
class NodeKeys:
    """The node's proven identity and its key material."""

    trust: TrustStore
    identity: Identity
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    private_key: ec.EllipticCurvePrivateKey  # the key of cert_pem

    def sign(self, data: bytes) -> bytes:
        return sign(self.private_key, data)


def load_node_keys(cfg: NodeConfig) -> NodeKeys:
    """The node's certificate and key, checked against the CA and the configuration."""
    trust = TrustStore(cfg.tls.ca, cfg.tls.crl)
    cert = load_certificate(cfg.tls.cert)
    key = load_private_key(cfg.tls.key)
    try:
        me = trust.verify(cert)
    except CertificateError as exc:
        raise ConfigError(
            f"{cfg.source}: this node's own certificate {cfg.tls.cert}: {exc}"
        ) from exc
    node_id = cfg.node.id
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
    if key.public_key().public_bytes(enc, pub) != cert.public_key().public_bytes(enc, pub):
        raise ConfigError(f"{cfg.source}: key {cfg.tls.key} does not belong to {cfg.tls.cert}")
    return NodeKeys(
        trust=trust,
        identity=me,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=cfg.tls.key.read_bytes(),
        ca_pem=cfg.tls.ca.read_bytes(),
        private_key=key,
    )


def previous_run(audit: AuditLog) -> dict[str, str | int]:
    """How the previous run ended, from the audit log's newest entry."""
    last = audit.events(limit=1, newest=True)
    return {
        "previous_stop": "first start"
        if not last
        else ("clean" if last[0].event == "node.stop" else "crash"),
        "previous_head": last[0].seq if last else 0,
    }


def open_checked_store(cfg: NodeConfig, audit: AuditLog) -> ObjectStore:
    """The node's object store, refused outside the allowed storage regions."""
    store = open_store(cfg)
    try:
        store.check()
    except ResidencyViolation as exc:  # a bucket would be created in a forbidden region
        _storage_region_refused(cfg, audit, cfg.storage.s3.region or "us-east-1", exc)
    region = store.region() or cfg.node.region
    allowed = cfg.storage_regions
    if region not in allowed:
        _storage_region_refused(
            cfg,
            audit,
            region,
            ResidencyViolation(
                f"{cfg.source}: storage {store.describe()} is in region {region!r}, "
                "but [residency] allowed_storage_regions allows only "
                f"{', '.join(sorted(allowed))}; use storage in an allowed region or change "
                "the policy"
            ),
        )
    return store


def _storage_region_refused(
    cfg: NodeConfig, audit: AuditLog, region: str, exc: ResidencyViolation
) -> NoReturn:
    for event in ("residency.refused", "security.alert"):
        audit.record(
            event,
            actor=f"node:{cfg.node.id}",
            outcome="failure",
            details={"reason": "storage region not allowed", "region": region},
        )
    raise exc


def design_file_check(config: LiveConfig) -> Callable[[Path, str, str], None]:
    """The format check of a design file under the node's ``[design]`` limits in force
    (raises ValidationError naming the file and what is wrong)."""

    def check(path: Path, media_type: str, name: str) -> None:
        d = config().design
        validate_design_file(
            path,
            media_type,
            name=name,
            max_mesh_bytes=d.max_mesh_bytes,
            max_mesh_triangles=d.max_mesh_triangles,
        )

    return check
