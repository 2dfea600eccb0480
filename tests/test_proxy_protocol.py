"""PROXY protocol headers (HAProxy ``send-proxy`` / ``send-proxy-v2``) read off a real
socket: the client's address comes out, exactly the header's bytes are consumed (the TLS
ClientHello behind it stays for the handshake), anything else is refused."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from gateway.rpc.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    read_header,
)

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
