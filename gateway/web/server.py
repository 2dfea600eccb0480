"""The console's HTTPS port: the node's TLS terminator in front of uvicorn.

The terminator (:class:`gateway.rpc.terminator.TlsTerminator`, ALPN ``http/1.1``) does
the TLS handshake with a required client certificate (refusals audited, as on the gRPC
port) and forwards each accepted connection, decrypted, to uvicorn on a Unix socket in
a private directory; each forwarded connection binds its own socket file, which
:class:`PeerProtocol` puts into the request's ``scope["client"]`` so the application
finds the connection's certificate (:meth:`ConsoleServer.caller`). uvicorn runs its own
event loop in one thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import ConfigError
from gateway.pki import TrustStore
from gateway.rpc.terminator import Caller, HandshakeRefusal, TlsTerminator

log = logging.getLogger(__name__)

ALPN_HTTP1 = b"http/1.1"


class PeerProtocol(H11Protocol):
    """uvicorn's h11 protocol, telling the application which forwarded connection a
    request came on: the path of the socket file the terminator bound for it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, str) and peer:
            self.client = (f"unix:{peer}", 0)


class ConsoleServer:
    """Serves one ASGI application on the console's HTTPS port."""

    def __init__(
        self,
        app: Any,
        listen: str,
        *,
        cert_pem: bytes,
        key_pem: bytes,
        trust: TrustStore,
        on_refused: Callable[[HandshakeRefusal], None],
        max_pending: int,
        max_pending_per_address: int,
        idle_seconds: float,
        proxy_from: Sequence[str] = (),
    ) -> None:
        self.terminator = TlsTerminator(
            listen,
            cert_pem=cert_pem,
            key_pem=key_pem,
            trust=trust,
            on_refused=on_refused,
            max_pending=max_pending,
            max_pending_per_address=max_pending_per_address,
            alpn=ALPN_HTTP1,
            backend_name="console.sock",
            proxy_from=proxy_from,
        )
        config = uvicorn.Config(
            app,
            uds=str(self.terminator.backend_path),
            http=PeerProtocol,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_keep_alive=int(max(1, idle_seconds)),
            server_header=False,
            date_header=True,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.port = 0

    def caller(self, peer: str) -> Caller | None:
        """The client certificate and address behind the forwarded connection ``peer``."""
        return self.terminator.caller(peer)

    def start(self, timeout: float = 10.0) -> int:
        """Start uvicorn, then open the public port; returns the port."""
        self._thread = threading.Thread(target=self._server.run, name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.terminator.stop(drain=0)
                raise ConfigError(
                    f"the web console could not start on {self.terminator.backend_address}; "
                    "see the node's log"
                )
            time.sleep(0.01)
        try:
            self.port = self.terminator.start()
        except ConfigError:
            self.stop()
            raise
        return self.port

    def stop(self, drain: float = 2.0) -> None:
        self.terminator.close_listener()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=drain + 5)
            self._thread = None
        self.terminator.stop(drain=drain)
