"""TLS in front of the node's gRPC server, so that every refused certificate is audited.

grpcio's Python API has no client-certificate verification callback
(``grpc.ssl_server_credentials`` only takes ``require_client_auth``; see
grpc/grpc#32635): a certificate its TLS refuses leaves no trace a node can audit.
So, by default (``server.tls_terminator = "gateway"``), the node does the TLS
handshake itself on its one public port:

* The handshake requests a client certificate and takes any at TLS level (a
  verify callback); the certificate is then checked with the node's
  :class:`~gateway.pki.TrustStore` (issuer and signature, validity window: what
  gRPC's TLS checked). A refused one ends the handshake — the connection is
  closed, as gRPC's TLS did, so clients see the same error — and is reported to
  ``on_refused`` (the Gatekeeper audits it as ``auth.refused``, stage
  ``tls_handshake``): peer address, the refusal's kind (``no_certificate``,
  ``other_ca``, ``self_signed``, ``issuer_not_ca``, ``expired``,
  ``not_yet_valid``) and the certificate's serial, subject and issuer where one
  was presented. Connections that fail for other reasons (not TLS, no HTTP/2,
  the client refusing *our* certificate) are logged, not audited.
* An accepted connection is forwarded, decrypted, to the gRPC server listening
  on a Unix socket in a private directory (mode 0700). Each forwarded
  connection binds its own socket file there, which gRPC reports as the call's
  peer (``context.peer() == "unix:<path>"``); the terminator maps that path to
  the client's certificate and address, and the
  :class:`~gateway.rpc.auth.Gatekeeper` reads them from there and checks the
  certificate on every call as before (issuer, validity, revocation, identity,
  authorization). A connection to the internal socket that did not come through
  the terminator has no entry, and every call on it is refused.
* Stopping: :meth:`TlsTerminator.close_listener` first (no new connections),
  then gRPC's graceful stop, then :meth:`TlsTerminator.stop`, which lets open
  connections pass on what gRPC already sent before cutting them.

Each connection is one thread per direction. The TLS records are decrypted and
encrypted by OpenSSL (pyOpenSSL) with memory BIOs, so each direction moves what
one socket read returns (up to 1 MiB from the client) per round, and one
OpenSSL object is never used by two threads at once (a lock). The cost on a
transfer is measured in bench/README.md ("TLS terminator").
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto

from gateway.errors import (
    AuthenticationError,
    CertificateError,
    ConfigError,
    ExpiredCertificate,
    PKIError,
    UntrustedCertificate,
)
from gateway.pki import TrustStore
from gateway.rpc.proxy_protocol import ProxyHeaderError, read_header

log = logging.getLogger(__name__)

BUFFER = 256 * 1024  # one socket read
UP_BUFFER = 1024 * 1024  # one read of what the client sends (the bulk of a transfer)
UNIX_SNDBUF = 4 * 1024 * 1024  # what may be in flight to gRPC: fewer wake-ups
RECORD = 16 * 1024  # the most plaintext one TLS record holds (one SSL_read)
BIO_READ = 64 * 1024  # below malloc's mmap threshold: no mmap per read
HANDSHAKE_TIMEOUT = 15.0
ALPN = b"h2"


@dataclass(frozen=True)
class Caller:
    """A connection that passed the handshake: its client certificate and address."""

    cert_pem: bytes
    remote: str  # "ipv4:10.0.0.5:53122", as gRPC's context.peer() spells it


@dataclass(frozen=True)
class HandshakeRefusal:
    """A client certificate (or its absence) refused during the TLS handshake."""

    remote: str
    kind: str  # no_certificate | other_ca | self_signed | issuer_not_ca | expired | ...
    error: CertificateError | AuthenticationError
    cert: x509.Certificate | None = None


def _peer_string(addr: tuple[object, ...]) -> str:
    host, port = str(addr[0]), addr[1]
    if ":" in host:
        if host.startswith("::ffff:") and "." in host:
            return f"ipv4:{host[7:]}:{port}"
        return f"ipv6:[{host}]:{port}"
    return f"ipv4:{host}:{port}"


def classify(
    trust: TrustStore,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    at: datetime | None = None,
) -> HandshakeRefusal | None:
    """Why the handshake refuses ``cert`` (with the ``chain`` the client sent), or None.

    Checks what TLS checks: issued by the federation CA, inside its validity
    window. Revocation and the identity the certificate asserts are checked on
    every call by the Gatekeeper, which answers with a message the caller sees.
    """
    try:
        trust.check_issued(cert, at)
    except UntrustedCertificate as exc:
        return HandshakeRefusal("", _untrusted_kind(trust, cert, chain), exc, cert)
    except ExpiredCertificate as exc:
        when = datetime.now(UTC) if at is None else at
        early = when < cert.not_valid_before_utc
        return HandshakeRefusal("", "not_yet_valid" if early else "expired", exc, cert)
    return None


def _untrusted_kind(
    trust: TrustStore, cert: x509.Certificate, chain: list[x509.Certificate]
) -> str:
    if cert.issuer == cert.subject and _issued_by(cert, cert):
        return "self_signed"
    for issuer in chain:
        if issuer != cert and _issued_by(cert, issuer) and _issued_by(issuer, trust.ca_cert):
            return "issuer_not_ca"  # signed by a federation certificate that is not the CA
    return "other_ca"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):
        return False
    return True


@dataclass
class _Handshake:
    """Verification state of one connection's handshake (the verify callback's notes)."""

    remote: str
    by_depth: dict[int, x509.Certificate] = field(default_factory=dict)
    refusal: HandshakeRefusal | None = None
    checked: bool = False


SOCKET_DIR_PREFIX = "yigong-grpc-"
MAX_PENDING_HANDSHAKES = 256  # connections in their TLS handshake, in all
MAX_PENDING_PER_ADDRESS = 16  # ... and from one client address
DROP_LOG_SECONDS = 10.0


def sweep_stale_socket_dirs(parent: Path) -> int:
    """Remove the socket folders that nodes killed without a stop (SIGKILL, a crash) left
    in ``parent``: ours (same user), holding the pid of a process that no longer runs.
    Returns how many were removed."""
    removed = 0
    for folder in parent.glob(f"{SOCKET_DIR_PREFIX}*"):
        try:
            if folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            pid = int((folder / "pid").read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being created: leave it
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # a process of another user has that pid now
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d socket folder(s) of stopped nodes from %s", removed, parent)
    return removed


class TlsTerminator:
    """The node's public TLS port; forwards accepted connections to the gRPC server."""

    def __init__(
        self,
        listen: str,
        *,
        cert_pem: bytes,
        key_pem: bytes,
        trust: TrustStore,
        on_refused: Callable[[HandshakeRefusal], None],
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_pending: int = MAX_PENDING_HANDSHAKES,
        max_pending_per_address: int = MAX_PENDING_PER_ADDRESS,
        alpn: bytes = ALPN,
        backend_name: str = "grpc.sock",
        proxy_from: Sequence[str] = (),
    ) -> None:
        self.listen = listen
        # Load balancers whose connections begin with a PROXY protocol header naming the
        # real client (gateway/rpc/proxy_protocol.py); nobody else's first bytes are read
        # as one.
        self.proxy_from = tuple(ipaddress.ip_network(n, strict=False) for n in proxy_from)
        # The one application protocol the port speaks (h2: gRPC; http/1.1: the web
        # console) and the name of the backend's Unix socket in the private directory.
        self.alpn = alpn
        self.backend_name = backend_name
        self.trust = trust
        self.on_refused = on_refused
        self.handshake_timeout = handshake_timeout
        # Connections still in their TLS handshake, in all and per client address: a
        # peer that opens sockets and sends nothing holds one each until the handshake
        # timeout; beyond these caps a new connection is closed at once.
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self._pending: dict[str, int] = {}
        self._dropped = 0
        self._dropped_logged = 0.0
        self._ctx = self._context(cert_pem, key_pem)
        self._callers: dict[str, Caller] = {}
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)  # notified when a socket closes
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        # gRPC listens on a Unix socket in a directory only this process's user can
        # enter; each forwarded connection binds its own socket file there, which is
        # the peer address gRPC reports for it (context.peer() == "unix:<that path>").
        short = len(tempfile.gettempdir()) <= 64  # a Unix socket path holds < 108 bytes
        parent = Path(tempfile.gettempdir() if short else "/tmp")
        sweep_stale_socket_dirs(parent)
        self._dir = Path(tempfile.mkdtemp(prefix=SOCKET_DIR_PREFIX, dir=parent))
        (self._dir / "pid").write_text(str(os.getpid()))  # whose it is, for the sweep
        self.backend_path = self._dir / backend_name
        self.backend_address = f"unix:{self.backend_path}"
        self._serial = itertools.count(1)
        self._closing = threading.Event()
        self._accepter: threading.Thread | None = None
        self.port = 0

    def _context(self, cert_pem: bytes, key_pem: bytes) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.use_certificate(x509.load_pem_x509_certificate(cert_pem))
        ctx.use_privatekey(serialization.load_pem_private_key(key_pem, None))  # type: ignore[arg-type]
        ctx.check_privatekey()
        ctx.add_client_ca(self.trust.ca_cert)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        ctx.set_alpn_select_callback(self._select_alpn)
        ctx.set_session_id(b"yigong-gateway")
        return ctx

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> Any:
        return self.alpn if self.alpn in offered else SSL.NO_OVERLAPPING_PROTOCOLS

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> int:
        """Bind the public port, forward to :attr:`backend_address`; returns the port."""
        self._listener = _bind(self.listen)
        self.port = self._listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, name="tls-accept", daemon=True)
        self._accepter.start()
        return self.port

    def close_listener(self) -> None:
        """Accept no new connections (graceful stop: connections already open go on)."""
        self._closing.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._accepter is not None:
            self._accepter.join(timeout=5)

    def stop(self, drain: float = 5.0) -> None:
        """Close the listener; let open connections pass on what the gRPC server already
        sent (it closes them once stopped) for up to ``drain`` seconds, then cut them."""
        self.close_listener()
        deadline = time.monotonic() + drain
        with self._drained:
            while self._open and time.monotonic() < deadline:
                self._drained.wait(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            open_now = list(self._open)
            self._callers.clear()
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        shutil.rmtree(self._dir, ignore_errors=True)

    def caller(self, peer: str) -> Caller | None:
        """The client behind the internal connection ``peer`` (gRPC's context.peer())."""
        with self._lock:
            return self._callers.get(peer)

    # ------------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self._closing.is_set():
                    return
                log.exception("accept on %s failed", self.listen)
                time.sleep(0.1)  # e.g. out of file descriptors: do not spin
                continue
            remote = _peer_string(addr)
            host = str(addr[0]).removeprefix("::ffff:")
            proxied = self._is_proxy(host)
            if not self._admit(host, per_address=not proxied):
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            threading.Thread(
                target=self._serve, args=(sock, remote, host, proxied), name=f"tls {remote}",
                daemon=True,
            ).start()  # fmt: skip

    def _is_proxy(self, host: str) -> bool:
        if not self.proxy_from:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self.proxy_from)

    def _admit(self, host: str, *, per_address: bool = True) -> bool:
        """Count a new connection from ``host`` as pending its handshake, unless that
        exceeds ``max_pending`` or ``max_pending_per_address`` (a load balancer's
        connections are capped per *client* once its PROXY header is read). Dropped
        connections are logged at most every DROP_LOG_SECONDS (not audited one by one: a
        flood of them must not become a flood of audit writes)."""
        with self._lock:
            if sum(self._pending.values()) < self.max_pending and (
                not per_address or self._pending.get(host, 0) < self.max_pending_per_address
            ):
                self._pending[host] = self._pending.get(host, 0) + 1
                return True
            self._dropped += 1
            now = time.monotonic()
            if now - self._dropped_logged < DROP_LOG_SECONDS:
                return False
            self._dropped_logged, dropped, self._dropped = now, self._dropped, 0
        log.warning(
            "closed %d connection(s) before their TLS handshake: too many handshakes pending "
            "(at most %d in all, %d per address; latest from %s)",
            dropped,
            self.max_pending,
            self.max_pending_per_address,
            host,
        )
        return False

    def _behind_proxy(self, client: socket.socket, remote: str, host: str) -> tuple[str, str]:
        """Read the PROXY header of a load balancer's connection: the client's (remote,
        host), its pending handshake now counted against that client's address. Raises
        ``OSError``/``ProxyHeaderError`` (connection to be closed) without the header or
        when that client is at its per-address cap."""
        real = read_header(client, self.handshake_timeout)
        if real is None:  # LOCAL/UNKNOWN: the balancer's own health check
            return remote, host
        new_remote = _peer_string(real)
        new_host = real[0].removeprefix("::ffff:")
        with self._lock:
            if self._pending.get(new_host, 0) >= self.max_pending_per_address:
                raise ProxyHeaderError(
                    f"client {new_host} (via {host}) has {self.max_pending_per_address} "
                    "handshakes pending already"
                )
            self._pending[host] = self._pending.get(host, 0) - 1
            if self._pending[host] <= 0:
                self._pending.pop(host)
            self._pending[new_host] = self._pending.get(new_host, 0) + 1
        return new_remote, new_host

    def _handshake_over(self, host: str) -> None:
        with self._lock:
            left = self._pending.get(host, 0) - 1
            if left > 0:
                self._pending[host] = left
            else:
                self._pending.pop(host, None)

    def pending_handshakes(self) -> int:
        with self._lock:
            return sum(self._pending.values())

    def _track(self, sock: socket.socket, on: bool) -> None:
        with self._lock:
            if on:
                self._open.add(sock)
            else:
                self._open.discard(sock)
                self._drained.notify_all()

    def _serve(self, client: socket.socket, remote: str, host: str, proxied: bool) -> None:
        self._track(client, True)
        try:
            try:
                if proxied:
                    try:
                        remote, host = self._behind_proxy(client, remote, host)
                    except (ProxyHeaderError, OSError) as exc:
                        quiet = isinstance(exc, ProxyHeaderError) and exc.empty
                        log.log(
                            logging.DEBUG if quiet else logging.WARNING,
                            "connection from %s closed: %s", remote, exc,
                        )  # fmt: skip
                        return
                conn = self._handshake(client, remote)
            finally:
                self._handshake_over(host)
            if conn is not None:
                self._forward(client, conn, remote)
        except Exception:
            log.exception("TLS connection from %s failed", remote)
        finally:
            self._track(client, False)
            with contextlib.suppress(OSError):
                client.close()

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
    ) -> bool:
        """OpenSSL's verify callback: note the chain, decide with the TrustStore at depth 0."""
        state: _Handshake = conn.get_app_data()
        try:
            state.by_depth[depth] = cert.to_cryptography()
            if depth != 0:
                return True
            if not state.checked:
                state.checked = True
                chain = [c for d, c in sorted(state.by_depth.items()) if d > 0]
                found = classify(self.trust, state.by_depth[0], chain)
                if found is not None:
                    state.refusal = dataclasses.replace(found, remote=state.remote)
            return state.refusal is None
        except PKIError as exc:  # e.g. the CA certificate cannot be used
            log.error("cannot check client certificate from %s: %s", state.remote, exc)
            return False
        except Exception:
            log.exception("checking the client certificate from %s failed", state.remote)
            return False

    def _handshake(self, client: socket.socket, remote: str) -> SSL.Connection | None:
        client.settimeout(self.handshake_timeout)
        conn = SSL.Connection(self._ctx, None)
        state = _Handshake(remote)
        conn.set_app_data(state)
        conn.set_accept_state()
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                if not _flush(conn, client):
                    return None
                try:
                    data = client.recv(BUFFER)
                except OSError as exc:
                    log.info("TLS handshake with %s: %s", remote, exc)
                    return None
                if not data:
                    log.info("TLS handshake with %s: connection closed by the client", remote)
                    return None
                conn.bio_write(data)
            except SSL.Error as exc:
                # The alert OpenSSL wrote is not sent: the client sees the connection
                # close, as it did when gRPC's TLS refused it (and reports it the same way).
                self._refused(state, exc)
                _linger(client)
                return None
        if not _flush(conn, client):
            return None
        if conn.get_alpn_proto_negotiated() != self.alpn:
            log.info(
                "TLS connection from %s did not negotiate %s; closed",
                remote,
                self.alpn.decode("ascii", "replace"),
            )
            return None
        client.settimeout(None)
        return conn

    def _refused(self, state: _Handshake, exc: SSL.Error) -> None:
        refusal = state.refusal
        if refusal is None and not state.by_depth and "did not return a certificate" in str(exc):
            refusal = HandshakeRefusal(
                state.remote,
                "no_certificate",
                AuthenticationError(
                    "no client certificate presented; connect with a certificate issued "
                    f"by federation CA '{self.trust.federation_name}'"
                ),
            )
        if refusal is None:
            log.info("TLS handshake with %s failed: %s", state.remote, exc)
            return
        log.warning("refused TLS connection from %s: %s", state.remote, refusal.error)
        try:
            self.on_refused(refusal)
        except Exception:
            log.exception("could not audit the refused connection from %s", state.remote)

    def _forward(self, client: socket.socket, conn: SSL.Connection, remote: str) -> None:
        cert = conn.get_peer_certificate()
        assert cert is not None
        log.debug(
            "TLS from %s: %s %s", remote, conn.get_protocol_version_name(), conn.get_cipher_name()
        )
        pem = cert.to_cryptography().public_bytes(serialization.Encoding.PEM)
        path = self._dir / f"c{next(self._serial)}"
        key = f"unix:{path}"
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(OSError):
            backend.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        with self._lock:
            self._callers[key] = Caller(pem, remote)
            self._open.add(backend)
        try:
            backend.bind(str(path))
            backend.connect(str(self.backend_path))
        except OSError as exc:
            log.error("cannot reach the node's server at %s: %s", self.backend_address, exc)
            self._release_backend(key, backend, path)
            return
        with contextlib.suppress(OSError):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pipe = _Pipe(conn, client, backend)
        down = threading.Thread(target=pipe.down, name=f"tls {remote} down", daemon=True)
        down.start()
        try:
            pipe.up()
            down.join()
        finally:
            self._release_backend(key, backend, path)

    def _release_backend(self, key: str, backend: socket.socket, path: Path) -> None:
        """Forget the caller of a forwarded connection, then close its internal socket
        (in that order: no other connection can then be taken for this caller)."""
        with self._lock:
            self._callers.pop(key, None)
            self._open.discard(backend)
            self._drained.notify_all()
        backend.close()
        path.unlink(missing_ok=True)


class _Pipe:
    """Both directions of one accepted connection."""

    def __init__(self, conn: SSL.Connection, client: socket.socket, backend: socket.socket):
        self.conn, self.client, self.backend = conn, client, backend
        self.tls = threading.Lock()  # the OpenSSL object: one thread at a time
        self.send = threading.Lock()  # records reach the client in the order made

    def _encrypted(self) -> bytes:
        out = []
        while True:
            try:
                out.append(self.conn.bio_read(BIO_READ))
            except SSL.WantReadError:
                return b"".join(out)

    def up(self) -> None:
        """Client → gRPC server: decrypt what arrives, pass it on."""
        conn, closed = self.conn, False
        buf = bytearray(UP_BUFFER)
        view = memoryview(buf)
        # Application data that came with the client's last handshake flight is in
        # OpenSSL already: pass it on before waiting for the socket (a client that sends
        # its request with its Finished message then waits for the answer).
        pending = True
        try:
            while not closed:
                n = 0
                if not pending:
                    n = self.client.recv_into(buf)
                    if not n:
                        break
                pending = False
                plain: list[bytes] = []
                self.tls.acquire()
                try:
                    if n:
                        conn.bio_write(view[:n])
                    while True:
                        try:
                            plain.append(conn.recv(RECORD))
                        except SSL.WantReadError:
                            break
                        except SSL.ZeroReturnError:
                            closed = True
                            break
                    out = self._encrypted()  # e.g. an answer to a key update
                    if out:
                        self.send.acquire()
                finally:
                    self.tls.release()
                if out:
                    try:
                        self.client.sendall(out)
                    finally:
                        self.send.release()
                if plain:
                    _send_all(self.backend, plain)
        except (OSError, SSL.Error) as exc:
            log.debug("client side closed: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                self.backend.shutdown(socket.SHUT_WR)

    def down(self) -> None:
        """gRPC server → client: encrypt what the server says, send it."""
        conn = self.conn
        try:
            while True:
                data = self.backend.recv(BUFFER)
                self.tls.acquire()
                try:
                    if data:
                        conn.sendall(data)
                    else:
                        conn.shutdown()  # close_notify
                    out = self._encrypted()
                    self.send.acquire()
                finally:
                    self.tls.release()
                try:
                    self.client.sendall(out)
                finally:
                    self.send.release()
                if not data:
                    break
        except (OSError, SSL.Error) as exc:
            log.debug("server side closed: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)


def _send_all(sock: socket.socket, parts: list[bytes]) -> None:
    """Send ``parts`` in order without joining them (one copy less)."""
    views = [memoryview(p) for p in parts]
    while views:
        sent = sock.sendmsg(views[:512])
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def _flush(conn: SSL.Connection, sock: socket.socket) -> bool:
    out = []
    while True:
        try:
            out.append(conn.bio_read(BIO_READ))
        except SSL.WantReadError:
            break
    if out:
        try:
            sock.sendall(b"".join(out))
        except OSError:
            return False
    return True


def _linger(sock: socket.socket, seconds: float = 2.0) -> None:
    """Close our side with a FIN, not a reset: read what the client still sends first."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        while sock.recv(BUFFER):
            pass
    except OSError:
        pass




def _bind(listen: str) -> socket.socket:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(
            None if host in ("0.0.0.0", "::", "*") else host,
            int(port),
            socket.AF_UNSPEC,
            socket.SOCK_STREAM,
            0,
            socket.AI_PASSIVE,
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
    if host == "0.0.0.0":
        infos = [i for i in infos if i[0] == socket.AF_INET] or infos
    elif host in ("::", "*"):
        infos = sorted(infos, key=lambda i: i[0] != socket.AF_INET6)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {listen}: {exc.strerror or exc}; is another process using the port?"
        ) from exc
    return sock
