"""``yigong config check CONFIG``: is this node's configuration ready to serve?

One line per check, ``OK``, ``WARN`` or ``FAIL``, each failure with what to do:

- the file loads (unknown keys, bad values: the loader's message names the key);
- the CA certificate, the node certificate and its key: the key belongs to the
  certificate, the CA issued it, it is valid now (a warning 30 days before it expires),
  and its node id, role and region are those of ``[node]``;
- the CRL: present, signed by the CA, the node's own certificate not in it (a warning
  when it is past its renewal time);
- storage, catalog and audit locations (or the PostgreSQL database): reachable and
  writable;
- every peer: one mTLS handshake (the peer must present its own node certificate) and a
  gRPC health check, each with a short timeout.

Exit status 0 when nothing failed (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import pki
from gateway.cli.connect import Target, check_credentials, probe
from gateway.config import NodeConfig, load_config
from gateway.errors import YigongError
from gateway.identity import identity_from_certificate
from gateway.rpc.call import rpc_call
from gateway.rpc.channel import ClientCredentials, open_channel

EXPIRY_WARNING = timedelta(days=30)
PEER_TIMEOUT_SECONDS = 5.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="check a node configuration before serving it")
    cs = p.add_subparsers(dest="config_command", metavar="ACTION")
    cs.required = True
    c = cs.add_parser(
        "check",
        help="validate configuration, certificates, CRL, storage and peer reachability",
        description="One line per check (OK/WARN/FAIL, with what to do); exit status 1 "
        "when any check failed.",
    )
    c.add_argument("config", type=Path, help="node configuration (TOML)")
    c.add_argument(
        "--timeout",
        type=float,
        default=PEER_TIMEOUT_SECONDS,
        help=f"seconds to wait for each peer (default {PEER_TIMEOUT_SECONDS:g})",
    )
    c.add_argument("--no-peers", action="store_true", help="do not contact the peers")
    c.set_defaults(func=cmd_check)


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def line(self, status: str, what: str, text: str) -> None:
        print(f"{status:<4}  {what}: {text}", flush=True)
        self.failed += status == "FAIL"

    def run(self, what: str, check: Callable[[], str | tuple[str, str]]) -> bool:
        """Run ``check``: its text is printed as OK (or its (status, text)); an error as FAIL."""
        try:
            result = check()
        except YigongError as exc:
            self.line("FAIL", what, str(exc))
            return False
        except OSError as exc:
            self.line("FAIL", what, f"{exc.filename or ''} {exc.strerror or exc}".strip())
            return False
        status, text = result if isinstance(result, tuple) else ("OK", result)
        self.line(status, what, text)
        return status != "FAIL"


def cmd_check(args: argparse.Namespace) -> int:
    checks = Checks()
    cfg_box: list[NodeConfig] = []

    def load() -> str:
        cfg_box.append(load_config(args.config))
        c = cfg_box[0]
        return f"{c.source}: node {c.node.id}, {c.node.role}, region {c.node.region}"

    if not checks.run("configuration", load):
        return 1
    cfg = cfg_box[0]
    checks.run("CA certificate", lambda: _ca(cfg))
    cert_ok = checks.run("node certificate", lambda: _node_cert(cfg))
    checks.run("revocation list", lambda: _crl(cfg))
    checks.run("storage", lambda: _storage(cfg))
    if cfg.database.url:
        checks.run("database", lambda: _database(cfg))
    else:
        for what, path in (("catalog", cfg.catalog.path), ("audit log", cfg.audit.path)):
            checks.run(what, functools.partial(_writable_file, path))
    if args.no_peers or not cert_ok:
        why = "--no-peers" if args.no_peers else "fix the node certificate first"
        checks.line("WARN", "peers", f"not contacted ({why})")
    elif not cfg.peers:
        checks.line("OK", "peers", "none configured (this node sends to no one)")
    for peer in cfg.peers if cert_ok and not args.no_peers else ():
        peer_check = functools.partial(_peer, cfg, peer.id, peer.address, args.timeout)
        checks.run(f"peer {peer.id}", peer_check)
    print(
        f"{cfg.node.id}: "
        + ("every check passed" if not checks.failed else f"{checks.failed} check(s) FAILED")
    )
    return 1 if checks.failed else 0


def _database(cfg: NodeConfig) -> str:
    """PostgreSQL: reachable, this user may write (a temporary table), the server version."""
    from gateway.db import PostgresDatabase, redact_url
    from gateway.errors import CatalogError

    db = PostgresDatabase(cfg.database.url, CatalogError, schema="catalog", pool_size=1)
    try:
        with db.transaction() as conn:
            conn.execute("CREATE TEMPORARY TABLE yigong_check (x INTEGER) ON COMMIT DROP")
        version = db.query("SHOW server_version")[0][0]
    finally:
        db.close()
    return f"{redact_url(cfg.database.url)}: PostgreSQL {version}, writable"


def _ca(cfg: NodeConfig) -> str:
    ca = pki.load_certificate(cfg.tls.ca)
    return f"{cfg.tls.ca}: federation {pki.federation_of(ca)!r}"


def _node_cert(cfg: NodeConfig) -> str | tuple[str, str]:
    ident = check_credentials(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
    want = (cfg.node.id, cfg.node.role, cfg.node.region)
    got = (ident.subject_id, ident.role, ident.region)
    if not ident.is_node or got != want:
        raise YigongError(
            f"{cfg.tls.cert} is the certificate of {ident.label()} (role {ident.role}, region "
            f"{ident.region}), but [node] says {want[0]}, {want[1]}, {want[2]}: issue one with "
            f"'yigong pki issue-node --id {want[0]} --role {want[1]} --region {want[2]}' or fix "
            "[node]"
        )
    cert = pki.load_certificate(cfg.tls.cert)
    left = cert.not_valid_after_utc - datetime.now(UTC)
    text = (
        f"{cfg.tls.cert}: node {ident.subject_id}, key matches, issued by the CA, valid until "
        f"{pki.iso(cert.not_valid_after_utc)}"
    )
    if left < EXPIRY_WARNING:
        return "WARN", text + f" (expires in {left.days} days: issue a new one)"
    return text


def _crl(cfg: NodeConfig) -> str | tuple[str, str]:
    if cfg.tls.crl is None:
        return "WARN", "[tls] crl is not set: revoked certificates would be accepted"
    if not cfg.tls.crl.exists():
        raise YigongError(
            f"{cfg.tls.crl} does not exist: copy the CA's crl.pem there "
            "('yigong pki crl --ca-dir CA --out PATH' writes a fresh one)"
        )
    entries, next_update = pki.crl_info(cfg.tls.crl, cfg.tls.ca)
    stale = next_update < datetime.now(UTC)
    cert = pki.load_certificate(cfg.tls.cert)
    store = pki.TrustStore(cfg.tls.ca, cfg.tls.crl)
    try:
        store.verify(cert)
    except YigongError as exc:
        raise YigongError(f"the node certificate {cfg.tls.cert}: {exc}") from exc
    text = f"{cfg.tls.crl}: {entries} revoked, valid until {pki.iso(next_update)}"
    if stale:
        return "WARN", text + (
            " -- past its renewal time: run 'yigong pki crl --ca-dir CA --out PATH' on the CA "
            "and copy it here (revocations since then are unknown to this node)"
        )
    return text


def _storage(cfg: NodeConfig) -> str:
    from gateway.storage.factory import open_store

    store = open_store(cfg)
    store.check()
    where = cfg.storage.path if cfg.storage.backend == "filesystem" else cfg.storage.s3.bucket
    return f"{cfg.storage.backend} {where}: reachable and writable"


def _writable_file(path: Path) -> str:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe_path = tempfile.mkstemp(prefix=".yigong-check-", dir=directory)
    os.close(fd)
    os.unlink(probe_path)
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise YigongError(f"{path} exists but is not readable and writable by this user")
    return f"{path}: {'present' if path.exists() else 'will be created'}, writable"


def _peer(cfg: NodeConfig, peer_id: str, address: str, timeout: float) -> str:
    target = Target(address, cfg.tls.cert, cfg.tls.key, cfg.tls.ca, peer_id, f"[[peers]] {peer_id}")
    ident = identity_from_certificate(probe(target, timeout=timeout))
    if ident.subject_id != peer_id:
        raise YigongError(
            f"{address} answers as {ident.label()}, not {peer_id}: fix the peer's address"
        )
    creds = ClientCredentials.from_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    channel = open_channel(address, creds, peer_node_id=peer_id)

    def refused(code: grpc.StatusCode, details: str) -> YigongError:
        return YigongError(
            f"{address}: health check failed ({code.name}: {details}); the node "
            "may refuse this node's certificate (revoked, or another federation)"
        )

    try:
        reply = rpc_call(
            health_pb2_grpc.HealthStub(channel).Check,
            health_pb2.HealthCheckRequest(),
            target=f"node {peer_id} at {address}",
            timeout=timeout,
            translate=refused,
        )
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise YigongError(f"{address}: node {peer_id} answers {status}")
    return f"{address}: node {ident.subject_id} ({ident.role}, {ident.region}), {status}"
