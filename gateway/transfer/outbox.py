"""Sending side: the durable outbox and the verified send of one object.

Queued sends are outbound transfer rows in the catalog, so they survive a
restart. Worker threads claim due rows, offer the object to the peer, push
it from the offset the peer names, and verify the signed receipt (signature,
signer = the peer, same SHA-256 and size) before marking the transfer done.
Any failure is recorded in the transfer's history and the audit log, and the
send is retried with exponential backoff; nothing is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography import x509

from gateway.audit import AuditLog
from gateway.backoff import Backoff
from gateway.catalog import (
    DEFAULT_LEASE_SECONDS,
    Catalog,
    ObjectRecord,
    TransferRecord,
    iso_utc,
    utcnow,
)
from gateway.errors import (
    CertificateError,
    ConfigError,
    FactsDisagree,
    IdentifiableData,
    IntegrityError,
    OutboundRefused,
    ReceiptError,
    ResidencyViolation,
    ShuttingDown,
    ValidationError,
    YigongError,
)
from gateway.fidelity.formats import check_design_facts, is_design_media_type
from gateway.hashing import ChunkProducer, hash_chunks
from gateway.pki import TrustStore
from gateway.roles import RoleHooks
from gateway.storage import ObjectStore
from gateway.telemetry import Telemetry
from gateway.transfer.batch_sender import BatchSender
from gateway.transfer.model import (
    Announce,
    BatchAckItem,
    BatchItem,
    BatchStatusResult,
    ChunkMsg,
    EndMsg,
    OfferResult,
    PushItem,
    StartMsg,
)
from gateway.transfer.receipts import verify_receipt

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 1.0
"""At most one catalog write of ``bytes_done`` per send per this many seconds."""


class PeerLink(Protocol):
    """The wire to one peer node (implemented over gRPC in gateway.rpc.peer_link)."""

    def identify(self) -> bytes:
        """The peer's node certificate (PEM)."""
        ...

    def offer(self, transfer_id: str, announce: Announce) -> OfferResult: ...

    def push(self, items: Iterator[PushItem]) -> bytes: ...

    def batch_status(self, batch_id: str) -> BatchStatusResult: ...

    def push_batch(self, items: Iterator[BatchItem]) -> Iterator[BatchAckItem]: ...

    def close(self) -> None: ...


LinkFactory = Callable[[str], PeerLink]
"""Opens a link to the peer with the given node id."""


@dataclass
class OutboxSettings:
    node_id: str
    chunk_bytes: int
    retry_initial_seconds: float
    retry_max_seconds: float
    max_bytes_per_second: int
    workers: int
    known_peers: frozenset[str]
    allowed_peer_regions: frozenset[str]
    #: replicas sharing the catalog: silent this long, a replica's sends go to the others
    replica_lease_seconds: float = DEFAULT_LEASE_SECONDS


class _SendState:
    """What the chunk generator found while reading the local copy."""

    def __init__(self) -> None:
        self.corrupt: str | None = None
        self.stopped = False
        self.sent = 0


class Outbox:
    def __init__(
        self,
        settings: OutboxSettings,
        store: ObjectStore,
        catalog: Catalog,
        audit: AuditLog,
        trust: TrustStore,
        link_factory: LinkFactory,
        *,
        hooks: RoleHooks | None = None,
        telemetry: Telemetry | None = None,
        design_facts: Callable[[str, ObjectStore, str], Mapping[str, str]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.audit = audit
        self.trust = trust
        self._link_factory = link_factory
        self.hooks = hooks if hooks is not None else RoleHooks()  # the role's checks
        self.telemetry = telemetry
        self.design_facts = design_facts  # the receipt facts of design files, for comparison
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.batches = BatchSender(self)

    # -- queueing ---------------------------------------------------------
    def _check_peer(self, peer_node: str) -> None:
        if peer_node not in self.settings.known_peers:
            known = ", ".join(sorted(self.settings.known_peers)) or "none"
            raise ConfigError(
                f"cannot send to {peer_node!r}: not a configured peer of node "
                f"{self.settings.node_id} (known: {known})"
            )

    def open_batch(self, peer_node: str, *, case_id: str, actor: str, ref: str = "") -> str:
        """Open a batch of objects for ``peer_node`` (e.g. a confirmation's released
        instances); returns its id. Objects queued into it with ``queue(...,
        batch_id=)`` start leaving at once; :meth:`seal_batch` says no more will come.
        The batch completes with one signed manifest receipt covering every object."""
        self._check_peer(peer_node)
        batch_id = uuid.uuid4().hex
        self.catalog.add_batch(
            batch_id=batch_id,
            direction="outbound",
            peer_node=peer_node,
            status="queued",
            case_id=case_id,
            kind="objects",
            ref=ref,
        )
        self.audit.record(
            "transfer.batch.opened",
            actor=actor,
            peer=peer_node,
            case_id=case_id or None,
            details={"batch_id": batch_id, **({"ref": ref} if ref else {})},
        )
        self._wake.set()
        return batch_id

    def seal_batch(self, batch_id: str, *, expected: int) -> None:
        """No more objects will be added to ``batch_id``; ``expected`` is how many were
        queued into it (a mismatch is an error: nothing may be silently left out)."""
        batch = self.catalog.get_batch(batch_id, "outbound")
        have = len(self.catalog.batch_transfers(batch_id, "outbound"))
        if have != expected:
            raise ValidationError(
                f"batch {batch_id}: sealed with {expected} object(s) expected, but "
                f"{have} were queued into it"
            )
        if batch.sealed:
            return
        self.catalog.update_batch(
            batch_id,
            "outbound",
            sealed=1,
            expected=expected,
            history=("sealed", f"{expected} object(s)"),
        )
        self._wake.set()
        self.batches.notify()

    def queue(
        self,
        obj: ObjectRecord,
        peer_node: str,
        *,
        actor: str,
        batch_id: str | None = None,
    ) -> TransferRecord:
        """Durably queue ``obj`` for ``peer_node``; returns the outbound transfer.

        With ``batch_id`` (from :meth:`open_batch`, same peer, not sealed) the object
        is sent as part of that batch."""
        self._check_peer(peer_node)
        if batch_id:
            batch = self.catalog.get_batch(batch_id, "outbound")
            if batch.peer_node != peer_node:
                raise ValidationError(
                    f"batch {batch_id} goes to {batch.peer_node}, not to {peer_node}"
                )
            if batch.sealed:
                raise ValidationError(f"batch {batch_id} is sealed; open a new batch")
        record = self.catalog.add_transfer(
            transfer_id=uuid.uuid4().hex,
            direction="outbound",
            obj=obj,
            peer_node=peer_node,
            status="queued",
            batch_id=batch_id or "",
        )
        self.audit.record(
            "transfer.queued",
            actor=actor,
            peer=peer_node,
            object_id=obj.object_id,
            transfer_id=record.transfer_id,
            case_id=obj.case_id or None,
            details={"size": obj.size, **({"batch_id": batch_id} if batch_id else {})},
        )
        self._wake.set()
        if batch_id:
            self.batches.notify()
        return record

    # -- workers ----------------------------------------------------------
    def start(self) -> None:
        shared = self.catalog.engine != "sqlite"
        if shared:
            self.catalog.heartbeat()  # registered before claiming: claims of the living stay
        requeued = self.catalog.requeue_interrupted(self.settings.replica_lease_seconds)
        if requeued:
            log.info("outbox: %d interrupted send(s) queued again", requeued)
        for n in range(self.settings.workers):
            thread = threading.Thread(target=self._worker, name=f"outbox-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if shared:
            thread = threading.Thread(target=self._replica, name="outbox-replica", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _replica(self) -> None:
        """Heartbeat this replica; queue again the sends of replicas gone silent."""
        lease = self.settings.replica_lease_seconds
        while not self._stop.wait(lease / 3):
            try:
                self.catalog.heartbeat()
                if self.catalog.take_over_stale(lease):
                    self._wake.set()
                    self.batches.notify()
            except YigongError as exc:
                log.warning("outbox: replica heartbeat failed: %s", exc)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop workers; a send in progress is cut at a chunk boundary and stays queued."""
        self._stop.set()
        self._wake.set()
        self.batches.notify()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        if self.catalog.engine != "sqlite":
            try:
                handed = self.catalog.retire()
            except YigongError as exc:
                log.warning("outbox: could not hand this replica's sends back: %s", exc)
            else:
                if handed:
                    log.info("outbox: %d send(s) handed back to the other replicas", handed)

    def wake(self) -> None:
        self._wake.set()

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception:  # never let a worker die: the outbox must keep draining
                log.exception("outbox worker error; retrying in 1 s")
                self._stop.wait(1.0)

    def _tick(self) -> None:
        batch = self.catalog.claim_due_batch(utcnow(), set())
        if batch is not None:
            try:
                self.batches.send(batch)
            except Exception as exc:  # a bug must not strand the batch: record it, retry later
                log.exception("outbox: unexpected error sending batch %s", batch.batch_id)
                self.catalog.update_batch(
                    batch.batch_id,
                    "outbound",
                    status="queued",
                    attempts=batch.attempts + 1,
                    last_error=f"internal error: {exc!r}"[:2000],
                    next_attempt_at=iso_utc(
                        datetime.now(UTC) + timedelta(seconds=self._backoff(batch.attempts + 1))
                    ),
                )
            return
        claimed = self.catalog.claim_due_outbound(utcnow(), 1, set())
        if not claimed:
            self._wake.clear()
            self._wake.wait(self._idle_seconds())
            return
        rec = claimed[0]
        try:
            self.send(rec)
        except Exception as exc:  # a bug must not strand the send: record it and retry later
            log.exception("outbox: unexpected error sending %s", rec.transfer_id)
            self._failed(rec, rec.attempts + 1, YigongError(f"internal error: {exc!r}"))

    def _idle_seconds(self) -> float:
        due = self.catalog.next_due_time()
        if due is None:
            return 5.0
        delta = (datetime.fromisoformat(due) - datetime.now(UTC)).total_seconds()
        return min(5.0, max(0.05, delta))

    # -- one send ---------------------------------------------------------
    def send(self, rec: TransferRecord) -> bool:
        """Try one outbound transfer (already marked sending). True when done.

        The attempt is one ``yigong.transfer.send`` span; the calls to the peer
        carry its context, so the receiver's spans join the same trace."""
        tel = self.telemetry
        if tel is None:
            return self._send(rec)
        began = time.monotonic()
        with tel.span(
            "yigong.transfer.send",
            transfer_id=rec.transfer_id,
            object_id=rec.object_id,
            peer=rec.peer_node,
            size=rec.size,
            attempt=rec.attempts + 1,
        ) as span:
            done = self._send(rec)
            span.set_attribute("yigong.outcome", "done" if done else "not done")
        if done:
            tel.transferred("outbound", rec.size, time.monotonic() - began)
        else:
            tel.failed("outbound", "attempt")
        return done

    def _send(self, rec: TransferRecord) -> bool:
        attempt = rec.attempts + 1
        peer = rec.peer_node
        self.audit.record(
            "transfer.begun",
            actor=f"node:{self.settings.node_id}",
            peer=peer,
            object_id=rec.object_id,
            transfer_id=rec.transfer_id,
            details={"attempt": attempt},
        )
        state = _SendState()
        link: PeerLink | None = None
        announce: Announce | None = None
        try:
            obj = self.catalog.get_object(rec.object_id)
            announce = Announce(
                object_id=obj.object_id,
                size=obj.size,
                name=obj.name,
                media_type=obj.media_type,
                case_id=obj.case_id,
                labels=obj.labels,
            )
            self.hooks.check_outgoing(obj, self.store, peer)  # re-checked on every attempt
            link = self._link_factory(peer)
            self._check_residency(link, peer)
            offer = link.offer(rec.transfer_id, announce)
            if offer.complete and offer.receipt:
                receipt_bytes = offer.receipt
            else:
                items = self._items(rec.transfer_id, announce, offer.resume_offset, state)
                receipt_bytes = link.push(items)
            receipt = verify_receipt(
                receipt_bytes,
                self.trust,
                expect_receiver=peer,
                expect_sender=self.settings.node_id,
                expect_sha256=obj.object_id,
                expect_size=obj.size,
                expect_transfer_id=rec.transfer_id,
            )
            try:
                facts = dict(receipt.body.facts)
                if self.design_facts is not None and is_design_media_type(obj.media_type):
                    ours = self.design_facts(obj.media_type, self.store, obj.object_id)
                    check_design_facts(obj.media_type, ours, facts)
                self.hooks.check_receipt(obj, facts, self.store)
            except ReceiptError as err:
                raise FactsDisagree(str(err)) from err
        except (IdentifiableData, FactsDisagree, ResidencyViolation) as err:
            self._refused(rec, attempt, err)
            return False
        except YigongError as err:
            if isinstance(err, IntegrityError) and not state.corrupt and announce is not None:
                # The receiver found the object's SHA-256 wrong: is our own copy bad?
                with contextlib.suppress(YigongError):
                    if not self._local_copy_intact(announce):
                        state.corrupt = self._corrupt_message(announce)
            exc: YigongError = IntegrityError(state.corrupt) if state.corrupt else err
            if state.stopped or isinstance(exc, ShuttingDown) or self._stop.is_set():
                self._requeue_on_stop(rec, state)
                return False
            self._failed(rec, attempt, exc)
            return False
        finally:
            if link is not None:
                link.close()
        self.catalog.update_transfer(
            rec.transfer_id,
            "outbound",
            status="done",
            attempts=attempt,
            bytes_done=obj.size,
            completed_at=receipt.body.completed_at,
            last_error="",
            receipt=receipt.signed,
            history=("done", f"receipt verified, sha256 {receipt.body.sha256}"),
        )
        self.audit.record(
            "transfer.completed",
            actor=f"node:{self.settings.node_id}",
            peer=peer,
            object_id=obj.object_id,
            transfer_id=rec.transfer_id,
            case_id=obj.case_id or None,
            details={"size": obj.size, "attempt": attempt, "sent_bytes": state.sent},
        )
        log.info(
            "transfer %s to %s done (object %s, %d bytes, attempt %d)",
            rec.transfer_id,
            peer,
            obj.object_id,
            obj.size,
            attempt,
        )
        return True

    def _items(
        self, transfer_id: str, announce: Announce, offset: int, state: _SendState
    ) -> Iterator[PushItem]:
        """Start, chunks from ``offset`` each with its SHA-256, then End.

        The whole-object SHA-256 is the receiver's to check (and it does, after
        storing); the sender re-checks its own copy only when that fails.
        """
        yield StartMsg(transfer_id, announce, offset)
        limit = self.settings.max_bytes_per_second
        began = reported = time.monotonic()
        blocks = self.store.open_read(announce.object_id, offset, self.settings.chunk_bytes)
        producer = ChunkProducer(blocks, offset=offset, make=ChunkMsg)
        for chunk in producer:
            if self._stop.is_set():
                state.stopped = True
                return
            yield chunk
            state.sent += len(chunk.data)
            if time.monotonic() - reported >= PROGRESS_SECONDS:  # progress, not per chunk
                self.catalog.update_transfer(transfer_id, "outbound", bytes_done=producer.position)
                reported = time.monotonic()
            if limit:
                ahead = state.sent / limit - (time.monotonic() - began)
                if ahead > 0:
                    self._stop.wait(ahead)
        if producer.position != announce.size:
            state.corrupt = self._corrupt_message(announce)
            return
        yield EndMsg(announce.object_id, announce.size)

    def _corrupt_message(self, announce: Announce) -> str:
        return (
            f"local copy of object {announce.object_id} in {self.store.describe()} does not "
            "match its SHA-256; not sent. Restore the object or re-submit it."
        )

    def _local_copy_intact(self, announce: Announce) -> bool:
        digest, size = hash_chunks(self.store.open_read(announce.object_id))
        return digest == announce.object_id and size == announce.size

    def _backoff(self, attempt: int) -> float:
        s = self.settings
        return Backoff(s.retry_initial_seconds, s.retry_max_seconds).delay(attempt)

    def retry_later(self, attempt: int, exc: YigongError) -> tuple[float, dict[str, Any]]:
        """The delay before the next attempt and the catalog update that queues a failed
        send (a transfer or a batch) for it: status, attempts, last error, next attempt
        time and the history entry."""
        delay = self._backoff(attempt)
        kind = "integrity_failed" if isinstance(exc, IntegrityError) else "attempt_failed"
        return delay, {
            "status": "queued",
            "attempts": attempt,
            "last_error": str(exc)[:2000],
            "next_attempt_at": iso_utc(datetime.now(UTC) + timedelta(seconds=delay)),
            "history": (kind, f"attempt {attempt}: {type(exc).__name__}: {exc}"[:2000]),
        }

    def _failed(self, rec: TransferRecord, attempt: int, exc: YigongError) -> None:
        delay, update = self.retry_later(attempt, exc)
        self.catalog.update_transfer(rec.transfer_id, "outbound", **update)
        self.audit.record(
            "transfer.failed",
            actor=f"node:{self.settings.node_id}",
            outcome="failure",
            peer=rec.peer_node,
            object_id=rec.object_id,
            transfer_id=rec.transfer_id,
            details={"attempt": attempt, "error": type(exc).__name__, "retry_in_s": delay},
        )
        log.warning(
            "transfer %s to %s failed (attempt %d, retry in %.1f s): %s",
            rec.transfer_id,
            rec.peer_node,
            attempt,
            delay,
            exc,
        )

    def _check_residency(self, link: PeerLink, peer: str) -> None:
        """Refuse a peer whose certified region the policy does not allow (nothing sent yet)."""
        pem = link.identify()
        try:
            cert = x509.load_pem_x509_certificate(pem)
            who = self.trust.verify(cert)
        except (ValueError, CertificateError) as exc:
            raise ReceiptError(
                f"peer {peer} identified itself with an unusable certificate: {exc}"
            ) from exc
        if not who.is_node or who.subject_id != peer:
            raise ReceiptError(f"peer {peer} identified itself as {who.label()}")
        allowed = self.settings.allowed_peer_regions
        if who.region not in allowed:
            raise ResidencyViolation(
                f"peer {peer} is certified for region {who.region!r}; this node's residency "
                f"policy allows only {', '.join(sorted(allowed))} "
                "([residency] allowed_peer_regions). Nothing was sent."
            )

    def _refused(self, rec: TransferRecord, attempt: int, exc: YigongError) -> None:
        """A send that must never happen (identifiable data) or whose receipt facts
        disagree: stop retrying, keep it visible as ``failed``, raise a security alert."""
        self.catalog.update_transfer(
            rec.transfer_id,
            "outbound",
            status="failed",
            attempts=attempt,
            last_error=str(exc)[:2000],
            history=("refused", f"{type(exc).__name__}: {exc}"[:2000]),
        )
        if isinstance(exc, ResidencyViolation):
            self.audit.record(
                "residency.refused",
                actor=f"node:{self.settings.node_id}",
                outcome="failure",
                peer=rec.peer_node,
                object_id=rec.object_id,
                transfer_id=rec.transfer_id,
                details={"reason": "peer region not allowed"},
            )
        self.audit.record(
            "security.alert",
            actor=f"node:{self.settings.node_id}",
            outcome="failure",
            peer=rec.peer_node,
            object_id=rec.object_id,
            transfer_id=rec.transfer_id,
            details={
                "reason": type(exc).__name__,
                "action": "send refused",
                **({"check": exc.check} if isinstance(exc, OutboundRefused) else {}),
            },
        )
        log.error("transfer %s to %s refused: %s", rec.transfer_id, rec.peer_node, exc)

    def _requeue_on_stop(self, rec: TransferRecord, state: _SendState) -> None:
        self.catalog.update_transfer(
            rec.transfer_id,
            "outbound",
            status="queued",
            history=("interrupted", f"node stopping after {state.sent} bytes"),
        )
        log.info("transfer %s interrupted by shutdown; stays queued", rec.transfer_id)
