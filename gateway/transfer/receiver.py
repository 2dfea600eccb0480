"""Receiving side of a verified transfer.

Bytes of an interrupted transfer wait in ``<data_dir>/spool/inbound/<transfer
id>.part``; every chunk is checked against its SHA-256 before it is written,
so the spool file is always a verified prefix and a resumed transfer starts
at its size. While the stream arrives, what has been written is made durable
and read back from the spool file in the background
(:class:`gateway.transfer.readback.SpoolReadback`); when the stream ends the
rest is made durable and read back, and the SHA-256 of the file as read back
must be the object id. The spool file is then moved into the store; a store
that copies it instead (another filesystem, S3) is read back again and hashed
once more. Only then is the object catalogued and a signed receipt returned.
Identical content is stored once (objects are content-addressed).

Proof of possession: a signed receipt says "this sender delivered these bytes",
so one is issued without the bytes only to a sender that delivered the object
here before. Anyone else offering an object this node holds gets the answer it
would get for an object this node does not hold (send it from offset 0), must
push every byte, and gets its receipt only after those bytes hashed to the
object id. A resume offset is only ever that of a spool file the same sender
started under the same transfer id.

Each peer may hold at most ``max_open_per_peer`` inbound transfers in
``receiving`` whose announced sizes add up to at most
``max_spooled_bytes_per_peer`` (a spool file never grows past its announced
size), so a peer that opens transfers and abandons them cannot fill the disk;
:class:`gateway.transfer.janitor.SpoolJanitor` expires what it abandoned.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from gateway.audit import AuditLog
from gateway.catalog import Catalog, TransferRecord, utcnow
from gateway.errors import (
    IntegrityError,
    QuotaExceeded,
    ShuttingDown,
    StorageError,
    TransferError,
    ValidationError,
    YigongError,
)
from gateway.hashing import ChunkVerifier, hash_chunks, sha256_hex
from gateway.identity import Identity
from gateway.storage import ObjectStore
from gateway.telemetry import Telemetry
from gateway.transfer.batch_receiver import BatchReceiver
from gateway.transfer.model import (
    Announce,
    ChunkMsg,
    EndMsg,
    OfferResult,
    PeerChunkErrors,
    PushItem,
    StartMsg,
    check_transfer_id,
)
from gateway.transfer.readback import SpoolReadback
from gateway.transfer.receipts import make_receipt
from gateway.transfer.shared_prefix import SharedPrefix

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 1.0
"""At most one catalog write of ``bytes_done`` per transfer per this many seconds."""

FactsHook = Callable[[Announce, ObjectStore], Mapping[str, str]]
"""Format-aware checks run on a stored object; their facts go into the receipt."""


@dataclass
class ReceiverSettings:
    node_id: str
    spool_dir: Path
    max_chunk_bytes: int
    max_object_bytes: int
    max_open_per_peer: int = 64
    max_spooled_bytes_per_peer: int = 128 * 1024**3
    #: replicas sharing catalog and store: copy every this many verified bytes of a
    #: large inbound object to the shared store (0: never; transfer/shared_prefix.py)
    shared_segment_bytes: int = 0


class Receiver:
    def __init__(
        self,
        settings: ReceiverSettings,
        store: ObjectStore,
        catalog: Catalog,
        audit: AuditLog,
        sign: Callable[[bytes], bytes],
        cert_pem: bytes,
        facts_hook: FactsHook | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.audit = audit
        self._sign = sign
        self.cert_pem = cert_pem
        self.facts_hook = facts_hook
        self.telemetry = telemetry
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        self._audit_later: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._audit_thread = threading.Thread(
            target=self._audit_worker, name="receiver-audit", daemon=True
        )
        self._audit_thread.start()
        self.batches = BatchReceiver(self)
        self.prefix = (
            SharedPrefix(store, catalog, settings.shared_segment_bytes)
            if settings.shared_segment_bytes and catalog.engine != "sqlite"
            else None
        )

    # -- helpers ----------------------------------------------------------
    def _part(self, transfer_id: str) -> Path:
        return self.settings.spool_dir / f"{check_transfer_id(transfer_id)}.part"

    def _already_held(self, announce: Announce) -> bool:
        """Whether this node already holds these exact bytes (catalogued or not)."""
        stored = self.store.size(announce.object_id)
        if stored != announce.size:
            if self.catalog.find_object(announce.object_id) is not None:
                log.error(
                    "object %s is catalogued but missing from %s; accepting it again",
                    announce.object_id,
                    self.store.describe(),
                )
            return False
        if self.catalog.find_object(announce.object_id) is not None:
            return True
        # Stored but not catalogued (stopped in between): verify before adopting it.
        digest, size = hash_chunks(self.store.open_read(announce.object_id))
        if digest == announce.object_id and size == announce.size:
            return True
        self.store.delete(announce.object_id)
        return False

    def _finish(
        self, sender: Identity, transfer_id: str, announce: Announce, started_at: str
    ) -> bytes:
        """Catalogue a stored, verified object and sign the receipt."""
        if self.prefix is not None and self._shares(announce):
            self.prefix.discard(transfer_id)
        obj = self.catalog.add_object(
            object_id=announce.object_id,
            size=announce.size,
            name=announce.name,
            media_type=announce.media_type,
            case_id=announce.case_id,
            origin_node=sender.subject_id,
            labels=announce.labels,
        )
        facts = dict(self.facts_hook(announce, self.store)) if self.facts_hook else {}
        receipt = make_receipt(
            self._sign,
            self.cert_pem,
            transfer_id=transfer_id,
            object_id=obj.object_id,
            size=obj.size,
            sha256=obj.object_id,
            sender_node=sender.subject_id,
            receiver_node=self.settings.node_id,
            started_at=started_at,
            completed_at=utcnow(),
            name=announce.name,
            case_id=announce.case_id,
            facts=facts,
        )
        # One receipt per transfer, also when two replicas finished the same transfer at
        # once (a sender's retry reached another replica while this one still stored
        # it): the first to commit wins; the other answers with that receipt.
        with self.catalog.transaction():
            held = self._record_inbound(sender, transfer_id, announce)
            if held is not None and held.status == "done" and held.receipt:
                log.info("transfer %s was completed by another replica: its receipt", transfer_id)
                return held.receipt
            self.catalog.update_transfer(
                transfer_id,
                "inbound",
                status="done",
                bytes_done=announce.size,
                completed_at=utcnow(),
                receipt=receipt,
                history=("done", f"sha256 {announce.object_id}"),
            )
        self.audit.record(
            "transfer.received",
            actor=sender.label(),
            peer=sender.subject_id,
            object_id=announce.object_id,
            transfer_id=transfer_id,
            case_id=announce.case_id or None,
            details={"size": announce.size, "name_sha256": _name_digest(announce.name)},
        )
        return receipt

    def _record_inbound(
        self, sender: Identity, transfer_id: str, announce: Announce
    ) -> TransferRecord | None:
        """Record the inbound transfer unless it is known; the known row (None: new)."""
        existing = self.catalog.find_transfer(transfer_id, "inbound")
        if existing is None:
            self.catalog.add_transfer(
                transfer_id=transfer_id,
                direction="inbound",
                object_id=announce.object_id,
                size=announce.size,
                name=announce.name,
                case_id=announce.case_id,
                peer_node=sender.subject_id,
                status="receiving",
                header={"media_type": announce.media_type},
            )
        elif existing.peer_node != sender.subject_id or existing.object_id != announce.object_id:
            raise ValidationError(
                f"transfer {transfer_id} was announced by {existing.peer_node} for object "
                f"{existing.object_id}; a different sender or object may not reuse its id"
            )
        return existing

    # -- protocol ---------------------------------------------------------
    def offer(self, sender: Identity, transfer_id: str, announce: Announce) -> OfferResult:
        """Where the sender should start, or a receipt if this sender delivered the object before.

        The answer to a sender that did not deliver the object here is the same
        whether this node holds it or not: it says nothing about objects of others.
        """
        if self.stopping.is_set():
            raise ShuttingDown(f"node {self.settings.node_id} is shutting down; retry later")
        check_transfer_id(transfer_id)
        announce.validate(self.settings.max_object_bytes)
        receipt = self._receipt_for_deliverer(sender, transfer_id, announce)
        if receipt is not None:
            return OfferResult(announce.size, True, receipt)
        # One lock with the janitor's expiry: caps checked, row recorded, offset read.
        with self._lock:
            self._admit(sender, transfer_id, announce)
            part = self._part(transfer_id)
            offset = part.stat().st_size if part.exists() else 0
            if offset > announce.size:
                part.unlink()
                offset = 0
            restore = not offset and self._shares(announce) and transfer_id not in self._active
        if restore:  # outside the lock: may copy many MiB from the shared store
            offset = self.prefix.restore(transfer_id, part) if self.prefix else 0
        with self._lock:
            self.catalog.update_transfer(
                transfer_id,
                "inbound",
                status="receiving",
                bytes_done=offset,
                history=("resume", f"offset {offset}") if offset else None,
            )
        return OfferResult(offset, False, None)

    def _shares(self, announce: Announce) -> bool:
        """Whether this transfer's verified prefix is copied for the other replicas."""
        return self.prefix is not None and announce.size >= self.prefix.segment_bytes

    def _receipt_for_deliverer(
        self, sender: Identity, transfer_id: str, announce: Announce
    ) -> bytes | None:
        """The receipt for an idempotent re-send: only for the sender that delivered these
        bytes here before, and only while this node still holds them; else None."""
        if not self.catalog.delivered_by(announce.object_id, sender.subject_id):
            if self.catalog.find_object(announce.object_id) is not None:
                self._withheld(sender, transfer_id, announce)
            return None
        if not self._already_held(announce):
            return None
        done = self.catalog.find_transfer(transfer_id, "inbound")
        if (
            done is not None
            and done.peer_node == sender.subject_id
            and done.object_id == announce.object_id
            and done.status == "done"
            and done.receipt
        ):
            return done.receipt
        receipt = self._finish(sender, transfer_id, announce, utcnow())
        log.info(
            "transfer %s: object %s already delivered by %s; receipt re-issued",
            transfer_id,
            announce.object_id,
            sender.subject_id,
        )
        return receipt

    def _withheld(self, sender: Identity, transfer_id: str, announce: Announce) -> None:
        """Audit (never tell the peer) that a receipt was withheld pending the bytes.

        Written by a helper thread, not before the answer: an audit write (an fsync)
        only for held objects would make the answer's timing tell what this node holds."""
        self._audit_later.put(
            dict(
                event="transfer.refused",
                actor=sender.label(),
                outcome="failure",
                peer=sender.subject_id,
                object_id=announce.object_id,
                transfer_id=transfer_id,
                details={
                    "method": "Transfer.Offer",
                    "reason": "possession not proven",
                    "action": "receipt withheld; the whole object must be pushed and verified",
                    "cert_serial": f"{sender.serial:x}",
                    "cert_subject": sender.subject_id,
                },
            )
        )

    def _audit_worker(self) -> None:
        while (entry := self._audit_later.get()) is not None:
            try:
                self.audit.record(**entry)
            except YigongError:
                log.exception("could not audit %s", entry.get("event"))

    def close(self, timeout: float = 10.0) -> None:
        """Write the audit entries still waiting (call before the audit log closes)."""
        self._audit_later.put(None)
        self._audit_thread.join(timeout)
        self.batches.close()

    def _admit(self, sender: Identity, transfer_id: str, announce: Announce) -> None:
        """Record the inbound transfer if the sender's open transfers leave room for it."""
        existing = self.catalog.find_transfer(transfer_id, "inbound")
        if existing is None or existing.status != "receiving":
            self.check_room(sender, f"transfer {transfer_id}", transfer_id, announce.size)
        self._record_inbound(sender, transfer_id, announce)

    def check_room(
        self, sender: Identity, what: str, transfer_id: str = "", size: int = 0, *, opens: int = 1
    ) -> None:
        """The one per-peer quota, for single transfers and batch streams alike: what the
        sender has open here — inbound transfers still ``receiving`` and batch streams
        (each one open transfer), their announced bytes and those of the batch objects
        spooled but not yet stored — must leave room for ``size`` more bytes and
        ``opens`` more open transfers (0 for an object of an admitted batch stream); else
        :class:`QuotaExceeded` naming ``what``."""
        s = self.settings
        peer = sender.subject_id
        rows = [t for t in self.catalog.open_inbound(peer) if t.transfer_id != transfer_id]
        streams, batch_bytes = self.batches.held_by(peer, transfer_id)
        count = len(rows) + streams
        spooled = sum(t.size for t in rows) + batch_bytes
        if count + opens > s.max_open_per_peer or spooled + size > s.max_spooled_bytes_per_peer:
            raise QuotaExceeded(
                f"{what} refused: {peer} already has {count} open inbound transfer(s) "
                f"of {spooled} bytes at node {s.node_id}; the limits are "
                f"{s.max_open_per_peer} transfers and {s.max_spooled_bytes_per_peer} bytes "
                "per peer (transfer.max_open_inbound_per_peer, "
                "transfer.max_spooled_bytes_per_peer). "
                "Retry when open transfers have completed or expired"
            )

    def receive(self, sender: Identity, items: Iterator[PushItem]) -> bytes:
        """Consume one Push stream; return the serialized signed receipt."""
        first = next(items, None)
        if not isinstance(first, StartMsg):
            raise ValidationError("a Push stream must begin with PushStart")
        transfer_id = check_transfer_id(first.transfer_id)
        announce = first.announce
        announce.validate(self.settings.max_object_bytes)
        with self._lock:
            if transfer_id in self._active:
                raise TransferError(
                    f"transfer {transfer_id} is already being received; wait for it to end"
                )
            self._active.add(transfer_id)
        began = time.monotonic()
        try:
            receipt = self._receive(sender, transfer_id, announce, first.offset, items)
        except IntegrityError:
            if self.telemetry:
                self.telemetry.failed("inbound", "integrity")
            raise
        else:
            if self.telemetry:
                self.telemetry.transferred("inbound", announce.size, time.monotonic() - began)
            return receipt
        finally:
            with self._lock:
                self._active.discard(transfer_id)

    def _receive(
        self,
        sender: Identity,
        transfer_id: str,
        announce: Announce,
        offset: int,
        items: Iterator[PushItem],
    ) -> bytes:
        started_at = utcnow()
        record = self.catalog.find_transfer(transfer_id, "inbound")
        if record is None:
            raise ValidationError(f"transfer {transfer_id} was not offered; call Offer first")
        if record.peer_node != sender.subject_id or record.object_id != announce.object_id:
            raise ValidationError(f"transfer {transfer_id} belongs to another sender or object")
        if record.status == "done" and record.receipt:
            return record.receipt
        if record.status != "receiving":
            raise TransferError(
                f"transfer {transfer_id} is {record.status}, not open; call Offer again"
            )
        part = self._part(transfer_id)
        have = part.stat().st_size if part.exists() else 0
        if offset != have:
            raise ValidationError(
                f"transfer {transfer_id}: push starts at offset {offset} but {have} verified "
                "bytes are held; call Offer again for the resume offset"
            )
        try:
            with SpoolReadback(part) as spool:
                end, expected = self._spool(spool, sender, transfer_id, announce, offset, items)
                if end is None:
                    raise TransferError(
                        f"transfer {transfer_id}: stream ended at offset {expected} without "
                        "PushEnd; resume with Offer"
                    )
                if (
                    end.sha256 != announce.object_id
                    or end.size != announce.size
                    or expected != end.size
                ):
                    part.unlink(missing_ok=True)
                    self._integrity_failed(sender, transfer_id, announce, expected, whole=True)
                digest, size = spool.read_back()
        except OSError as exc:
            raise StorageError(
                f"transfer {transfer_id}: spool file {part} failed: {exc.strerror or exc}; "
                f"check the disk behind {self.settings.spool_dir}. The sender retries and "
                "resumes from the last durable offset"
            ) from exc
        if digest != announce.object_id or size != announce.size:
            part.unlink(missing_ok=True)
            self._integrity_failed(sender, transfer_id, announce, size, whole=True)
        self._store_verified(sender, transfer_id, announce, part)
        return self._finish(sender, transfer_id, announce, started_at)

    def _spool(
        self,
        spool: SpoolReadback,
        sender: Identity,
        transfer_id: str,
        announce: Announce,
        offset: int,
        items: Iterator[PushItem],
    ) -> tuple[EndMsg | None, int]:
        """Write verified chunks until PushEnd: (the end message or None, bytes held)."""

        def refuse(at: int) -> NoReturn:
            self._integrity_failed(sender, transfer_id, announce, at)

        verifier = ChunkVerifier(
            PeerChunkErrors(transfer_id, refuse),
            offset=offset,
            max_chunk=self.settings.max_chunk_bytes,
            announced_size=announce.size,
            whole=False,  # the spool is read back and hashed once it is durable
        )
        expected = offset
        reported = time.monotonic()
        shared = self._shared_start(transfer_id, announce, offset)
        try:
            for item in items:
                if self.stopping.is_set():
                    raise ShuttingDown(
                        f"node {self.settings.node_id} is shutting down; transfer "
                        f"{transfer_id} will resume at offset {expected}"
                    )
                if isinstance(item, ChunkMsg):
                    verifier.check(item.offset, item.data, item.sha256)
                    spool.write(item.data)
                    expected += len(item.data)
                    if (
                        self.prefix
                        and shared >= 0
                        and expected - shared >= self.prefix.segment_bytes
                    ):
                        self.prefix.save(transfer_id, spool.path, shared, expected)
                        shared = expected
                    if time.monotonic() - reported >= PROGRESS_SECONDS:
                        self.catalog.update_transfer(transfer_id, "inbound", bytes_done=expected)
                        reported = time.monotonic()
                elif isinstance(item, EndMsg):
                    return item, expected
                else:
                    raise ValidationError(f"transfer {transfer_id}: unexpected second start")
            return None, expected
        finally:
            spool.sync()  # what was received is durable: a resume starts there
            self.catalog.update_transfer(transfer_id, "inbound", bytes_done=expected)

    def _shared_start(self, transfer_id: str, announce: Announce, offset: int) -> int:
        """Where the next shared segment starts (-1: this transfer is not shared): the end
        of the contiguous segments, or 0 after discarding them if they run past ``offset``
        (another replica got further; this spool is what counts now)."""
        if self.prefix is None or not self._shares(announce):
            return -1
        covered = 0
        for start, size, _key in self.catalog.segments(transfer_id):
            if start != covered:
                break
            covered += size
        if covered > offset or offset == 0:
            if covered:
                self.prefix.discard(transfer_id)
            return 0
        return covered

    def _store_verified(
        self, sender: Identity, transfer_id: str, announce: Announce, part: Path
    ) -> None:
        """Move the spool file (read back and verified) into the store; if the store
        copied it instead, read the copy back from the store and hash it again.

        An object already catalogued and stored (a sender proving possession of bytes
        delivered before) is not stored again: its bytes were verified; the spool goes."""
        if (
            self.catalog.find_object(announce.object_id) is not None
            and self.store.size(announce.object_id) == announce.size
        ):
            part.unlink(missing_ok=True)
            return
        try:
            moved_in = self.store.adopt_file(announce.object_id, part)
        except StorageError:
            log.error(
                "transfer %s: storing object %s failed; spool kept for retry",
                transfer_id,
                announce.object_id,
            )
            raise
        size = announce.size
        if not moved_in:
            digest, size = hash_chunks(self.store.open_read(announce.object_id))
            if digest != announce.object_id or size != announce.size:
                self.store.delete(announce.object_id)
                part.unlink(missing_ok=True)
                self._integrity_failed(sender, transfer_id, announce, size, whole=True)
        part.unlink(missing_ok=True)
        self.audit.record(
            "object.stored",
            actor=sender.label(),
            object_id=announce.object_id,
            transfer_id=transfer_id,
            details={"size": size, "store": self.store.describe()},
        )

    def abandon(self, record: TransferRecord, why: str) -> bool:
        """Expire one open inbound transfer: delete its spool file, mark it ``abandoned``
        and audit it. False (nothing done) if a Push of it is running right now or the
        sender was heard of since ``record`` was read."""
        with self._lock:
            if record.transfer_id in self._active:
                return False
            now = self.catalog.find_transfer(record.transfer_id, "inbound")
            if now is None or (now.status, now.updated_at) != ("receiving", record.updated_at):
                return False
            part = self._part(record.transfer_id)
            spooled = part.stat().st_size if part.exists() else 0
            part.unlink(missing_ok=True)
            if self.prefix is not None:
                self.prefix.discard(record.transfer_id)
            self.catalog.update_transfer(
                record.transfer_id,
                "inbound",
                status="abandoned",
                bytes_done=0,
                last_error=why,
                history=("abandoned", why),
            )
        self.audit.record(
            "transfer.abandoned",
            actor=f"node:{self.settings.node_id}",
            peer=record.peer_node,
            object_id=record.object_id,
            transfer_id=record.transfer_id,
            details={"reason": why, "spooled_bytes": spooled, "size": record.size},
        )
        log.info(
            "inbound transfer %s from %s abandoned (%s); %d spooled bytes deleted",
            record.transfer_id,
            record.peer_node,
            why,
            spooled,
        )
        return True

    def _integrity_failed(
        self,
        sender: Identity,
        transfer_id: str,
        announce: Announce,
        offset: int,
        *,
        whole: bool = False,
    ) -> NoReturn:
        what = "object SHA-256/size" if whole else f"chunk at offset {offset}"
        if whole and self.prefix is not None:
            self.prefix.discard(transfer_id)
        self.catalog.update_transfer(
            transfer_id,
            "inbound",
            status="failed" if whole else "receiving",
            last_error=f"{what} did not match",
            history=("integrity_failed", what),
        )
        self.audit.record(
            "transfer.integrity_failed",
            actor=sender.label(),
            outcome="failure",
            peer=sender.subject_id,
            object_id=announce.object_id,
            transfer_id=transfer_id,
            details={"where": what},
        )
        raise IntegrityError(
            f"transfer {transfer_id} from {sender.subject_id}: {what} does not match its "
            "SHA-256; the bytes were not stored as complete. The sender should retry."
        )


def _name_digest(name: str) -> str:
    """File names may carry patient data: audit only a digest of them."""
    return sha256_hex(name.encode())[:16]
