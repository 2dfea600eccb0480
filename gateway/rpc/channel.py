"""Client side of mTLS: credentials from files and channels to nodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.errors import ConfigError
from gateway.identity import node_dns_name

MESSAGE_LIMIT = 8 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Bigger HTTP/2 windows: throughput of large streams on fast links.
    ("grpc.http2.lookahead_bytes", 4 * 1024 * 1024),
]


@dataclass(frozen=True)
class ClientCredentials:
    """PEM material a client presents: federation CA, own certificate and key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def from_files(cls, ca: Path, cert: Path, key: Path) -> ClientCredentials:
        def read(path: Path, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc

        return cls(read(ca, "CA certificate"), read(cert, "certificate"), read(key, "private key"))

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_pem,
            certificate_chain=self.cert_pem,
        )


def open_channel(
    address: str, creds: ClientCredentials, *, peer_node_id: str | None = None
) -> grpc.Channel:
    """A TLS channel to ``address`` presenting ``creds``.

    With ``peer_node_id`` the server must present the certificate of that node
    (its ``<id>.node.yigong`` name is checked), whatever address it is reached at.
    """
    options = list(CHANNEL_OPTIONS)
    if peer_node_id:
        options.append(("grpc.ssl_target_name_override", node_dns_name(peer_node_id)))
    return grpc.secure_channel(address, creds.grpc_credentials(), options=options)
