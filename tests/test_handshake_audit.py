"""Every certificate refused during the TLS handshake is audited (issue #14, part 3).

A real node (in-process, its own TLS terminator on the public port) and real gRPC
clients presenting: no certificate, one from another CA, an expired one, one not yet
valid, a self-signed one, and one issued by a federation leaf certificate (a leaf
used as a CA). Each handshake fails, and the node's audit log holds an
``auth.refused`` entry at stage ``tls_handshake`` with the kind of refusal, the
client's address, and the serial and subject of the certificate where one was
presented.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import pki
from gateway.audit import AUTH_REFUSED
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.identity import identity_san_uris, node_dns_name
from gateway.rpc.channel import ClientCredentials, open_channel
from gateway.rpc.terminator import SOCKET_DIR_PREFIX
from tests.cluster import Federation, InProcessNode, NodeProcess, wait_for, write_config
from yigong.v1 import query_pb2, query_pb2_grpc

AUDIT_WAIT = 15.0  # the refusal is audited by the terminator's thread; poll for it


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return Federation(tmp_path_factory.mktemp("handshake-fed"))


@pytest.fixture(scope="module")
def node(fed: Federation, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessNode]:
    workdir = tmp_path_factory.mktemp("handshake-node")
    n = InProcessNode(write_config(fed, workdir, "factory-1", "factory"))
    yield n
    n.stop()


@dataclass(frozen=True)
class Presented:
    """What a client presents: gRPC credentials and the certificate's serial/subject."""

    creds: grpc.ChannelCredentials
    serial: int | None = None
    subject: str | None = None


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issued(fed: Federation, issued: pki.IssuedCert) -> Presented:
    cert = pki.load_certificate(issued.cert_path)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return Presented(fed.creds(issued).grpc_credentials(), cert.serial_number, str(cn))


def _crafted(
    fed: Federation,
    subject_cn: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    chain: list[x509.Certificate] = (),  # type: ignore[assignment]
) -> Presented:
    """A person-like certificate for ``subject_cn`` signed by ``issuer`` (None: itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "testfed"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_cn),
        ]
    )
    issuer_name, signer = (name, key) if issuer is None else (issuer[0].subject, issuer[1])
    now = datetime.now(UTC)
    uris = identity_san_uris("person", subject_cn, "engineer", org_node="factory-1")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=fed.ca.read_bytes(),
        private_key=_key_pem(key),
        certificate_chain=_pem(cert) + b"".join(_pem(c) for c in chain),
    )
    return Presented(creds, cert.serial_number, subject_cn)


def _no_certificate(fed: Federation, tmp: Path) -> Presented:
    return Presented(grpc.ssl_channel_credentials(root_certificates=fed.ca.read_bytes()))


def _other_ca(fed: Federation, tmp: Path) -> Presented:
    """Another CA with the same federation name, issuing the same kind of identity."""
    other = Federation(tmp / "other-federation")
    issued = other.person("hs-eve", "engineer", "factory-1")
    cert, key = issued.cert_path.read_bytes(), issued.key_path.read_bytes()
    p = _issued(other, issued)
    return Presented(
        ClientCredentials(fed.ca.read_bytes(), cert, key).grpc_credentials(), p.serial, p.subject
    )


def _expired(fed: Federation, tmp: Path) -> Presented:
    past = datetime.now(UTC) - timedelta(days=3)
    return _issued(
        fed,
        fed.person(
            "hs-old", "engineer", "factory-1", not_before=past, not_after=past + timedelta(days=1)
        ),
    )


def _not_yet_valid(fed: Federation, tmp: Path) -> Presented:
    soon = datetime.now(UTC) + timedelta(days=2)
    return _issued(
        fed,
        fed.person(
            "hs-early",
            "engineer",
            "factory-1",
            not_before=soon,
            not_after=soon + timedelta(days=30),
        ),
    )


def _self_signed(fed: Federation, tmp: Path) -> Presented:
    return _crafted(fed, "hs-self", None)


def _leaf_as_ca(fed: Federation, tmp: Path) -> Presented:
    """A certificate signed with a federation *person* certificate's key; the client
    sends the federation leaf along as its intermediate."""
    leaf = fed.person("hs-leaf", "engineer", "factory-1")
    leaf_cert = pki.load_certificate(leaf.cert_path)
    return _crafted(fed, "hs-child", (leaf_cert, pki.load_private_key(leaf.key_path)), [leaf_cert])


CASES: dict[str, tuple[Callable[[Federation, Path], Presented], str, str]] = {
    # name: (credentials, refusal kind, reason = the error class)
    "no certificate": (_no_certificate, "no_certificate", "AuthenticationError"),
    "other CA": (_other_ca, "other_ca", "UntrustedCertificate"),
    "expired": (_expired, "expired", "ExpiredCertificate"),
    "not yet valid": (_not_yet_valid, "not_yet_valid", "ExpiredCertificate"),
    "self-signed": (_self_signed, "self_signed", "UntrustedCertificate"),
    "leaf used as CA": (_leaf_as_ca, "issuer_not_ca", "UntrustedCertificate"),
}


def _health(node: InProcessNode, creds: grpc.ChannelCredentials) -> int:
    options = [("grpc.ssl_target_name_override", node_dns_name("factory-1"))]
    with grpc.secure_channel(node.address, creds, options=options) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _handshake_refusals(node: InProcessNode, after: int) -> list[Any]:
    return [
        e
        for e in node.node.audit.events(event=AUTH_REFUSED)
        if e.seq > after and e.details.get("stage") == "tls_handshake"
    ]


def _wait_refusal(node: InProcessNode, after: int) -> Any:
    deadline = time.monotonic() + AUDIT_WAIT
    while time.monotonic() < deadline:
        if found := _handshake_refusals(node, after):
            return found[0]
        time.sleep(0.05)
    raise AssertionError("no auth.refused entry for the refused handshake")


def _last_seq(node: InProcessNode) -> int:
    events = node.node.audit.events(limit=100_000)
    return events[-1].seq if events else 0


@pytest.mark.parametrize("case", list(CASES))
def test_each_handshake_refusal_kind_is_audited_with_serial_and_subject(
    node: InProcessNode, fed: Federation, tmp_path: Path, case: str
) -> None:
    make, kind, reason = CASES[case]
    presented = make(fed, tmp_path)
    before = _last_seq(node)
    with pytest.raises(grpc.RpcError) as err:
        _health(node, presented.creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
    event = _wait_refusal(node, before)
    assert event.outcome == "failure" and event.actor is None
    assert event.details["refusal"] == kind
    assert event.details["reason"] == reason
    assert event.details["remote"].startswith("ipv4:127.0.0.1:")
    assert "method" not in event.details  # never reached a handler
    if presented.serial is None:
        assert "cert_serial" not in event.details
        assert "no client certificate" in event.details["detail"]
    else:
        assert event.details["cert_serial"] == f"{presented.serial:x}"
        assert event.details["cert_subject"] == presented.subject
        assert f"serial {presented.serial:x}" in event.details["detail"]


def test_leaf_used_as_ca_names_the_federation_leaf_as_issuer(
    node: InProcessNode, fed: Federation, tmp_path: Path
) -> None:
    presented = _leaf_as_ca(fed, tmp_path)
    before = _last_seq(node)
    with pytest.raises(grpc.RpcError):
        _health(node, presented.creds)
    event = _wait_refusal(node, before)
    assert "CN=hs-leaf" in event.details["cert_issuer"]
    assert "was not issued by federation CA 'testfed'" in event.details["detail"]


def test_accepted_handshake_then_per_call_refusal_records_the_client_address(
    node: InProcessNode, fed: Federation
) -> None:
    """Behind the terminator the gatekeeper still checks every call, with the client's address.

    Here: a certificate revoked while its connection is open."""
    issued = fed.person("hs-revoked", "engineer", "factory-1")
    creds = fed.creds(issued)
    with open_channel(node.address, creds, peer_node_id="factory-1") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        before = _last_seq(node)
        pki.revoke(fed.ca_dir, issued.serial, "key_compromise")
        time.sleep(1.2)  # the trust store looks at the CRL once per second
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in err.value.details()
    (event,) = [e for e in node.node.audit.events(event=AUTH_REFUSED) if e.seq > before]
    assert event.details["reason"] == "RevokedCertificate"
    assert event.details["cert_serial"] == f"{issued.serial:x}"
    assert event.details["remote"].startswith("ipv4:127.0.0.1:")


def test_direct_connection_to_the_internal_grpc_socket_is_refused_and_audited(
    node: InProcessNode,
) -> None:
    """gRPC's internal listener serves only connections the terminator forwarded.

    It is a Unix socket in a private directory; anything else has no certificate."""
    terminator = node.node._terminator
    assert terminator is not None
    before = _last_seq(node)
    with grpc.insecure_channel(terminator.backend_address) as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "did not come through its TLS port" in err.value.details()
    (event,) = [e for e in node.node.audit.events(event=AUTH_REFUSED) if e.seq > before]
    assert event.outcome == "failure"
    assert event.details["remote"].startswith("unix:")


def test_grpc_tls_mode_still_serves_and_unknown_mode_is_a_config_error(
    fed: Federation, tmp_path: Path
) -> None:
    """``server.tls_terminator = "grpc"`` keeps gRPC's own TLS (refusals not audited)."""
    config = write_config(fed, tmp_path, "factory-2", "factory")
    text = config.read_text()
    config.write_text(text.replace("\n[server]\n", '\n[server]\ntls_terminator = "grpc"\n'))
    n = InProcessNode(config)
    try:
        assert n.node._terminator is None
        creds = fed.creds(fed.person("hs-ok", "engineer", "factory-2"))
        with open_channel(n.address, creds, peer_node_id="factory-2") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    finally:
        n.stop()
    config.write_text(text.replace("\n[server]\n", '\n[server]\ntls_terminator = "nginx"\n'))
    with pytest.raises(ConfigError, match=r"server\.tls_terminator must be 'gateway'"):
        load_config(config)


def test_graceful_stop_lets_a_download_in_flight_finish_through_the_terminator(
    fed: Federation, tmp_path: Path
) -> None:
    """On stop no new connection is accepted, but an open stream finishes within grace.

    Every byte arrives and hashes to the object id."""
    n = InProcessNode(write_config(fed, tmp_path, "factory-3", "factory"))
    stopper: threading.Thread | None = None
    try:
        src = tmp_path / "object.bin"
        src.write_bytes(os.urandom(24 * 1024 * 1024))
        with n.self_client() as client:
            object_id = client.submit(src, []).object.object_id
        creds = fed.creds(fed.person("hs-reader", "engineer", "factory-3"))
        with open_channel(n.address, creds, peer_node_id="factory-3") as ch:
            stream = query_pb2_grpc.QueryStub(ch).ReadObject(
                query_pb2.ReadObjectRequest(object_id=object_id), timeout=60
            )
            digest = hashlib.sha256()
            first = next(stream)
            digest.update(first.chunk.data)
            stopper = threading.Thread(target=n.node.stop, kwargs={"grace": 30.0})
            stopper.start()
            terminator = n.node._terminator
            assert terminator is not None
            deadline = time.monotonic() + 30
            while not terminator._closing.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as err:  # a new connection is not accepted
                _health(n, creds.grpc_credentials())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            for msg in stream:  # the open stream goes on
                digest.update(msg.chunk.data)
        assert digest.hexdigest() == object_id
        stopper.join(timeout=60)
        assert not stopper.is_alive()
    finally:
        if stopper is None:
            n.stop()


def test_socket_folder_of_a_killed_node_is_swept_by_the_next_start(
    federation: Federation, tmp_path: Path
) -> None:
    """The terminator's private socket folder is removed on stop; one a SIGKILL left
    behind is removed by the next node that starts on the host (its pid is gone)."""
    parent = Path(tempfile.gettempdir())

    def folders_of(pid: int) -> list[Path]:
        return [
            d
            for d in parent.glob(f"{SOCKET_DIR_PREFIX}*")
            if (d / "pid").exists() and (d / "pid").read_text() == str(pid)
        ]

    config = write_config(federation, tmp_path, "factory-1", "factory")
    killed = NodeProcess(config, tmp_path / "killed.log")
    killed.start()
    assert killed.proc is not None
    pid = killed.proc.pid
    (folder,) = folders_of(pid)
    assert (folder / "grpc.sock").exists() and oct(folder.stat().st_mode & 0o777) == "0o700"
    killed.kill()
    assert folders_of(pid) == [folder]  # nothing could clean up after SIGKILL
    already = set(folders_of(os.getpid()))  # nodes of other tests in this process
    node = InProcessNode(config)
    try:
        assert not folder.exists()  # swept at the next start
        (own,) = set(folders_of(os.getpid())) - already
    finally:
        node.stop()
    assert not own.exists()  # a clean stop removes its own


def test_idle_sockets_of_one_address_cannot_take_every_handshake_slot(
    federation: Federation, tmp_path: Path
) -> None:
    """A peer that opens TCP connections and never starts TLS holds a handshake slot each
    until the handshake timeout: at most server.max_pending_handshakes_per_address of
    them; the next one from that address is closed at once, and a client from another
    address still gets in."""
    config = write_config(federation, tmp_path, "factory-1", "factory")
    text = config.read_text()
    config.write_text(
        text.replace(
            'listen = "127.0.0.1:0"',
            'listen = "127.0.0.1:0"\nmax_pending_handshakes_per_address = 3',
            1,
        )
    )
    assert load_config(config).server.max_pending_handshakes_per_address == 3
    node = InProcessNode(config)
    idle: list[socket.socket] = []
    try:
        terminator = node.node._terminator
        assert terminator is not None
        for _ in range(3):
            idle.append(
                socket.create_connection(
                    ("127.0.0.1", node.port), timeout=10, source_address=("127.0.0.2", 0)
                )
            )
        wait_for(lambda: terminator.pending_handshakes() == 3, 15, what="3 pending handshakes")
        with socket.create_connection(
            ("127.0.0.1", node.port), timeout=10, source_address=("127.0.0.2", 0)
        ) as extra:
            assert extra.recv(1) == b""  # closed by the node before any TLS
        assert terminator.pending_handshakes() == 3
        creds = federation.creds(federation.person("hs-slots", "engineer", "factory-1"))
        with open_channel(node.address, creds, peer_node_id="factory-1") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert status.status == health_pb2.HealthCheckResponse.SERVING  # from 127.0.0.1
    finally:
        for sock in idle:
            sock.close()
        node.stop()


def test_handshake_caps_must_be_positive(federation: Federation, tmp_path: Path) -> None:
    config = write_config(federation, tmp_path, "factory-1", "factory")
    config.write_text(
        config.read_text().replace(
            'listen = "127.0.0.1:0"', 'listen = "127.0.0.1:0"\nmax_pending_handshakes = 0', 1
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert "server.max_pending_handshakes must be at least 1, not 0" in str(err.value)
