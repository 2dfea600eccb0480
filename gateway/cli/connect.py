"""Which node a CLI command talks to, with which certificate, and who answered.

Resolution (README "Quick start"):

- ``--config NODE.toml`` acts as that node on its host: its certificate, key and CA, its
  listen address (``--address`` may override it) and its node id. ``YIGONG_*`` variables
  are ignored (a note on stderr says so); ``--cert/--key/--ca`` with ``--config`` and a
  ``--node-id`` other than the config's are refused.
- Otherwise every option comes from the command line or, when absent, from its
  ``YIGONG_*`` variable. A mix that cannot be meant is refused: an address from one
  source with a node id from the other that names another node, or a certificate and a
  key from different sources.

Before any RPC the key is checked against the certificate (and the certificate against
the CA); then one TLS handshake learns the node that answers at the address. Its id,
role and region are printed on stderr (``node factory-1 (factory, cn-east) at ...``), a
pinned node id that does not match is refused with the id that did answer, and a
command of the other role (``study`` on a factory) is refused before it is sent.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from gateway import pki
from gateway.config import load_config
from gateway.errors import (
    CertificateError,
    ConfigError,
    ExpiredCertificate,
    PeerUnavailable,
    UntrustedCertificate,
)
from gateway.identity import Identity, identity_from_certificate, node_dns_name
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.client import NodeClient

log = logging.getLogger(__name__)

ENV_VARS = ("YIGONG_ADDRESS", "YIGONG_NODE_ID", "YIGONG_CERT", "YIGONG_KEY", "YIGONG_CA")
ROLE_OF_COMMAND = {"study": "hospital", "factory": "factory"}
"""Command groups that only one role of node serves."""
PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Target:
    """Where to connect and as whom, and where each part came from."""

    address: str
    cert: Path
    key: Path
    ca: Path
    node_id: str | None  # pinned: the server must present this node's certificate
    source: str  # "--config FILE", "options", "YIGONG_* variables" or a mix


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def resolve(args: argparse.Namespace) -> Target:
    """The connection a command's options and the environment ask for (see module doc)."""
    env = {name: _env(name) for name in ENV_VARS}
    if args.config:
        explicit = [f"--{o}" for o in ("cert", "key", "ca") if getattr(args, o, None)]
        if explicit:
            raise ConfigError(
                f"{' '.join(explicit)} cannot be combined with --config: --config "
                f"{args.config} acts as that node with its own certificate; drop "
                f"{'/'.join(explicit)}, or drop --config and give --address with --cert, "
                "--key and --ca"
            )
        cfg = load_config(args.config)
        if args.node_id and args.node_id != cfg.node.id:
            raise ConfigError(
                f"--node-id {args.node_id} contradicts --config {args.config}, which is node "
                f"{cfg.node.id}: --config talks to its own node; to talk to {args.node_id} "
                "give --address with --cert, --key and --ca instead"
            )
        ignored = [name for name, value in env.items() if value]
        if ignored:
            print(f"note: --config given; ignoring {', '.join(ignored)}", file=sys.stderr)
        address = args.address
        if not address:
            host, _, port = cfg.server.listen.rpartition(":")
            if port == "0":
                raise ConfigError(
                    f"{cfg.source} listens on port 0 (chosen at start-up); pass --address"
                )
            address = f"{'127.0.0.1' if host in {'0.0.0.0', '[::]', ''} else host}:{port}"
        return Target(
            address, cfg.tls.cert, cfg.tls.key, cfg.tls.ca, cfg.node.id, f"--config {args.config}"
        )

    address, node_id = args.address, args.node_id
    env_address, env_node = env["YIGONG_ADDRESS"], env["YIGONG_NODE_ID"]
    if address and not node_id and env_node and address != env_address:
        raise ConfigError(
            f"--address {address} with YIGONG_NODE_ID={env_node} from the environment (which "
            f"goes with YIGONG_ADDRESS={env_address}): give --node-id for {address} too, or "
            "unset YIGONG_NODE_ID"
        )
    if node_id and not address and env_address and env_node and node_id != env_node:
        raise ConfigError(
            f"--node-id {node_id} with YIGONG_ADDRESS={env_address} from the environment, the "
            f"address of {env_node}: give --address for {node_id} too, or unset YIGONG_ADDRESS"
        )
    from_env = not address
    address = address or env_address
    node_id = node_id or (env_node if from_env else None)
    cert, key = args.cert, args.key
    if bool(cert) != bool(key) and (env["YIGONG_CERT"] or env["YIGONG_KEY"]):
        given, other = ("--cert", "YIGONG_KEY") if cert else ("--key", "YIGONG_CERT")
        raise ConfigError(
            f"{given} on the command line with {other} from the environment: a certificate "
            "and its key go together; give --cert and --key both, or neither"
        )
    cert = cert or (Path(env["YIGONG_CERT"]) if env["YIGONG_CERT"] else None)
    key = key or (Path(env["YIGONG_KEY"]) if env["YIGONG_KEY"] else None)
    ca = args.ca or (Path(env["YIGONG_CA"]) if env["YIGONG_CA"] else None)
    missing = [
        f"--{name} (or {var})"
        for name, var, value in (
            ("address", "YIGONG_ADDRESS", address),
            ("cert", "YIGONG_CERT", cert),
            ("key", "YIGONG_KEY", key),
            ("ca", "YIGONG_CA", ca),
        )
        if not value
    ]
    if missing or address is None or cert is None or key is None or ca is None:
        raise ConfigError(
            "say which node to talk to: --config NODE.toml, or --address HOST:PORT with "
            f"--cert, --key and --ca (missing: {', '.join(missing)})"
        )
    used_env = [n for n in ENV_VARS if env[n]] if from_env or not (args.cert and args.ca) else []
    source = "options" + (" and YIGONG_* variables" if used_env else "")
    return Target(address, cert, key, ca, node_id, source)


def check_credentials(cert_path: Path, key_path: Path, ca_path: Path) -> Identity:
    """The identity of ``cert_path``, after checking it against its key and the CA.

    Catches before any connection what gRPC would only report as a failed handshake:
    a key of another certificate, a certificate of another CA, an expired certificate.
    """
    cert = pki.load_certificate(cert_path)
    key = pki.load_private_key(key_path)
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, raw) != cert.public_key().public_bytes(enc, raw):
        raise CertificateError(
            f"private key {key_path} does not belong to certificate {cert_path} (their public "
            "keys differ): give the .key file written next to this .crt by 'yigong pki issue-...'"
        )
    ca = pki.load_certificate(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise UntrustedCertificate(
            f"certificate {cert_path} was not issued by the CA in {ca_path} "
            f"({cert.issuer.rfc4514_string()}); give the federation's ca.crt"
        ) from exc
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ExpiredCertificate(
            f"certificate {cert_path} is valid {pki.iso(cert.not_valid_before_utc)} .. "
            f"{pki.iso(cert.not_valid_after_utc)}, not now: ask the federation CA for a new one"
        )
    return identity_from_certificate(cert)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def probe(target: Target, timeout: float = PROBE_TIMEOUT_SECONDS) -> x509.Certificate:
    """One mTLS handshake with the node at ``target.address``: the certificate it presents.

    Only the chain is checked here (against the federation CA); which node it must be is
    the caller's decision.
    """
    host, port = _split(target.address)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cafile=str(target.ca))
        ctx.load_cert_chain(str(target.cert), str(target.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load {target.cert}, {target.key} or {target.ca}: {exc}") from exc
    ctx.set_alpn_protocols(["h2"])
    where = f"{target.address} ({target.source})"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise UntrustedCertificate(
            f"the server at {where} presents a certificate that the CA {target.ca} did not "
            f"issue ({exc.verify_message}): wrong address, or a node of another federation"
        ) from exc
    except ssl.SSLError as exc:
        raise PeerUnavailable(
            f"TLS handshake with {where} failed ({exc.reason or exc}): is this a yigong node's "
            "gRPC port (not its DICOM port)?"
        ) from exc
    except socket.gaierror as exc:
        raise PeerUnavailable(f"cannot resolve host {host!r} of {where}: {exc.strerror}") from exc
    except TimeoutError as exc:
        raise PeerUnavailable(f"no answer from {where} within {timeout:g} s") from exc
    except ConnectionRefusedError as exc:
        raise PeerUnavailable(
            f"nothing listens at {where} (connection refused): is the node running "
            "('yigong serve'), and is the port its [server] listen port?"
        ) from exc
    except OSError as exc:
        raise PeerUnavailable(f"cannot connect to {where}: {exc.strerror or exc}") from exc
    if not der:
        raise PeerUnavailable(f"the server at {where} presented no certificate")
    return x509.load_der_x509_certificate(der)


def _names_host(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() in {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    return ip in san.get_values_for_type(x509.IPAddress)


def connect(args: argparse.Namespace) -> NodeClient:
    """A client for the node the command's options name, after the checks above."""
    target = resolve(args)
    me = check_credentials(target.cert, target.key, target.ca)
    server_cert = probe(target)
    try:
        server = identity_from_certificate(server_cert)
    except CertificateError as exc:
        raise CertificateError(f"the server at {target.address}: {exc}") from exc
    if not server.is_node:
        raise CertificateError(
            f"the server at {target.address} presents the certificate of {server.label()}, "
            "not of a node"
        )
    what = f"{server.subject_id} ({server.role} node)"
    if target.node_id and server.subject_id != target.node_id:
        raise CertificateError(
            f"the node at {target.address} is {what}, not {target.node_id} "
            f"(expected from {target.source}): give the address of {target.node_id}, or "
            f"--node-id {server.subject_id} if {server.subject_id} is the node you mean"
        )
    host = _split(target.address)[0]
    if not target.node_id and not _names_host(server_cert, host):
        raise CertificateError(
            f"the certificate of {what} at {target.address} does not name the host {host!r}: "
            f"pass --node-id {server.subject_id} to check the node's identity instead of its "
            f"host name (its certificate names {node_dns_name(server.subject_id)})"
        )
    command = getattr(args, "command", "")
    wanted = ROLE_OF_COMMAND.get(command)
    if wanted and server.role != wanted:
        raise ConfigError(
            f"{server.subject_id} is a {server.role} node; `{command}` commands are for "
            f"{wanted} nodes (give the address or --config of a {wanted} node)"
        )
    region = f", region {server.region}" if server.region else ""
    if not getattr(args, "quiet", False):  # --quiet: nothing on stderr but errors
        print(
            f"node {server.subject_id} ({server.role}{region}) at {target.address}, "
            f"as {me.label()}",
            file=sys.stderr,
            flush=True,
        )
    creds = ClientCredentials.from_files(target.ca, target.cert, target.key)
    return NodeClient(
        target.address,
        creds,
        node_id=target.node_id,
        target=f"node {server.subject_id} at {target.address}",
    )
