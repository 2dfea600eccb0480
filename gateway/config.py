"""The one configuration loader: one TOML file per node.

Every option has a default that works for the embedded setup (filesystem
storage and SQLite under ``node.data_dir``); an unknown key anywhere is an
error naming the key and the file. Relative paths are resolved against the
directory holding the configuration file. See README "Configuration
reference" for every key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import CertificateError, ConfigError
from gateway.hashing import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
from gateway.identity import NODE_ROLES, validate_id


@dataclass(frozen=True)
class NodeSection:
    id: str = ""
    role: str = ""
    region: str = ""
    data_dir: Path = Path("data")


@dataclass(frozen=True)
class TLSSection:
    ca: Path = Path("pki/ca.crt")
    cert: Path = Path("pki/node.crt")
    key: Path = Path("pki/node.key")
    crl: Path | None = None


@dataclass(frozen=True)
class ServerSection:
    listen: str = "127.0.0.1:7443"
    max_workers: int = 16
    grace_seconds: float = 10.0
    max_message_bytes: int = 8 * 1024 * 1024
    tls_terminator: str = "gateway"  # "gateway": audited handshakes; "grpc": gRPC's own TLS
    max_pending_handshakes: int = 256  # "gateway" terminator: connections mid-handshake
    max_pending_handshakes_per_address: int = 16
    # load balancers (addresses or networks) whose connections to the gRPC and console
    # ports begin with a PROXY protocol header (HAProxy send-proxy-v2): the client's
    # address is then the one audited and capped (docs/scaling.md)
    proxy_protocol_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConsoleSection:
    """The web console: HTTPS with browser client certificates (README "Web console")."""

    enabled: bool = True
    listen: str = "127.0.0.1:7444"  # loopback: put a TLS pass-through proxy in front
    max_pending_handshakes: int = 64
    max_pending_handshakes_per_address: int = 16
    page_size: int = 50  # rows per page of every list
    idle_seconds: float = 60.0  # an idle keep-alive connection is closed after this


@dataclass(frozen=True)
class S3Section:
    endpoint: str = ""
    bucket: str = ""
    access_key: str = ""
    secret_key: str = ""
    secret_key_env: str = ""
    secure: bool = True
    region: str = ""
    part_size_mb: int = 64
    create_bucket: bool = False


@dataclass(frozen=True)
class StorageSection:
    backend: str = "filesystem"
    path: Path = Path("objects")
    s3: S3Section = field(default_factory=S3Section)


@dataclass(frozen=True)
class DatabaseSection:
    """Where catalog and audit log live: empty ``url`` = the SQLite files of ``[catalog]``
    and ``[audit]`` (embedded default); ``postgresql://user@host:port/db`` = PostgreSQL,
    shared by every replica of the node (password from ``PGPASSWORD``/``PGPASSFILE``,
    not from this file)."""

    url: str = ""
    pool_size: int = 8  # connections per database per process (catalog and audit each)
    replica_lease_seconds: float = 15.0  # a replica silent this long: its sends go to others


@dataclass(frozen=True)
class CatalogSection:
    path: Path = Path("catalog.sqlite")


@dataclass(frozen=True)
class AuditSection:
    path: Path = Path("audit.sqlite")
    checkpoint_every: int = 100
    checkpoint_seconds: float = 2.0  # sign the moved head this often (and hand it to the peers)
    witness: bool = True  # send signed checkpoints to every peer (docs: Officer's guide)


@dataclass(frozen=True)
class TransferSection:
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    max_bytes_per_second: int = 0
    max_object_bytes: int = 64 * 1024**3
    connect_timeout_seconds: float = 10.0
    workers: int = 8  # parallel outbound transfers: hides round trips on a WAN
    inbound_expiry_seconds: float = 24 * 3600.0
    max_open_inbound_per_peer: int = 64
    max_spooled_bytes_per_peer: int = 128 * 1024**3
    # replicas on a shared database: copy each 64 MiB of a large inbound object's verified
    # bytes to the shared store, so a sender cut off resumes at another replica (0: never)
    shared_segment_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class DicomSection:
    """Hospital only: the DICOM SCP that PACS push to."""

    enabled: bool = True
    ae_title: str = "YIGONG"
    listen: str = "127.0.0.1:11112"
    allowed_calling_aes: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    # load balancers whose connections begin with a PROXY protocol header (HAProxy
    # send-proxy-v2): allowed_addresses and the per-address cap then apply to the PACS
    # named in the header (docs/scaling.md)
    proxy_protocol_from: tuple[str, ...] = ()
    max_associations: int = 8
    max_associations_per_address: int = 4
    idle_timeout_seconds: float = 15.0
    max_pdu_bytes: int = 262144
    quiet_period_seconds: float = 30.0
    auto_forward_called_ae: str = ""
    auto_forward_to: str = ""
    spool_path: Path = Path("dicom-spool")
    spool_max_waiting: int = 256


@dataclass(frozen=True)
class DeidSection:
    """Hospital only: de-identification and the pseudonym vault."""

    key_file: Path | None = None
    vault_key_file: Path | None = None
    allow_burned_in: bool = False
    workers: int = 2  # de-identification processes of a release (0: in the node process)
    pool_min_instances: int = 16  # smaller releases are de-identified in the node process


@dataclass(frozen=True)
class SuitabilitySection:
    """Factory only: thresholds of the suitability check of received studies (§9.3.4)."""

    max_slice_thickness_mm: float = 1.0
    allow_missing_slices: bool = False
    spacing_tolerance_mm: float = 0.05
    allow_gantry_tilt: bool = False
    require_single_orientation: bool = True
    min_slices: int = 10


@dataclass(frozen=True)
class ResidencySection:
    """Where data may go and be stored. Empty lists mean: only this node's own region."""

    allowed_peer_regions: tuple[str, ...] = ()
    allowed_storage_regions: tuple[str, ...] = ()


@dataclass(frozen=True)
class TelemetrySection:
    """OpenTelemetry export; off unless an OTLP endpoint is given."""

    otlp_endpoint: str = ""
    otlp_insecure: bool = False
    metrics_interval_seconds: float = 60.0


@dataclass(frozen=True)
class AtnaSection:
    """Optional: forward audit events as DICOM PS3.15 A.5 / IHE ATNA messages (docs/atna.md)."""

    enabled: bool = False
    host: str = ""
    port: int = 6514
    ca: Path | None = None  # the collector's CA; default tls.ca
    cert: Path | None = None  # client certificate for mutual TLS; default tls.cert
    key: Path | None = None  # default tls.key
    facility: int = 10  # 10 authpriv (PS3.15 A.6) or 13 log audit
    poll_seconds: float = 5.0


@dataclass(frozen=True)
class DesignSection:
    """Limits of the design-file checks (docs/design-files.md)."""

    max_mesh_bytes: int = 128 * 1024 * 1024
    max_mesh_triangles: int = 3_000_000


@dataclass(frozen=True)
class OutboundSection:
    """Hospital only: bounds of the outbound gate's content scan (hospital_node.outbound)."""

    max_expanded_bytes: int = 512 * 1024 * 1024
    max_archive_members: int = 10_000
    max_archive_depth: int = 5


@dataclass(frozen=True)
class PacsSection:
    """Hospital only: the PACS approved designs are exported to (off without a host)."""

    host: str = ""
    port: int = 104
    called_ae: str = "PACS"
    calling_ae: str = ""  # default: dicom.ae_title
    timeout_seconds: float = 30.0


@dataclass(frozen=True)
class PeerSection:
    id: str = ""
    address: str = ""


@dataclass(frozen=True)
class NodeConfig:
    source: Path
    node: NodeSection
    tls: TLSSection
    server: ServerSection
    storage: StorageSection
    catalog: CatalogSection
    audit: AuditSection
    transfer: TransferSection
    peers: tuple[PeerSection, ...]
    database: DatabaseSection = field(default_factory=DatabaseSection)
    dicom: DicomSection = field(default_factory=DicomSection)
    deid: DeidSection = field(default_factory=DeidSection)
    suitability: SuitabilitySection = field(default_factory=SuitabilitySection)
    residency: ResidencySection = field(default_factory=ResidencySection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    atna: AtnaSection = field(default_factory=AtnaSection)
    design: DesignSection = field(default_factory=DesignSection)
    pacs: PacsSection = field(default_factory=PacsSection)
    outbound: OutboundSection = field(default_factory=OutboundSection)
    console: ConsoleSection = field(default_factory=ConsoleSection)

    @property
    def peer_regions(self) -> frozenset[str]:
        return frozenset(self.residency.allowed_peer_regions or (self.node.region,))

    @property
    def storage_regions(self) -> frozenset[str]:
        return frozenset(self.residency.allowed_storage_regions or (self.node.region,))

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    def peer(self, node_id: str) -> PeerSection:
        for peer in self.peers:
            if peer.id == node_id:
                return peer
        known = ", ".join(p.id for p in self.peers) or "none"
        raise ConfigError(
            f"peer {node_id!r} is not configured in {self.source} (known peers: {known}); "
            "add a [[peers]] entry with its id and address"
        )


def _build(cls: type[Any], raw: Any, where: str, source: Path, base: Path) -> Any:
    """Build dataclass ``cls`` from TOML table ``raw``, refusing unknown keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{where}] must be a table, not {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(repr(k) for k in unknown)} in [{where}]; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    values: dict[str, Any] = {}
    defaults = cls()
    for name, value in raw.items():
        default = getattr(defaults, name)
        key = f"{where}.{name}"
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, key, source, base)
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{source}: {key} must be a list of strings, not {value!r}")
            values[name] = tuple(value)
        elif isinstance(default, Path) or "Path" in str(fields[name].type):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{source}: {key} must be a non-empty path string")
            path = Path(os.path.expanduser(value))
            values[name] = path if path.is_absolute() else base / path
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be true or false, not {value!r}")
            values[name] = value
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: {key} must be an integer, not {value!r}")
            values[name] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{source}: {key} must be a number, not {value!r}")
            values[name] = float(value)
        else:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a string, not {value!r}")
            values[name] = value
    # Paths left at their defaults are relative to the config file too.
    for name in fields:
        if name not in values:
            default = getattr(defaults, name)
            if isinstance(default, Path) and not default.is_absolute():
                values[name] = base / default
    return cls(**values)


def _check(cfg: NodeConfig) -> None:
    src = cfg.source
    try:
        validate_id(cfg.node.id, "node.id")
        validate_id(cfg.node.region, "node.region")
    except CertificateError as exc:
        raise ConfigError(f"{src}: {exc}") from exc
    if cfg.node.role not in NODE_ROLES:
        raise ConfigError(
            f"{src}: node.role must be one of {sorted(NODE_ROLES)}, not {cfg.node.role!r}"
        )
    host, sep, port = cfg.server.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"{src}: server.listen must be HOST:PORT (PORT 0 picks a free port), "
            f"not {cfg.server.listen!r}"
        )
    c = cfg.console
    chost, csep, cport = c.listen.rpartition(":")
    if c.enabled and (not csep or not chost or not cport.isdigit() or int(cport) > 65535):
        raise ConfigError(
            f"{src}: console.listen must be HOST:PORT (PORT 0 picks a free port), "
            f"not {c.listen!r}"
        )
    if c.enabled and c.listen == cfg.server.listen and not c.listen.endswith(":0"):
        raise ConfigError(
            f"{src}: console.listen {c.listen!r} is the gRPC port (server.listen); "
            "give the console a port of its own"
        )
    for ckey in ("max_pending_handshakes", "max_pending_handshakes_per_address", "page_size"):
        if getattr(c, ckey) < 1:
            raise ConfigError(f"{src}: console.{ckey} must be at least 1, not {getattr(c, ckey)}")
    if c.page_size > 500:
        raise ConfigError(f"{src}: console.page_size must be at most 500, not {c.page_size}")
    for key in ("max_pending_handshakes", "max_pending_handshakes_per_address"):
        if getattr(cfg.server, key) < 1:
            raise ConfigError(
                f"{src}: server.{key} must be at least 1, not {getattr(cfg.server, key)}"
            )
    for entry in cfg.server.proxy_protocol_from:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ConfigError(
                f"{src}: server.proxy_protocol_from: {entry!r} is not an IP address or "
                "network (e.g. \"10.0.0.5\" or \"10.0.0.0/24\")"
            ) from exc
    if cfg.server.proxy_protocol_from and cfg.server.tls_terminator != "gateway":
        raise ConfigError(
            f"{src}: server.proxy_protocol_from needs server.tls_terminator = 'gateway' "
            "(gRPC's own TLS cannot read a PROXY header)"
        )
    if cfg.server.tls_terminator not in {"gateway", "grpc"}:
        raise ConfigError(
            f"{src}: server.tls_terminator must be 'gateway' (the node does the TLS handshake "
            f"and audits every refused certificate) or 'grpc', not {cfg.server.tls_terminator!r}"
        )
    if cfg.storage.backend not in {"filesystem", "s3"}:
        raise ConfigError(
            f"{src}: storage.backend must be 'filesystem' or 's3', not {cfg.storage.backend!r}"
        )
    if cfg.storage.backend == "s3":
        s3 = cfg.storage.s3
        missing = [k for k in ("endpoint", "bucket", "access_key") if not getattr(s3, k)]
        if not s3.secret_key and not s3.secret_key_env:
            missing.append("secret_key or secret_key_env")
        if missing:
            raise ConfigError(f"{src}: storage.backend = 's3' needs storage.s3.{missing}")
    db = cfg.database
    if db.url and not db.url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"{src}: database.url must be empty (SQLite files in data_dir) or a "
            f"postgresql:// URL, not {db.url.split('://')[0] + '://…'!r}"
        )
    if db.url and "@" in db.url and ":" in db.url.split("://", 1)[1].split("@")[0]:
        raise ConfigError(
            f"{src}: database.url carries a password; remove it and set PGPASSWORD or a "
            "PGPASSFILE for the node (configuration files are not secrets)"
        )
    if not 3 <= db.replica_lease_seconds <= 3600:
        raise ConfigError(
            f"{src}: database.replica_lease_seconds must be 3..3600, not "
            f"{db.replica_lease_seconds}"
        )
    if not 1 <= db.pool_size <= 100:
        raise ConfigError(f"{src}: database.pool_size must be 1..100, not {db.pool_size}")
    t = cfg.transfer
    if t.shared_segment_bytes and t.shared_segment_bytes < 1024**2:
        raise ConfigError(
            f"{src}: transfer.shared_segment_bytes must be 0 (off) or at least 1048576, "
            f"not {t.shared_segment_bytes}"
        )
    if not 4096 <= t.chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"{src}: transfer.chunk_bytes must be between 4096 and {MAX_CHUNK_BYTES}, "
            f"not {t.chunk_bytes}"
        )
    if t.retry_initial_seconds <= 0 or t.retry_max_seconds < t.retry_initial_seconds:
        raise ConfigError(
            f"{src}: need 0 < transfer.retry_initial_seconds <= transfer.retry_max_seconds"
        )
    if t.max_bytes_per_second < 0 or t.workers < 1:
        raise ConfigError(f"{src}: transfer.max_bytes_per_second >= 0 and transfer.workers >= 1")
    au = cfg.audit
    if au.checkpoint_every < 1 or not 0.1 <= au.checkpoint_seconds <= 3600:
        raise ConfigError(
            f"{src}: need audit.checkpoint_every >= 1 and 0.1 <= audit.checkpoint_seconds <= 3600"
        )
    if cfg.server.max_message_bytes < t.chunk_bytes + 64 * 1024:
        raise ConfigError(
            f"{src}: server.max_message_bytes ({cfg.server.max_message_bytes}) must be at least "
            f"transfer.chunk_bytes + 65536 ({t.chunk_bytes + 64 * 1024}): one transfer chunk "
            "and its framing travel in one message. Raise it or lower transfer.chunk_bytes"
        )
    if t.inbound_expiry_seconds <= 0 or t.max_open_inbound_per_peer < 1:
        raise ConfigError(
            f"{src}: need transfer.inbound_expiry_seconds > 0 and "
            "transfer.max_open_inbound_per_peer >= 1"
        )
    if t.max_spooled_bytes_per_peer < t.max_object_bytes:
        raise ConfigError(
            f"{src}: transfer.max_spooled_bytes_per_peer ({t.max_spooled_bytes_per_peer}) is "
            f"below transfer.max_object_bytes ({t.max_object_bytes}): the largest object "
            "allowed could never be received. Raise it or lower transfer.max_object_bytes"
        )
    d = cfg.dicom
    dhost, dsep, dport = d.listen.rpartition(":")
    if not dsep or not dhost or not dport.isdigit() or int(dport) > 65535:
        raise ConfigError(f"{src}: dicom.listen must be HOST:PORT, not {d.listen!r}")
    if not 1 <= len(d.ae_title) <= 16 or not d.ae_title.isascii():
        raise ConfigError(f"{src}: dicom.ae_title must be 1-16 ASCII characters")
    if d.max_associations < 1 or not 4096 <= d.max_pdu_bytes <= 4 * 1024 * 1024:
        raise ConfigError(
            f"{src}: dicom.max_associations >= 1 and 4096 <= dicom.max_pdu_bytes <= 4194304"
        )
    if d.spool_max_waiting < 1:
        raise ConfigError(f"{src}: dicom.spool_max_waiting must be at least 1")
    if not 0 <= cfg.deid.workers <= 64 or cfg.deid.pool_min_instances < 1:
        raise ConfigError(
            f"{src}: deid.workers must be 0-64 (0 de-identifies in the node process; not "
            f"{cfg.deid.workers}) and deid.pool_min_instances at least 1 (not "
            f"{cfg.deid.pool_min_instances})"
        )
    if d.max_associations_per_address < 1:
        raise ConfigError(
            f"{src}: dicom.max_associations_per_address must be at least 1 "
            f"(not {d.max_associations_per_address})"
        )
    if not 0 < d.idle_timeout_seconds <= 3600:
        raise ConfigError(
            f"{src}: dicom.idle_timeout_seconds must be above 0 and at most 3600 "
            f"(not {d.idle_timeout_seconds}); a PACS silent this long is disconnected"
        )
    if bool(d.auto_forward_called_ae) != bool(d.auto_forward_to):
        raise ConfigError(
            f"{src}: dicom.auto_forward_called_ae and dicom.auto_forward_to go together"
        )
    try:
        for region in (*cfg.residency.allowed_peer_regions, *cfg.residency.allowed_storage_regions):
            validate_id(region, "residency region")
    except CertificateError as exc:
        raise ConfigError(f"{src}: [residency] {exc}") from exc
    a = cfg.atna
    if a.enabled and (not a.host or not 1 <= a.port <= 65535):
        raise ConfigError(f"{src}: [atna] enabled needs atna.host and atna.port 1-65535")
    if a.facility not in {10, 13} or a.poll_seconds <= 0:
        raise ConfigError(f"{src}: atna.facility must be 10 or 13 and atna.poll_seconds > 0")
    if cfg.pacs.host and not 1 <= cfg.pacs.port <= 65535:
        raise ConfigError(f"{src}: pacs.port must be 1-65535")
    if cfg.design.max_mesh_bytes < 1 or cfg.design.max_mesh_triangles < 1:
        raise ConfigError(f"{src}: design.max_mesh_bytes and design.max_mesh_triangles must be > 0")
    o = cfg.outbound
    if o.max_expanded_bytes < 1 or o.max_archive_members < 1 or not 1 <= o.max_archive_depth <= 64:
        raise ConfigError(
            f"{src}: outbound.max_expanded_bytes and outbound.max_archive_members must be > 0, "
            "outbound.max_archive_depth 1-64"
        )
    seen: set[str] = set()
    for peer in cfg.peers:
        if not peer.id or not peer.address:
            raise ConfigError(f"{src}: every [[peers]] entry needs id and address")
        if peer.id in seen or peer.id == cfg.node.id:
            raise ConfigError(f"{src}: peer {peer.id!r} is listed twice or is this node itself")
        seen.add(peer.id)


def load_config(path: Path | str) -> NodeConfig:
    """Load and validate a node configuration file."""
    source = Path(path).resolve()
    try:
        with open(source, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file {source} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {source}: {exc}") from exc
    base = source.parent
    sections = {
        "node": NodeSection,
        "tls": TLSSection,
        "server": ServerSection,
        "storage": StorageSection,
        "database": DatabaseSection,
        "catalog": CatalogSection,
        "audit": AuditSection,
        "transfer": TransferSection,
        "dicom": DicomSection,
        "deid": DeidSection,
        "suitability": SuitabilitySection,
        "residency": ResidencySection,
        "telemetry": TelemetrySection,
        "atna": AtnaSection,
        "design": DesignSection,
        "pacs": PacsSection,
        "outbound": OutboundSection,
        "console": ConsoleSection,
    }
    unknown = sorted(set(raw) - set(sections) - {"peers"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown section(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted([*sections, 'peers']))}"
        )
    if "node" not in raw:
        raise ConfigError(f"{source}: missing [node] section with id, role and region")
    built = {
        name: _build(cls, raw.get(name, {}), name, source, base) for name, cls in sections.items()
    }
    node: NodeSection = built["node"]
    # Catalog, audit and filesystem storage paths default to inside data_dir.
    data_dir = node.data_dir

    def under_data(section: str, key: str, default: Path) -> Path:
        explicit = key in raw.get(section, {})
        value: Path = getattr(built[section], key)
        return value if explicit else data_dir / default

    built["catalog"] = dataclasses.replace(
        built["catalog"], path=under_data("catalog", "path", CatalogSection.path)
    )
    built["audit"] = dataclasses.replace(
        built["audit"], path=under_data("audit", "path", AuditSection.path)
    )
    built["storage"] = dataclasses.replace(
        built["storage"], path=under_data("storage", "path", StorageSection.path)
    )
    built["dicom"] = dataclasses.replace(
        built["dicom"], spool_path=under_data("dicom", "spool_path", DicomSection.spool_path)
    )
    deid: DeidSection = built["deid"]
    built["deid"] = dataclasses.replace(
        deid,
        key_file=deid.key_file or data_dir / "deid.key",
        vault_key_file=deid.vault_key_file or data_dir / "vault.key",
    )
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError(f"{source}: peers must be an array of tables ([[peers]])")
    peers = tuple(
        _build(PeerSection, p, f"peers[{i}]", source, base) for i, p in enumerate(peers_raw)
    )
    cfg = NodeConfig(source=source, peers=peers, **built)
    _check(cfg)
    return cfg


def render_config(
    *,
    node_id: str,
    role: str,
    region: str,
    data_dir: Path,
    ca: Path,
    cert: Path,
    key: Path,
    crl: Path | None,
    listen: str,
    peers: list[tuple[str, str]],
    extra: str = "",
    dicom: Mapping[str, Any] | None = None,
    console_listen: str | None = None,
) -> str:
    """A complete configuration file for the embedded setup (used by demo and tests);
    the web console listens on ``console_listen``, or is off when it is None."""

    def q(value: object) -> str:
        # JSON string escapes are valid TOML basic-string escapes.
        return json.dumps(str(value), ensure_ascii=False)

    lines = [
        "# yigong node configuration; see README 'Configuration reference'",
        "[node]",
        f"id = {q(node_id)}",
        f"role = {q(role)}",
        f"region = {q(region)}",
        f"data_dir = {q(data_dir)}",
        "",
        "[tls]",
        f"ca = {q(ca)}",
        f"cert = {q(cert)}",
        f"key = {q(key)}",
    ]
    if crl is not None:
        lines.append(f"crl = {q(crl)}")
    lines += ["", "[server]", f"listen = {q(listen)}", ""]
    if console_listen is None:
        lines += ["[console]", "enabled = false", ""]
    else:
        lines += ["[console]", f"listen = {q(console_listen)}", ""]
    if dicom is not None:
        # JSON renders strings, numbers, booleans and string lists as valid TOML values.
        lines += ["[dicom]", *(f"{k} = {json.dumps(v)}" for k, v in dicom.items()), ""]
    if extra:
        lines += [extra.strip(), ""]
    for peer_id, address in peers:
        lines += ["[[peers]]", f"id = {q(peer_id)}", f"address = {q(address)}", ""]
    return "\n".join(lines)


class LiveConfig:
    """The configuration in force on a running node, for what reads it at each use (peer
    addresses when a link opens, the PACS when a design is exported), so that one
    replaced configuration reaches every such reader at once."""

    def __init__(self, cfg: NodeConfig) -> None:
        self._cfg = cfg

    def __call__(self) -> NodeConfig:
        return self._cfg

    def replace(self, cfg: NodeConfig) -> None:
        self._cfg = cfg
