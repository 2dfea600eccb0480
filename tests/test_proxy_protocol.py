"""PROXY protocol headers (HAProxy ``send-proxy`` / ``send-proxy-v2``) read off a real
socket: the client's address comes out, exactly the header's bytes are consumed (the TLS
ClientHello behind it stays for the handshake), anything else is refused."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.audit import AUTH_REFUSED, DICOM_ASSOCIATION_ACCEPTED, DICOM_ASSOCIATION_REFUSED
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.identity import node_dns_name
from gateway.rpc.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    read_header,
)
from tests.cluster import Federation, InProcessNode, wait_for, write_config

HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # the start of a TLS ClientHello


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def _rest(sock: socket.socket) -> bytes:
    sock.settimeout(1)
    return sock.recv(100)


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (encode_v1("203.0.113.7", 51234, "10.0.0.2", 7443), ("203.0.113.7", 51234)),
        (encode_v1("2001:db8::7", 4000, "2001:db8::2", 7443), ("2001:db8::7", 4000)),
        (encode_v2("203.0.113.7", 51234, "10.0.0.2", 7443), ("203.0.113.7", 51234)),
        (encode_v2("2001:db8::7", 4000, "2001:db8::2", 7443), ("2001:db8::7", 4000)),
        (b"PROXY UNKNOWN\r\n", None),
        (V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]), None),  # LOCAL: HAProxy's health check
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4", "v2-ipv6", "v1-unknown", "v2-local"],
)
def test_header_gives_the_client_and_leaves_the_tls_bytes(
    pair: tuple[socket.socket, socket.socket], header: bytes, want: tuple[str, int] | None
) -> None:
    a, b = pair
    a.sendall(header + HELLO)
    assert read_header(b, timeout=2) == want
    assert _rest(b) == HELLO


def test_header_split_over_several_segments(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    header = encode_v2("198.51.100.9", 1, "10.0.0.2", 7443)

    def dribble() -> None:
        for i in range(0, len(header), 5):
            a.sendall(header[i : i + 5])
        a.sendall(HELLO)

    threading.Timer(0.05, dribble).start()
    assert read_header(b, timeout=3) == ("198.51.100.9", 1)
    assert _rest(b) == HELLO


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (HELLO, "does not start with a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed PROXY v1 header"),
        (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "malformed PROXY v1 address"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "does not match its family"),
        (b"PROXY TCP4 " + b"1" * 120, "without CRLF"),
        (V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + bytes(12), "version 3"),
        (V2_SIGNATURE + bytes([0x21, 0x31, 0, 4]) + bytes(4), "family 0x31"),
    ],
    ids=["tls-first", "v1-short", "v1-bad-ip", "v1-family", "v1-no-crlf", "v2-version", "v2-unix"],
)
def test_anything_else_is_refused_with_a_reason(
    pair: tuple[socket.socket, socket.socket], data: bytes, why: str
) -> None:
    a, b = pair
    a.sendall(data)
    with pytest.raises(ProxyHeaderError, match=why):
        read_header(b, timeout=1)


def test_a_silent_proxy_times_out(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"PRO")
    with pytest.raises((ProxyHeaderError, TimeoutError)):
        read_header(b, timeout=0.3)


# --- the node's terminator behind a load balancer that sends PROXY v2 -------------------


class _Balancer:
    """A TCP forwarder that opens each connection to the node with a PROXY v2 header
    naming ``client`` (what HAProxy's ``send-proxy-v2`` does)."""

    def __init__(self, backend: tuple[str, int], client: tuple[str, int]) -> None:
        self.backend, self.client = backend, client
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.backend)
            up.sendall(encode_v2(*self.client, "127.0.0.1", self.backend[1]))
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def _with_balancer(conf: Path, value: str) -> Path:
    text = conf.read_text()
    assert "[server]\n" in text
    conf.write_text(text.replace("[server]\n", f"[server]\nproxy_protocol_from = {value}\n"))
    return conf


@pytest.fixture
def proxied_node(federation: Federation, tmp_path: Path) -> Iterator[InProcessNode]:
    conf = _with_balancer(
        write_config(federation, tmp_path, "factory-1", "factory"), '["127.0.0.1"]'
    )
    node = InProcessNode(conf)
    yield node
    node.stop()


def _health(address: str, creds: grpc.ChannelCredentials) -> int:
    options = [("grpc.ssl_target_name_override", node_dns_name("factory-1"))]
    with grpc.secure_channel(address, creds, options=options) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status)


def test_behind_a_balancer_the_client_address_is_audited_and_calls_work(
    proxied_node: InProcessNode, federation: Federation, tmp_path: Path
) -> None:
    balancer = _Balancer(("127.0.0.1", proxied_node.port), ("203.0.113.9", 4711))
    try:
        via = f"127.0.0.1:{balancer.port}"
        good = federation.creds(federation.person("pp-eng", "engineer", "factory-1"))
        assert _health(via, good.grpc_credentials()) == health_pb2.HealthCheckResponse.SERVING
        stranger = Federation(tmp_path / "other-ca").person("pp-eve", "engineer", "factory-1")
        bad = grpc.ssl_channel_credentials(
            root_certificates=federation.ca.read_bytes(),
            private_key=stranger.key_path.read_bytes(),
            certificate_chain=stranger.cert_path.read_bytes(),
        )
        with pytest.raises(grpc.RpcError):
            _health(via, bad)

        def refusal() -> list[object]:
            return [
                e for e in proxied_node.node.audit.events(event=AUTH_REFUSED)
                if e.details.get("stage") == "tls_handshake"
            ]  # fmt: skip

        wait_for(lambda: refusal(), 15, what="auth.refused of the stranger")
        (event,) = refusal()
        assert event.details["remote"] == "ipv4:203.0.113.9:4711"  # not the balancer's
    finally:
        balancer.close()


def test_a_listed_balancer_without_header_is_closed_unlisted_clients_are_unaffected(
    proxied_node: InProcessNode, federation: Federation, tmp_path: Path
) -> None:
    good = federation.creds(federation.person("pp-eng2", "engineer", "factory-1"))
    # 127.0.0.1 is listed as a balancer: a direct TLS connection from it has no header
    with pytest.raises(grpc.RpcError) as err:
        _health(proxied_node.address, good.grpc_credentials())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    refused = [
        e for e in proxied_node.node.audit.events(event=AUTH_REFUSED)
        if e.details.get("stage") == "tls_handshake"
    ]  # fmt: skip
    assert refused == []  # closed before any TLS: nothing to audit as a certificate refusal
    # the same node without the setting serves that client directly
    plain = InProcessNode(write_config(federation, tmp_path / "plain", "factory-2", "factory"))
    try:
        options = [("grpc.ssl_target_name_override", node_dns_name("factory-2"))]
        with grpc.secure_channel(plain.address, good.grpc_credentials(), options=options) as ch:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(), timeout=10)
                .status
            )
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        plain.stop()


@pytest.mark.parametrize(
    ("value", "why"),
    [('["10.0.0.300"]', "is not an IP address or network")],
)
def test_a_bad_balancer_address_is_a_config_error(
    federation: Federation, tmp_path: Path, value: str, why: str
) -> None:
    conf = _with_balancer(write_config(federation, tmp_path, "factory-1", "factory"), value)
    with pytest.raises(ConfigError, match=why):
        load_config(conf)


# --- the hospital's DICOM port behind a load balancer -----------------------------------


def _echo(port: int) -> tuple[bool, int | None]:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="YIGONG")
    try:
        if not assoc.is_established:
            return False, None
        return True, int(assoc.send_c_echo().Status)
    finally:
        if assoc.is_established:
            assoc.release()


def test_dicom_behind_a_balancer_checks_and_audits_the_pacs_address(
    federation: Federation, tmp_path: Path
) -> None:
    dicom = {
        "allowed_addresses": ["203.0.113.0/24"],  # the modalities, not the balancer
        "proxy_protocol_from": ["127.0.0.1"],
        "quiet_period_seconds": 3600.0,
    }
    node = InProcessNode(write_config(federation, tmp_path, "hospital-1", "hospital", dicom=dicom))
    scp = node.node.hooks._dicom  # type: ignore[attr-defined]
    allowed = _Balancer(("127.0.0.1", scp.port), ("203.0.113.5", 40001))
    stranger = _Balancer(("127.0.0.1", scp.port), ("198.51.100.7", 40002))
    try:
        assert _echo(allowed.port) == (True, 0x0000)  # a modality in allowed_addresses
        assert _echo(stranger.port) == (False, None)  # refused by its real address
        assert _echo(scp.port) == (False, None)  # the balancer's address without a header

        def refused() -> list[Any]:
            node.settle()
            return node.node.audit.events(event=DICOM_ASSOCIATION_REFUSED, limit=1000)

        wait_for(lambda: refused(), 10, what="the stranger's refusal audited")
        assert [e.peer for e in refused()] == ["198.51.100.7"]
        accepted = node.node.audit.events(event=DICOM_ASSOCIATION_ACCEPTED, limit=1000)
        assert [e.peer for e in accepted] == ["203.0.113.5"]
    finally:
        allowed.close()
        stranger.close()
        node.stop()
