"""The PROXY protocol (v1 text and v2 binary, as HAProxy's ``send-proxy``/``send-proxy-v2``
write it): who the client really is when a TCP load balancer sits in front.

HAProxy in ``mode tcp`` passes the TLS bytes through untouched, so each replica still
terminates mTLS and sees the client's certificate — but the TCP peer is HAProxy. With
``send-proxy-v2`` on HAProxy's ``server`` lines and the proxy's address in
``server.proxy_protocol_from``, the node's terminator reads this header first and uses
the client's address for everything that names or counts addresses: the audit log
(``auth.refused``), and the per-address cap of pending handshakes. A connection from an
address *not* listed never has its first bytes read as a header (a client cannot claim
another address), and a listed proxy's connection without a valid header is closed.

Only the header's bytes are consumed (``MSG_PEEK`` first): the TLS ClientHello after it
is left for the handshake.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included (the specification's figure)


class ProxyHeaderError(Exception):
    """The bytes are not a PROXY protocol header (control flow: the terminator closes
    the connection and logs why; never leaves gateway/rpc/terminator.py).

    ``empty``: the connection closed without sending a byte — a load balancer's TCP
    health check, logged at debug level only."""

    def __init__(self, message: str, *, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty


def _peek(sock: socket.socket, want: int, deadline: float) -> bytes:
    """At least ``want`` bytes (or all the peer sent before closing), without consuming."""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(want, socket.MSG_PEEK)
        if len(data) >= want or not data:
            return data
        if b"\r\n" in data and not data.startswith(V2_SIGNATURE[: len(data)]):
            return data  # a complete v1 line shorter than ``want``
        if time.monotonic() >= deadline:
            raise ProxyHeaderError("timed out waiting for the PROXY header")
        time.sleep(0.005)


def _consume(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise ProxyHeaderError("connection closed inside the PROXY header")
        got += len(chunk)


def read_header(sock: socket.socket, timeout: float) -> tuple[str, int] | None:
    """Read one PROXY header from ``sock``: the client's (address, port), or None for a
    LOCAL/UNKNOWN header (a health check of the proxy itself). Raises
    :class:`ProxyHeaderError` when the first bytes are not a header."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        head = sock.recv(16, socket.MSG_PEEK)
        if not head:
            raise ProxyHeaderError("connection closed before its PROXY header", empty=True)
        if head.startswith(b"PROXY "):
            return _v1(sock, deadline)
        if len(head) >= 16 and head.startswith(V2_SIGNATURE):
            return _v2(sock, head, deadline)
        if not (V2_SIGNATURE.startswith(head[:12]) or b"PROXY ".startswith(head[:6])):
            raise ProxyHeaderError("the connection does not start with a PROXY protocol header")
        if time.monotonic() >= deadline:
            raise ProxyHeaderError("timed out waiting for the PROXY header")
        time.sleep(0.005)


def _v1(sock: socket.socket, deadline: float) -> tuple[str, int] | None:
    line = _peek(sock, V1_MAX, deadline)
    end = line.find(b"\r\n")
    if end < 0:
        raise ProxyHeaderError("PROXY v1 header without CRLF in its first 107 bytes")
    _consume(sock, end + 2)
    parts = line[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 header ({len(parts)} fields)")
    try:
        address = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError as exc:
        raise ProxyHeaderError(f"malformed PROXY v1 address: {exc}") from exc
    if (address.version == 4) != (parts[1] == "TCP4") or not 0 <= port <= 65535:
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    return str(address), port


def _v2(sock: socket.socket, head: bytes, deadline: float) -> tuple[str, int] | None:
    ver_cmd, family, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header of version {ver_cmd >> 4}")
    total = 16 + length
    whole = _peek(sock, total, deadline)
    if len(whole) < total:
        raise ProxyHeaderError("connection closed inside the PROXY v2 header")
    _consume(sock, total)
    command = ver_cmd & 0x0F
    if command == 0x0:  # LOCAL: the proxy's own connection (health check)
        return None
    if command != 0x1:
        raise ProxyHeaderError(f"PROXY v2 command {command} unknown")
    body = whole[16:total]
    if family == 0x11 and length >= 12:  # TCP over IPv4
        src = ipaddress.IPv4Address(body[0:4])
        (port,) = struct.unpack("!H", body[8:10])
        return str(src), port
    if family == 0x21 and length >= 36:  # TCP over IPv6
        src6 = ipaddress.IPv6Address(body[0:16])
        (port,) = struct.unpack("!H", body[32:34])
        return str(src6), port
    if family == 0x00:  # UNSPEC
        return None
    raise ProxyHeaderError(f"PROXY v2 address family 0x{family:02x} not supported")


def encode_v1(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """A v1 header (for tests and tools)."""
    fam = "TCP4" if ipaddress.ip_address(src).version == 4 else "TCP6"
    return f"PROXY {fam} {src} {dst} {src_port} {dst_port}\r\n".encode()


def encode_v2(src: str, src_port: int, dst: str, dst_port: int) -> bytes:
    """A v2 PROXY header for TCP (for tests and tools)."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", src_port, dst_port)
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
