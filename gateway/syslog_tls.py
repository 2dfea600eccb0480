"""Deliver ATNA audit messages to a syslog collector: RFC 5424 over TLS (RFC 5425).

:class:`SyslogTLSSender` frames one XML audit message as ``MSG-LEN SP SYSLOG-MSG``
(RFC 5425 octet counting) around an RFC 5424 message ``<PRI>1 TIMESTAMP HOSTNAME
APP-NAME PROCID MSGID - BOM XML`` (facility 10 "security/authorization" and
MSGID ``DICOM+RFC3881`` as DICOM PS3.15 A.6 says; severity 5 for success). It
verifies the collector's certificate against a CA and presents a client
certificate when given one (mutual TLS).

:class:`AtnaForwarder` is what a node runs: a background thread that reads new
entries from the durable audit log (read-only), converts them with
:mod:`gateway.atna` and delivers them synchronously; the last delivered seq is
kept in a small state file, so a restart or an unreachable collector loses
nothing (events wait in the audit log itself) and the node's request paths never
touch the network for auditing. RFC 5425 has no application acknowledgement:
delivery is at-least-once; after a crash at most the message in flight is sent
again, and each message names its audit entry (``urn:yigong:audit:<node>:<seq>``)
so a collector can drop repeats.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from gateway import atna, audit
from gateway.audit import AuditEvent, AuditLog, canonical_json
from gateway.backoff import Backoff
from gateway.errors import AuditError

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV: Final = 10  # "security/authorization messages" (PS3.15 A.6)
FACILITY_LOG_AUDIT: Final = 13
DEFAULT_PORT: Final = 6514  # syslog over TLS (RFC 5425)
DEFAULT_MSGID: Final = "DICOM+RFC3881"  # PS3.15 A.6
BOM: Final = b"\xef\xbb\xbf"  # RFC 5424 MSG-UTF8
MAX_MESSAGE_BYTES: Final = 65536  # PS3.15 A.6 requires at least 32768
STATE_FORMAT: Final = "yigong-atna-state/1"
_PRINTUSASCII: Final = re.compile(r"[!-~]+")


def _field(value: str, what: str, limit: int) -> str:
    if not _PRINTUSASCII.fullmatch(value) or len(value) > limit:
        raise AuditError(
            f"syslog {what} {value!r} must be 1-{limit} printable ASCII characters, no spaces"
        )
    return value


def _reason(exc: BaseException) -> str:
    """A short human reason for a socket or TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or exc.reason)
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class SyslogTLSSender:
    """A TLS connection to one syslog collector; thread-safe.

    :meth:`deliver` writes one message now (or raises :class:`AuditError`);
    :meth:`send` queues it for a background thread and never blocks (when the
    bounded queue is full the message is dropped and counted)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        app_name: str = "yigong",
        hostname: str,
        timeout: float = 10.0,
        facility: int = FACILITY_AUTHPRIV,
        queue_size: int = 1000,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if not host or not 0 < port < 65536:
            raise AuditError(
                f"syslog collector address {host!r}:{port} is not HOST and PORT 1-65535"
            )
        if not 0 <= facility <= 23:
            raise AuditError(f"syslog facility must be 0-23, not {facility}")
        if (cert is None) != (key is None):
            raise AuditError("syslog client certificate and key go together: give both or neither")
        self.host, self.port, self.ca, self.timeout = host, port, Path(ca), timeout
        self.address = f"{host}:{port}"
        self.app_name = _field(app_name, "APP-NAME", 48)
        self.hostname = _field(hostname, "HOSTNAME", 255)
        self.facility = facility
        self.max_message_bytes = max_message_bytes
        self.procid = str(os.getpid())
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only ``ca`` is trusted
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            self._ctx.load_verify_locations(cafile=str(ca))
            if cert is not None and key is not None:
                self._ctx.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(str(f) for f in (ca, cert, key) if f is not None)
            raise AuditError(
                f"syslog TLS for {self.address}: cannot load {files}: {_reason(exc)}"
            ) from exc
        self._sock: ssl.SSLSocket | None = None
        self._lock = threading.Lock()  # the connection (held during network I/O)
        self._state_lock = threading.Lock()  # worker start and drop count: never waits on I/O
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=queue_size)
        self._dropped = 0
        self._worker: threading.Thread | None = None
        self._closing = threading.Event()

    # -- the message --
    def format(
        self,
        msg_xml: bytes,
        *,
        severity: int,
        msgid: str = DEFAULT_MSGID,
        when: datetime | None = None,
    ) -> bytes:
        """The RFC 5424 SYSLOG-MSG (without framing) carrying ``msg_xml``."""
        if not 0 <= severity <= 7:
            raise AuditError(f"syslog severity must be 0-7, not {severity}")
        try:
            msg_xml.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AuditError(f"syslog message is not UTF-8: {exc}") from exc
        stamp = (when or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        msgid = _field(msgid, "MSGID", 32)
        header = f"<{self.facility * 8 + severity}>1 {stamp} {self.hostname} {self.app_name} "
        return f"{header}{self.procid} {msgid} -".encode("ascii") + b" " + BOM + msg_xml

    @staticmethod
    def frame(syslog_msg: bytes) -> bytes:
        """RFC 5425 octet-counting frame: ``MSG-LEN SP SYSLOG-MSG``."""
        return b"%d %s" % (len(syslog_msg), syslog_msg)

    # -- synchronous delivery --
    def deliver(self, msg_xml: bytes, *, severity: int, msgid: str = DEFAULT_MSGID) -> None:
        """Write one message to the collector now; :class:`AuditError` if it cannot."""
        self._write(self.frame(self.format(msg_xml, severity=severity, msgid=msgid)))

    def _write(self, frame: bytes) -> None:
        if len(frame) > self.max_message_bytes:
            raise AuditError(
                f"syslog message of {len(frame)} bytes exceeds {self.max_message_bytes} bytes"
            )
        with self._lock:
            while True:
                reused = self._sock is not None and self._closed(self._sock) is None
                if not reused:
                    self._disconnect()
                    self._sock = self._connect()
                try:
                    assert self._sock is not None
                    self._sock.sendall(frame)
                    return
                except (OSError, ssl.SSLError) as exc:
                    self._disconnect()
                    if not reused:  # a stale connection gets one fresh attempt
                        where = f"syslog collector {self.address}"
                        raise AuditError(f"{where}: write failed: {_reason(exc)}") from exc
                    log.info("syslog connection to %s lost (%s); reconnecting", self.address, exc)

    def _connect(self) -> ssl.SSLSocket:
        where = f"syslog collector {self.address}"
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise AuditError(f"{where}: cannot connect: {_reason(exc)}") from exc
        try:
            tls = self._ctx.wrap_socket(raw, server_hostname=self.host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise AuditError(
                f"{where}: its TLS certificate is not trusted ({_reason(exc)}); it must be "
                f"issued by the CA in {self.ca} for the name {self.host!r}"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise AuditError(f"{where}: TLS handshake failed: {_reason(exc)}") from exc
        if tls.version() == "TLSv1.3":
            # The server checks our certificate after the client's handshake ends; wait
            # briefly for its verdict (session tickets or an alert) so that a refused
            # client certificate fails here instead of silently eating the first message.
            select.select([tls], [], [], min(self.timeout, 1.0))
            if (why := self._closed(tls)) is not None:
                tls.close()
                raise AuditError(
                    f"{where}: refused the connection after the TLS handshake ({why}); does "
                    "it accept this node's client certificate?"
                )
        log.info("connected to %s (%s)", where, tls.version())
        return tls

    def _closed(self, sock: ssl.SSLSocket) -> str | None:
        """Why the collector closed ``sock``, or None while it is open. A collector
        never sends data: anything readable is EOF, close_notify or an alert."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable and not sock.pending():
                return None
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
            finally:
                sock.settimeout(self.timeout)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return None  # only TLS housekeeping (e.g. session tickets) arrived
        except (OSError, ssl.SSLError, ValueError) as exc:
            return _reason(exc)
        return None if data else "end of stream"

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    # -- queued delivery --
    @property
    def dropped(self) -> int:
        """Messages :meth:`send` dropped because the queue was full or the sender closed."""
        return self._dropped

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def send(self, msg_xml: bytes, *, severity: int, msgid: str = DEFAULT_MSGID) -> bool:
        """Queue one message for the background thread; False if it was dropped."""
        frame = self.frame(self.format(msg_xml, severity=severity, msgid=msgid))
        if self._closing.is_set():
            self._count_drop("sender is closed")
            return False
        self.start()
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._count_drop(f"queue full ({self._queue.maxsize} messages)")
            return False
        return True

    def _count_drop(self, why: str, n: int = 1) -> None:
        with self._state_lock:
            before, self._dropped = self._dropped, self._dropped + n
        if before == 0 or before // 100 != self._dropped // 100:
            log.warning(
                "syslog to %s: %s; %d messages dropped so far (replay them from the audit log)",
                self.address,
                why,
                self._dropped,
            )

    def start(self) -> None:
        """Start the background thread of :meth:`send` (idempotent)."""
        with self._state_lock:
            if self._worker is None and not self._closing.is_set():
                self._worker = threading.Thread(
                    target=self._drain, name=f"syslog-{self.address}", daemon=True
                )
                self._worker.start()

    def _drain(self, backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        frame: bytes | None = None
        backoff, failures = Backoff(backoff_initial, backoff_max), 0
        while True:
            if frame is None:
                try:
                    frame = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if self._closing.is_set():
                        return
                    continue
            try:
                self._write(frame)
                frame, failures = None, 0
            except AuditError as exc:
                failures += 1
                delay = backoff.delay(failures)
                log.warning("%s; %d queued, retry in %.1f s", exc, self.pending + 1, delay)
                if self._closing.wait(delay):
                    self._count_drop("closed while the collector was unreachable", 1 + self.pending)
                    return

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background thread (after it empties the queue, up to ``timeout``)."""
        self._closing.set()
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
        with self._lock:
            self._disconnect()

    def replay(
        self,
        audit_log: AuditLog | Path,
        after_seq: int,
        *,
        federation: str,
        node_id: str | None = None,
        msgid: str = DEFAULT_MSGID,
        peer_addresses: Mapping[str, str] | None = None,
    ) -> int:
        """Deliver every exported event with seq > ``after_seq`` now; returns how many.

        ``node_id`` (the log's owner) is needed when ``audit_log`` is a path."""
        if isinstance(audit_log, AuditLog):
            path, node = audit_log.path, node_id or audit_log.node_id
        elif node_id is None:
            raise AuditError(f"replay of {audit_log}: give the node id that owns the log")
        else:
            path, node = Path(audit_log), node_id
        return deliver_events(
            self,
            path,
            after_seq,
            federation=federation,
            node_id=node,
            msgid=msgid,
            peer_addresses=peer_addresses,
        )


Progress = Callable[[AuditEvent, bool], None]
_HASHED: Final = "seq time event actor outcome object_id transfer_id peer case_id details".split()


def deliver_events(
    sender: SyslogTLSSender,
    audit_path: audit.AuditSource,
    after_seq: int,
    *,
    node_id: str,
    federation: str,
    msgid: str = DEFAULT_MSGID,
    peer_addresses: Mapping[str, str] | None = None,
    on_progress: Progress | None = None,
    batch: int = 500,
) -> int:
    """Convert and deliver events after ``after_seq`` in order until the log's end.

    ``on_progress(event, sent)`` runs after each event is delivered (``sent``) or
    skipped (not exported). Raises :class:`AuditError` at the first failed delivery."""
    sent = 0
    while True:
        events = audit.read_events(audit_path, after_seq=after_seq, limit=batch)
        for event in events:
            message = atna.to_atna_message(
                event, node_id=node_id, federation=federation, peer_addresses=peer_addresses
            )
            if message is not None and len(message.xml) > sender.max_message_bytes - 512:
                log.error("ATNA message for audit entry %d is too large; not sent", event.seq)
                message = None
            if message is not None:
                sender.deliver(message.xml, severity=message.severity, msgid=msgid)
                sent += 1
            after_seq = event.seq
            if on_progress is not None:
                on_progress(event, message is not None)
        if len(events) < batch:
            return sent


def default_state_file(audit_path: Path) -> Path:
    """Where the forwarder keeps its position: next to the audit log."""
    return Path(audit_path).with_name(Path(audit_path).name + ".atna-state.json")


class AtnaForwarder:
    """Forwards a node's audit log to a collector, resuming after the last delivered seq."""

    def __init__(
        self,
        audit_path: audit.AuditSource,
        node_id: str,
        federation: str,
        sender: SyslogTLSSender,
        state_file: Path,
        *,
        poll_seconds: float = 5.0,
        max_backoff_seconds: float = 60.0,
        msgid: str = DEFAULT_MSGID,
        peer_addresses: Mapping[str, str] | None = None,
    ) -> None:
        if poll_seconds <= 0:
            raise AuditError(f"ATNA poll interval must be positive, not {poll_seconds}")
        self.audit_path, self.node_id, self.federation = audit_path, node_id, federation
        self.sender, self.state_file, self.msgid = sender, Path(state_file), msgid
        self.poll_seconds, self.max_backoff_seconds = poll_seconds, max_backoff_seconds
        self.peer_addresses = dict(peer_addresses or {})
        self.last_seq, self._last_hash = self._load_state()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- state --
    def _load_state(self) -> tuple[int, str | None]:
        path = self.state_file
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return 0, None
        except (OSError, ValueError) as exc:
            raise AuditError(
                f"ATNA forwarder state {path} is unreadable ({exc}); delete it to send the "
                "whole audit log again"
            ) from exc
        data = data if isinstance(data, dict) else {}
        seq = data.get("last_seq")
        if data.get("format") != STATE_FORMAT or not isinstance(seq, int) or seq < 0:
            raise AuditError(f"ATNA forwarder state {path} is not a {STATE_FORMAT} file")
        if data.get("node_id") != self.node_id:
            raise AuditError(
                f"ATNA forwarder state {path} belongs to node {data.get('node_id')!r}, "
                f"not {self.node_id!r}"
            )
        last_hash = data.get("last_hash")
        return seq, last_hash if isinstance(last_hash, str) else None

    def _save_state(self) -> None:
        doc = {"format": STATE_FORMAT, "node_id": self.node_id, "last_seq": self.last_seq}
        doc["last_hash"] = self._last_hash
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump(doc, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.state_file)
        except OSError as exc:
            raise AuditError(f"cannot write ATNA forwarder state {self.state_file}: {exc}") from exc

    # -- forwarding --
    def _run(self, after_seq: int) -> int:
        dirty = False

        def progress(event: AuditEvent, sent: bool) -> None:
            nonlocal dirty
            if event.seq <= self.last_seq:
                return  # a replay of something delivered before
            fields = [getattr(event, f) for f in _HASHED[:-1]] + [canonical_json(event.details)]
            follows = bool(self._last_hash) and event.seq == self.last_seq + 1
            if audit.entry_hash(event.prev_hash, fields) != event.entry_hash or (
                follows and event.prev_hash != self._last_hash
            ):
                log.error(
                    "audit log %s: entry %d does not match its hash or does not link to the "
                    "entry forwarded before it (edited or rewritten?); run 'yigong audit verify'",
                    self.audit_path,
                    event.seq,
                )
            self.last_seq, self._last_hash = event.seq, event.entry_hash
            dirty = not sent
            if sent:
                self._save_state()

        try:
            return deliver_events(
                self.sender,
                self.audit_path,
                after_seq,
                federation=self.federation,
                node_id=self.node_id,
                msgid=self.msgid,
                peer_addresses=self.peer_addresses,
                on_progress=progress,
            )
        finally:
            if dirty:
                self._save_state()

    def forward_once(self) -> int:
        """Deliver every new audit event; returns how many messages were sent.

        Raises :class:`AuditError` when the collector cannot be reached; what was
        delivered before that is remembered."""
        with self._lock:
            return self._run(self.last_seq)

    def replay(self, after_seq: int) -> int:
        """Send again every event after ``after_seq`` (e.g. the collector lost data)."""
        with self._lock:
            return self._run(after_seq)

    def wake(self) -> None:
        """Poll now instead of at the next interval."""
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="atna-forwarder", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        failures = 0
        backoff = Backoff(self.poll_seconds, max(self.poll_seconds, self.max_backoff_seconds))
        while not self._stop.is_set():
            delay = self.poll_seconds
            try:
                self.forward_once()
                if failures:
                    log.info("ATNA forwarding to %s resumed", self.sender.address)
                failures = 0
            except AuditError as exc:
                failures += 1
                delay = min(backoff.delay(failures), self.max_backoff_seconds)
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "ATNA forwarding failed %d time(s): %s; events wait in the audit log "
                        "after seq %d; retry in %.1f s",
                        failures,
                        exc,
                        self.last_seq,
                        delay,
                    )
            except Exception:
                log.exception("ATNA forwarder: unexpected error; retrying")
            self._wake.wait(delay)
            self._wake.clear()

    def stop(self, *, flush: bool = True, timeout: float = 10.0) -> None:
        """Stop polling; with ``flush``, try once more to deliver what is new."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if flush:
            try:
                self.forward_once()
            except AuditError as exc:
                log.warning(
                    "ATNA forwarder: final delivery failed (%s); resumes at next start", exc
                )
        self.sender.close(timeout)
