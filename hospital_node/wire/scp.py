"""The DICOM SCP that PACS and modalities push to (C-ECHO, C-STORE).

Thin (DESIGN.md "Rules of the house"): a handler takes what came over the wire to a
domain call — :meth:`hospital_node.spool.DicomSpool.receive` (durable and validated;
filed right after) — and its outcome back to a
DIMSE status via the one translator :mod:`hospital_node.wire.dimse`. Decisions here are
only about the association: who may associate, and TCP details.

- Presentation contexts: every storage SOP Class pynetdicom knows, with the transfer
  syntaxes of :data:`STORAGE_TRANSFER_SYNTAXES` (uncompressed, deflated, JPEG,
  JPEG-LS, JPEG 2000, HTJ2K, RLE); Verification. Data sets are stored as received.
- Refused at association, with an A-ASSOCIATE-RJ and a ``dicom.association_refused``
  audit event: a peer address outside ``dicom.allowed_addresses`` (IP addresses or
  networks; empty = any), a calling AE title outside ``dicom.allowed_calling_aes``
  (empty = any), a called AE title other than ``dicom.ae_title`` (or
  ``dicom.auto_forward_called_ae``), and associations beyond
  ``dicom.max_associations`` (pynetdicom's own "local limit exceeded"), and
  associations beyond ``dicom.max_associations_per_address`` from one peer address
  (same PS3.8 reason, our own check), so a few misbehaving peers cannot take every slot.
- Idle peers: ``dicom.idle_timeout_seconds`` is pynetdicom's ``network_timeout`` (no
  PDU from the peer for this long: A-ABORT), ``acse_timeout`` (a connection that sends
  no A-ASSOCIATE-RQ is closed) and ``dimse_timeout``. The clock starts again after
  each of our answers, so time spent answering (e.g. waiting for room in the spool)
  never counts as the peer's silence. A request cut off by the timeout (a C-STORE
  whose data set never followed its command) is never answered, stored or
  acknowledged: the association is aborted and a ``dicom.association_refused`` event
  names the request, the timeout and what had arrived.
- Latency: pynetdicom sets neither TCP_NODELAY nor TCP_QUICKACK on accepted sockets.
  dcmtk's storescu writes each PDU header and body with two write() calls and keeps
  Nagle's algorithm on, so without a prompt ACK from us every instance waited ~40 ms
  for Linux's delayed ACK. Every accepted socket gets TCP_NODELAY, and TCP_QUICKACK is
  re-armed after each read (see docs/dicom-ingest.md for the measurement).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from io import BytesIO
from typing import Any, cast

from opentelemetry.trace import Span
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from gateway.audit import DICOM_ASSOCIATION_ACCEPTED, DICOM_ASSOCIATION_REFUSED, AuditLog
from gateway.config import DicomSection
from gateway.errors import ConfigError, ShuttingDown, YigongError
from gateway.rpc.proxy_protocol import ProxyHeaderError, read_header
from gateway.telemetry import Telemetry
from hospital_node.ingest import wrap_dataset
from hospital_node.spool import DicomSpool
from hospital_node.wire import dimse

log = logging.getLogger(__name__)

UNCOMPRESSED = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
LOSSLESS_COMPRESSED = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (Process 14, selection value 1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
)
LOSSY_COMPRESSED = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    *LOSSLESS_COMPRESSED,
    *UNCOMPRESSED,
    *LOSSY_COMPRESSED,
)
"""Accepted for every storage SOP Class. When one presentation context offers several,
the first in this order wins (pynetdicom picks by the acceptor's order): a losslessly
compressed instance is never decompressed by the sender, and an uncompressed one is
never lossy-compressed — lossy syntaxes are taken only when nothing else is offered."""

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
_RJ_NO_REASON = (0x01, 0x01, 0x01)
_RJ_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x01, 0x07)
_RJ_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider (presentation), limit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def parse_networks(
    entries: tuple[str, ...], key: str = "dicom.allowed_addresses"
) -> tuple[Network, ...]:
    nets: list[Network] = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(
                f"{key}: {entry!r} is not an IP address or network "
                "(e.g. 10.1.2.3 or 10.1.2.0/24)"
            ) from exc
    return tuple(nets)


PROXY_HEADER_SECONDS = 2.0
"""How long a listed load balancer has to send its PROXY header."""


class ProxiedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server, reading a PROXY protocol header first on connections from a
    listed load balancer: the PACS's address in it becomes the association's requestor
    address (checked against ``dicom.allowed_addresses``, capped, audited). A listed
    balancer's connection without a valid header is closed; nobody else's first bytes
    are read as one."""

    proxy_from: tuple[Network, ...] = ()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        if not _address_allowed(str(address[0]), self.proxy_from) or not self.proxy_from:
            return client, address
        try:
            real = read_header(client, PROXY_HEADER_SECONDS)
        except (ProxyHeaderError, OSError) as exc:
            quiet = isinstance(exc, ProxyHeaderError) and exc.empty  # a health check
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "DICOM connection from %s closed: %s", address[0], exc,
            )  # fmt: skip
            client.close()
            raise OSError(f"no PROXY header from {address[0]}") from exc
        client.settimeout(None)
        return client, (real if real is not None else address)


def _address_allowed(address: str, nets: tuple[Network, ...]) -> bool:
    if not nets:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def _address_key(address: str) -> str:
    """The peer address associations are counted by (IPv4-mapped IPv6 as IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _restart_idle_clock(assoc: Any) -> None:
    """Start the association's idle (network) timeout again: the peer waited for our
    answer, that was not its silence. pynetdicom restarts it only when a PDU arrives."""
    timer = getattr(getattr(assoc, "dul", None), "_idle_timer", None)
    if timer is not None:
        timer.restart()


def _pending_request(assoc: Any) -> dict[str, str | int]:
    """What had arrived of a DIMSE message that never completed (empty if none)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    if message is None:
        return {}
    command = getattr(message, "command_set", None)
    field = int(getattr(command, "CommandField", 0) or 0)
    names = {0x0001: "C-STORE-RQ", 0x0030: "C-ECHO-RQ"}
    data = getattr(message, "data_set", None)
    return {
        "request": names.get(field, f"0x{field:04X}" if field else "(command incomplete)"),
        "sop_instance_uid": str(getattr(command, "AffectedSOPInstanceUID", "") or ""),
        "data_set_bytes": len(data.getbuffer()) if isinstance(data, BytesIO) else 0,
    }


def _titles(assoc: Any) -> tuple[str, str, str]:
    """(calling AE title, called AE title, peer address) of an association request."""
    rq = assoc.requestor.primitive
    calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
    called = str(getattr(rq, "called_ae_title", "") or "").strip()
    return calling, called, str(assoc.requestor.address)


class _AssociationSpan:
    """An open association's span and what happened on it."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.stored = 0
        self.refused = 0

    def end(self) -> None:
        self.span.set_attribute("yigong.instances_stored", self.stored)
        self.span.set_attribute("yigong.instances_refused", self.refused)
        self.span.end()


class DicomServer:
    """The hospital node's DICOM listener; :meth:`start` binds, :meth:`stop` ends it."""

    def __init__(
        self,
        cfg: DicomSection,
        spool: DicomSpool,
        audit: AuditLog,
        node_id: str,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.telemetry = telemetry
        self._spans: dict[int, _AssociationSpan] = {}
        self.cfg = cfg
        self.spool = spool
        self.audit = audit
        self.node_id = node_id
        self.tcp_nodelay = True  # both switchable only to measure what they are worth
        self.tcp_quickack = True
        self.port = 0
        self._networks = parse_networks(cfg.allowed_addresses)
        self._calling = frozenset(ae.strip() for ae in cfg.allowed_calling_aes)
        self._called = frozenset(t for t in (cfg.ae_title, cfg.auto_forward_called_ae) if t)
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._by_address: dict[str, set[Any]] = {}  # peer address -> its associations
        if logging.getLogger("pynetdicom").level == logging.NOTSET:
            # pynetdicom logs every association and message at INFO: keep it to problems.
            logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    # -- lifecycle --------------------------------------------------------
    def start(self) -> int:
        """Bind ``dicom.listen`` and serve in background threads; return the bound port."""
        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_associations = cfg.max_associations
        ae.network_timeout = cfg.idle_timeout_seconds
        ae.acse_timeout = cfg.idle_timeout_seconds
        ae.dimse_timeout = cfg.idle_timeout_seconds
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), list(STORAGE_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, list(UNCOMPRESSED))
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        host, port = parse_listen(cfg.listen)
        proxies = parse_networks(cfg.proxy_protocol_from, "dicom.proxy_protocol_from")
        server_class = type(
            "ProxiedServer", (ProxiedAssociationServer,), {"proxy_from": proxies}
        )
        try:
            # start_server(block=False) with our server class: make_server + a thread
            server = ae.make_server(
                (host, port), evt_handlers=handlers, ae_title=cfg.ae_title,
                server_class=server_class,
            )  # fmt: skip
            threading.Thread(
                target=server.serve_forever, name="dicom-accept", daemon=True
            ).start()
            ae._servers.append(server)  # as start_server does: its shutdown() removes it
        except OSError as exc:
            raise ConfigError(
                f"dicom.listen {cfg.listen}: cannot listen ({exc.strerror or exc}); "
                "is another process using the port?"
            ) from exc
        assert server is not None  # block=False returns the server
        self._ae, self._server = ae, server
        self.port = int(server.server_address[1])
        log.info(
            "DICOM SCP %s listening on %s:%d (max %d associations, %d per address, "
            "idle timeout %g s, PDU %d bytes)", cfg.ae_title, host, self.port,
            cfg.max_associations, cfg.max_associations_per_address,
            cfg.idle_timeout_seconds, cfg.max_pdu_bytes,
        )  # fmt: skip
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let running associations finish for ``grace`` seconds, then
        abort them. An instance whose response was not sent is sent again by the PACS;
        if it had been stored, the resend is recognised as identical."""
        if self._server is None or self._ae is None:
            return
        self._stopping.set()
        self._server.shutdown()
        deadline = time.monotonic() + grace
        for assoc in self._ae.active_associations:
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in self._ae.active_associations:
            assoc.abort()
            assoc.join(2.0)
        self._server = None
        log.info("DICOM SCP %s stopped", self.cfg.ae_title)

    # -- association ------------------------------------------------------
    def _on_conn_open(self, event: evt.Event) -> None:
        """Low latency per instance: TCP_NODELAY for our writes, and TCP_QUICKACK re-armed
        after every read so the peer's Nagle algorithm is not left waiting ~40 ms for our
        delayed ACK between a PDU header and its body (dcmtk writes them separately)."""
        asock: Any = event.assoc.dul.socket
        sock = asock.socket
        try:
            if self.tcp_nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.warning("could not set TCP_NODELAY on a DICOM connection: %s", exc)
        if not (self.tcp_quickack and hasattr(socket, "TCP_QUICKACK")):
            return
        read = asock.recv

        def recv_and_ack(nr_bytes: int) -> bytearray:
            data: bytearray = read(nr_bytes)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:  # connection gone: the read above already told the DUL
                pass
            return data

        asock.recv = recv_and_ack

    def _refusal(self, address: str, calling: str, called: str) -> tuple[tuple[int, ...], str]:
        if not _address_allowed(address, self._networks):
            return _RJ_NO_REASON, "peer address not in dicom.allowed_addresses"
        if self._calling and calling not in self._calling:
            return _RJ_CALLING_AE, "calling AE title not in dicom.allowed_calling_aes"
        if called not in self._called:
            return _RJ_CALLED_AE, "called AE title is not this node's"
        return (), ""

    def _admit(self, assoc: Any, address: str) -> str:
        """Count ``assoc`` against its peer address; the refusal reason if that address
        already holds ``dicom.max_associations_per_address`` associations."""
        limit = self.cfg.max_associations_per_address
        with self._lock:
            held = self._by_address.setdefault(_address_key(address), set())
            held.difference_update([a for a in held if not a.is_alive()])
            if len(held) >= limit:
                return (
                    f"peer address already holds {len(held)} association(s) "
                    f"(dicom.max_associations_per_address={limit}); release one and retry"
                )
            held.add(assoc)
        return ""

    def associations_from(self, address: str) -> int:
        """Associations open (or being negotiated) from the peer address ``address``."""
        with self._lock:
            held = self._by_address.get(_address_key(address), set())
            return sum(1 for a in held if a.is_alive())

    def _forget(self, assoc: Any) -> None:
        with self._lock:
            key = _address_key(str(assoc.requestor.address))
            held = self._by_address.get(key)
            if held is not None:
                held.discard(assoc)
                if not held:
                    del self._by_address[key]

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling, called, address = _titles(assoc)
        rsd, why = self._refusal(address, calling, called)
        if not rsd:
            why = self._admit(assoc, address)
            if not why:
                return
            rsd = _RJ_LOCAL_LIMIT
        assoc.acse.send_reject(*rsd)
        self._audit_refused(address, calling, called, why, rsd)
        assoc.kill()  # as pynetdicom's own rejections: wait for the peer to close

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (e.g. dicom.max_associations reached)."""
        self._forget(event.assoc)
        rj: Any = event.assoc.acceptor.primitive
        rsd = tuple(int(getattr(rj, k, 0) or 0) for k in ("result", "result_source", "diagnostic"))
        why = str(getattr(rj, "reason_str", "") or "refused by the DICOM stack")
        calling, called, address = _titles(event.assoc)
        self._audit_refused(address, calling, called, why, rsd)

    def _on_aborted(self, event: evt.Event) -> None:
        """An association aborted by either side. Audited when our idle timeout cut off
        a request (its command or data set incomplete): it gets no answer and nothing of
        it is stored; the PACS sends it again on a new association."""
        assoc: Any = event.assoc
        pending = _pending_request(assoc)
        calling, called, address = _titles(assoc)
        idle = bool(getattr(assoc, "is_acceptor", False)) and assoc.dul.idle_timer_expired()
        timeout = self.cfg.idle_timeout_seconds
        if not idle:
            if pending:
                log.warning(
                    "DICOM association from %s (calling %r) aborted in the middle of a %s; "
                    "nothing of it was stored", address, calling, pending["request"],
                )  # fmt: skip
            return
        if not pending:
            log.info(
                "DICOM association from %s (calling %r) idle for dicom.idle_timeout_seconds"
                "=%g: aborted", address, calling, timeout,
            )  # fmt: skip
            return
        why = (
            f"{pending['request']} incomplete: nothing more arrived for "
            f"dicom.idle_timeout_seconds={timeout:g} (data set bytes received: "
            f"{pending['data_set_bytes']}); association aborted, nothing stored or acknowledged"
        )
        self._audit_refused(
            address, calling, called, why, ("A-ABORT",),
            sop_instance_uid=str(pending["sop_instance_uid"]),
        )  # fmt: skip

    def _audit_refused(
        self,
        address: str,
        calling: str,
        called: str,
        why: str,
        rsd: tuple[int | str, ...],
        **more: str,
    ) -> None:
        log.warning(
            "DICOM association from %s (calling %r, called %r) refused: %s",
            address, calling, called, why,
        )  # fmt: skip
        try:
            self.audit.record(
                DICOM_ASSOCIATION_REFUSED,
                actor=f"dicom-ae:{calling}",
                outcome="failure",
                peer=address,
                details={
                    "calling_ae": calling,
                    "called_ae": called,
                    "reason": why,
                    "reject": "/".join(str(v) for v in rsd),
                    **{k: v for k, v in more.items() if v},
                },
            )
        except YigongError as exc:
            log.error("could not audit a refused DICOM association: %s", exc)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling, called, address = _titles(assoc)
        if self.telemetry is not None:
            self._spans[id(assoc)] = _AssociationSpan(
                self.telemetry.start_span(
                    "yigong.dicom.association",
                    calling_ae=calling,
                    called_ae=called,
                    peer=address,
                    contexts=len(assoc.accepted_contexts),
                )
            )
        log.info("DICOM association from %s (calling %r, called %r)", address, calling, called)
        try:
            self.audit.record(
                DICOM_ASSOCIATION_ACCEPTED,
                actor=f"dicom-ae:{calling}",
                peer=address,
                details={
                    "calling_ae": calling,
                    "called_ae": called,
                    "peer_port": int(assoc.requestor.port),
                    "contexts": len(assoc.accepted_contexts),
                    "max_pdu": int(assoc.requestor.maximum_length or 0),
                },
            )
        except YigongError as exc:  # the association goes on; each instance is audited
            log.error("could not audit an accepted DICOM association: %s", exc)

    def _on_conn_close(self, event: evt.Event) -> None:
        self._forget(event.assoc)
        span = self._spans.pop(id(event.assoc), None)
        if span is not None:
            span.end()

    # -- DIMSE services ---------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        _restart_idle_clock(event.assoc)
        return dimse.SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """C-STORE: wire → DicomSpool.receive → status. Never raises."""
        request = cast(C_STORE, event.request)
        calling, called, _address = _titles(event.assoc)
        try:
            if self._stopping.is_set():
                raise ShuttingDown("the node is stopping; send again later")
            data = request.DataSet
            part10 = wrap_dataset(
                cast(BytesIO, data).getvalue() if data is not None else b"",
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                transfer_syntax=str(event.context.transfer_syntax),
            )
            self.spool.receive(
                part10,
                calling_ae=calling,
                called_ae=called,
                context_sop_class=str(UID(event.context.abstract_syntax)),
            )
        except Exception as exc:  # every failure becomes a status; the node carries on
            rsp = dimse.store_response(exc)
            log.warning(
                "C-STORE of %s from %s refused with 0x%04X (%s): %s",
                request.AffectedSOPInstanceUID, calling, rsp.Status,
                "send again later" if dimse.retry_later(rsp.Status) else "final",
                dimse.reason(exc),
            )  # fmt: skip
            if not isinstance(exc, YigongError):
                log.debug("internal error during C-STORE", exc_info=True)
            if span := self._spans.get(id(event.assoc)):
                span.refused += 1
            return rsp
        finally:
            _restart_idle_clock(event.assoc)
        if span := self._spans.get(id(event.assoc)):
            span.stored += 1
        return dimse.SUCCESS
