"""Receiving side of a batch: many objects in one stream, durable in groups, one manifest.

A reader thread consumes the stream: every chunk is checked against its SHA-256
before it is appended to the object's spool file (``<spool>/<transfer id>.part``,
as for single transfers), and an object whose end message names another SHA-256
or size than announced is refused. Finished objects are handed to the thread
that serves the response stream, which commits them in groups: the group's spool
files are made durable together (``fdatasync`` issued in parallel, one journal
commit for the lot on most filesystems), read back and hashed again (the object
id must match the bytes as read back after they were made durable), linked into
the store together (one fsync per directory touched), their format facts taken
(the receiver's facts hook), their catalog rows written in one transaction and
their audit events in one audit batch. Only then is each object acknowledged
(``ObjectStored``): nothing acknowledged is lost.

At ``BatchEnd`` the receiver checks that it holds every object the sender lists,
builds the manifest from its own catalog (every object of the batch: transfer
id, object id, size, SHA-256, facts; a Merkle root over them), signs it once and
keeps it on its batch row; asked again it returns the identical receipt.

Resume: :meth:`BatchReceiver.status` tells the sender which objects are held
(skip them) and where an interrupted one resumes. A partial object gets its
``receiving`` row (and so a resume offset) when the stream breaks while the
node runs, or once it has grown past :data:`PARTIAL_ROW_BYTES`; a spool file of
a node killed before that has no row and is deleted by the janitor at start —
the object is then sent again from 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from gateway.catalog import BatchRecord, utcnow
from gateway.errors import (
    IntegrityError,
    ShuttingDown,
    StorageError,
    TransferError,
    ValidationError,
    YigongError,
)
from gateway.hashing import ChunkVerifier, hash_chunks, hash_fd, sha256_hex
from gateway.identity import Identity
from gateway.storage.filesystem import FilesystemStore
from gateway.transfer.manifest import Entry, make_manifest
from gateway.transfer.model import (
    Announce,
    BatchAckItem,
    BatchEndMsg,
    BatchItem,
    BatchObjectState,
    BatchStartMsg,
    BatchStatusResult,
    ChunkMsg,
    EndMsg,
    ManifestAck,
    ObjectStartMsg,
    PeerChunkErrors,
    StoredAck,
    check_transfer_id,
)

if TYPE_CHECKING:
    from gateway.transfer.receiver import Receiver

log = logging.getLogger(__name__)

GROUP_OBJECTS = 64
"""At most this many objects are made durable and catalogued together."""
GROUP_BYTES = 64 * 1024 * 1024
"""... or at most about this many bytes."""
PARTIAL_ROW_BYTES = 8 * 1024 * 1024
"""A partial object this large gets its ``receiving`` row (a durable resume point)."""
SYNC_THREADS = 8
"""Parallel fdatasync + read-back of a group's spool files (hashing releases the GIL)."""


@dataclass
class _Open:
    """An object whose chunks are arriving."""

    transfer_id: str
    announce: Announce
    part: Path
    fd: int
    written: int
    has_row: bool
    started_at: str
    verifier: ChunkVerifier


@dataclass
class _Arrived:
    transfer_id: str
    announce: Announce
    part: Path
    has_row: bool
    started_at: str
    digest: str = ""
    size: int = 0
    facts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _End:
    transfer_ids: tuple[str, ...]


_STREAM_CLOSED = object()


class BatchReceiver:
    """Batch streams for a :class:`~gateway.transfer.receiver.Receiver` (same store,
    catalog, audit log, spool, key and facts hook)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self._active: set[str] = set()
        # per peer: its open batch streams, and the announced size of each of its batch
        # objects spooled but not yet stored (the per-peer quota counts both)
        self._streams: dict[str, int] = {}
        self._spooled: dict[str, dict[str, int]] = {}
        self._quota_lock = threading.Lock()  # own lock: asked under the receiver's lock
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="batch-sync")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    # -- status -------------------------------------------------------------
    def status(self, sender: Identity, batch_id: str) -> BatchStatusResult:
        """Which objects of ``batch_id`` this node holds, where the others resume."""
        r = self.receiver
        check_transfer_id(batch_id)
        batch = r.catalog.find_batch(batch_id, "inbound")
        if batch is None:
            return BatchStatusResult((), None)
        self._check_owner(batch, sender)
        states = []
        for t in r.catalog.batch_transfers(batch_id, "inbound"):
            if t.status == "done" and r.store.size(t.object_id) == t.size:
                states.append(BatchObjectState(t.transfer_id, t.object_id, True, t.size))
                continue
            offset = 0
            if t.status == "receiving":
                part = r._part(t.transfer_id)
                offset = part.stat().st_size if part.exists() else 0
                offset = offset if offset <= t.size else 0
            states.append(BatchObjectState(t.transfer_id, t.object_id, False, offset))
        receipt = batch.receipt if batch.status == "done" else None
        return BatchStatusResult(tuple(states), receipt)

    def held_by(self, peer: str, transfer_id: str = "") -> tuple[int, int]:
        """``peer``'s open batch streams here and the bytes of its batch objects spooled
        but not yet stored (not counting ``transfer_id``)."""
        with self._quota_lock:
            held = self._spooled.get(peer, {})
            return self._streams.get(peer, 0), sum(
                n for tid, n in held.items() if tid != transfer_id
            )

    def _spool(self, peer: str, transfer_id: str, size: int) -> None:
        with self._quota_lock:
            self._spooled.setdefault(peer, {})[transfer_id] = size

    def _unspool(self, peer: str, transfer_ids: Iterable[str]) -> None:
        with self._quota_lock:
            held = self._spooled.get(peer, {})
            for tid in transfer_ids:
                held.pop(tid, None)
            if not held:
                self._spooled.pop(peer, None)

    def _check_owner(self, batch: BatchRecord, sender: Identity) -> None:
        if batch.peer_node != sender.subject_id:
            raise ValidationError(
                f"batch {batch.batch_id} was opened by another sender; a batch id may not "
                "be reused by a different node"
            )

    # -- stream -------------------------------------------------------------
    def receive(self, sender: Identity, items: Iterator[BatchItem]) -> Iterator[BatchAckItem]:
        """Consume one PushBatch stream; yields acknowledgements and, at the end, the
        signed manifest receipt."""
        r = self.receiver
        if r.stopping.is_set():
            raise ShuttingDown(f"node {r.settings.node_id} is shutting down; retry later")
        first = next(items, None)
        if not isinstance(first, BatchStartMsg):
            raise ValidationError("a PushBatch stream must begin with BatchStart")
        batch_id = check_transfer_id(first.batch_id)
        if len(first.case_id) > 200 or len(first.ref) > 200 or len(first.kind) > 64:
            raise ValidationError(f"batch {batch_id}: case id, ref or kind too long")
        r.check_room(sender, f"batch {batch_id}")  # the stream is one more open transfer
        peer = sender.subject_id
        with r._lock:
            if batch_id in self._active:
                raise TransferError(
                    f"batch {batch_id} is already being received; wait for that stream to end"
                )
            self._active.add(batch_id)
        with self._quota_lock:
            self._streams[peer] = self._streams.get(peer, 0) + 1
        try:
            batch = r.catalog.add_batch(
                batch_id=batch_id,
                direction="inbound",
                peer_node=sender.subject_id,
                status="receiving",
                case_id=first.case_id,
                kind=first.kind,
                ref=first.ref,
            )
            self._check_owner(batch, sender)
            run = _Run(self, sender, batch, items)
            yield from run.serve()
        finally:
            with r._lock:
                self._active.discard(batch_id)
            with self._quota_lock:
                self._streams[peer] -= 1
                if not self._streams[peer]:
                    del self._streams[peer]


class _Run:
    """One PushBatch stream: a reader thread spools, the caller's thread commits and acks."""

    def __init__(
        self, owner: BatchReceiver, sender: Identity, batch: BatchRecord, items: Iterator[BatchItem]
    ) -> None:
        self.owner = owner
        self.r = owner.receiver
        self.sender = sender
        self.batch = batch
        self.items = items
        self.pending: queue.Queue[object] = queue.Queue(maxsize=4 * GROUP_OBJECTS)
        self.abort = threading.Event()
        self._receiving: set[str] = set()  # transfer ids this stream marked active
        self.spooled: set[str] = set()  # counted in the per-peer quota (reader thread only)

    # -- reader thread ------------------------------------------------------
    def _read(self) -> None:
        current: _Open | None = None
        try:
            for item in self.items:
                if self.abort.is_set():
                    return
                if self.r.stopping.is_set():
                    raise ShuttingDown(
                        f"node {self.r.settings.node_id} is shutting down; batch "
                        f"{self.batch.batch_id} will resume"
                    )
                if isinstance(item, ChunkMsg):
                    if current is None:
                        raise ValidationError("a chunk arrived outside an object")
                    self._chunk(current, item)
                elif isinstance(item, ObjectStartMsg):
                    if current is not None:
                        raise ValidationError(
                            f"object {current.transfer_id} was not ended before the next began"
                        )
                    current = self._open(item)
                elif isinstance(item, EndMsg):
                    if current is None:
                        raise ValidationError("an object end arrived outside an object")
                    self._put(self._end(current, item))
                    current = None
                elif isinstance(item, BatchEndMsg):
                    if current is not None:
                        raise ValidationError(f"object {current.transfer_id} was not ended")
                    self._put(_End(item.transfer_ids))
                    return
                else:
                    raise ValidationError("BatchStart may come only once, first")
            if current is not None:  # the sender stopped inside an object: resume it later
                self._keep_partial(current)
            self._put(_STREAM_CLOSED)
        except BaseException as exc:  # handed to the committing thread, which raises it
            if current is not None:
                self._keep_partial(current)
            self._put(exc if isinstance(exc, Exception) else ShuttingDown(str(exc)))
        finally:
            with self.r._lock:
                self.r._active.difference_update(self._receiving)
            # what is left is stored by now, about to be, or given up: no longer spooled
            self.owner._unspool(self.sender.subject_id, self.spooled)

    def _put(self, item: object) -> None:
        while not self.abort.is_set():
            with contextlib.suppress(queue.Full):
                self.pending.put(item, timeout=0.5)
                return
        if isinstance(item, _Arrived) and not item.has_row:  # never committed, never acked
            item.part.unlink(missing_ok=True)

    def _open(self, item: ObjectStartMsg) -> _Open:
        r = self.r
        tid = check_transfer_id(item.transfer_id)
        announce = item.announce
        announce.validate(r.settings.max_object_bytes)
        existing = r.catalog.find_transfer(tid, "inbound")
        has_row = False
        if existing is not None:
            if (
                existing.peer_node != self.sender.subject_id
                or existing.object_id != announce.object_id
                or existing.batch_id != self.batch.batch_id
            ):
                raise ValidationError(f"transfer {tid} belongs to another sender, object or batch")
            if existing.status == "done":
                raise ValidationError(
                    f"transfer {tid} is already held here; ask BatchStatus what to send"
                )
            has_row = existing.status == "receiving"
        part = r._part(tid)
        have = part.stat().st_size if has_row and part.exists() else 0
        if item.offset != have:
            raise ValidationError(
                f"transfer {tid}: object starts at offset {item.offset} but {have} verified "
                "bytes are held; ask BatchStatus for the resume offset"
            )
        if not has_row:  # a resumed object is counted by its ``receiving`` row already
            r.check_room(self.sender, f"transfer {tid} of batch {self.batch.batch_id}", tid,
                         announce.size, opens=0)  # fmt: skip
        with r._lock:  # the janitor leaves an object alone while its bytes arrive
            if tid in r._active:
                raise TransferError(f"transfer {tid} is already being received")
            r._active.add(tid)
        self._receiving.add(tid)
        if not has_row:
            self.owner._spool(self.sender.subject_id, tid, announce.size)
            self.spooled.add(tid)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if have else os.O_TRUNC)
        try:
            fd = os.open(part, flags, 0o600)
        except OSError as exc:
            raise StorageError(
                f"transfer {tid}: spool file {part} cannot be opened: {exc.strerror or exc}; "
                f"check the disk behind {r.settings.spool_dir}"
            ) from exc

        def refuse(at: int) -> NoReturn:
            self._refuse(tid, announce, f"chunk at offset {at}")

        verifier = ChunkVerifier(
            PeerChunkErrors(tid, refuse),
            offset=have,
            max_chunk=r.settings.max_chunk_bytes,
            announced_size=announce.size,
            whole=False,  # each spool file is read back and hashed once it is durable
        )
        return _Open(tid, announce, part, fd, have, has_row, utcnow(), verifier)

    def _chunk(self, cur: _Open, item: ChunkMsg) -> None:
        cur.verifier.check(item.offset, item.data, item.sha256)
        view = memoryview(item.data)
        try:
            while view:
                view = view[os.write(cur.fd, view) :]
        except OSError as exc:
            raise StorageError(
                f"transfer {cur.transfer_id}: writing spool file {cur.part} failed: "
                f"{exc.strerror or exc}; the sender resumes"
            ) from exc
        cur.written += len(item.data)
        if not cur.has_row and cur.written >= PARTIAL_ROW_BYTES:
            os.fdatasync(cur.fd)
            self._record_partial(cur)

    def _end(self, cur: _Open, item: EndMsg) -> _Arrived:
        os.close(cur.fd)
        cur.fd = -1
        a = cur.announce
        if item.sha256 != a.object_id or item.size != a.size or cur.written != a.size:
            cur.part.unlink(missing_ok=True)
            self._refuse(cur.transfer_id, a, "object SHA-256/size", whole=True)
        return _Arrived(cur.transfer_id, a, cur.part, cur.has_row, cur.started_at)

    def _record_partial(self, cur: _Open) -> None:
        """Give a partial object its ``receiving`` row: a durable resume point."""
        r = self.r
        with r._lock:
            r._admit(self.sender, cur.transfer_id, cur.announce)
        r.catalog.update_transfer(
            cur.transfer_id, "inbound", bytes_done=cur.written, status="receiving"
        )
        self._tag_batch(cur.transfer_id)
        cur.has_row = True

    def _tag_batch(self, transfer_id: str) -> None:
        with self.r.catalog.transaction() as db:
            db.execute(
                "UPDATE transfers SET batch_id = ? WHERE transfer_id = ? AND direction = ?",
                (self.batch.batch_id, transfer_id, "inbound"),
            )

    def _keep_partial(self, cur: _Open) -> None:
        """The stream broke inside an object: keep its verified prefix as a resume point."""
        try:
            if cur.fd >= 0:
                os.fdatasync(cur.fd)
                os.close(cur.fd)
                cur.fd = -1
            if cur.written == 0:
                cur.part.unlink(missing_ok=True)
            elif not cur.has_row:
                self._record_partial(cur)
            else:
                self.r.catalog.update_transfer(cur.transfer_id, "inbound", bytes_done=cur.written)
        except (OSError, YigongError) as exc:
            log.warning(
                "batch %s: partial object %s not kept (%s); it will be sent again",
                self.batch.batch_id,
                cur.transfer_id,
                exc,
            )
            cur.part.unlink(missing_ok=True)

    def _refuse(self, tid: str, a: Announce, what: str, *, whole: bool = False) -> NoReturn:
        r = self.r
        if r.catalog.find_transfer(tid, "inbound") is not None:
            r.catalog.update_transfer(
                tid,
                "inbound",
                status="failed" if whole else "receiving",
                last_error=f"{what} did not match",
                history=("integrity_failed", what),
            )
        r.audit.record(
            "transfer.integrity_failed",
            actor=self.sender.label(),
            outcome="failure",
            peer=self.sender.subject_id,
            object_id=a.object_id,
            transfer_id=tid,
            details={"where": what, "batch_id": self.batch.batch_id},
        )
        if r.telemetry:
            r.telemetry.failed("inbound", "integrity")
        raise IntegrityError(
            f"transfer {tid} (batch {self.batch.batch_id}) from {self.sender.subject_id}: "
            f"{what} does not match its SHA-256; the bytes were not stored. The sender "
            "should retry."
        )

    # -- committing thread (the response stream) ---------------------------------
    def serve(self) -> Iterator[BatchAckItem]:
        reader = threading.Thread(
            target=self._read, name=f"batch-read-{self.batch.batch_id[:8]}", daemon=True
        )
        reader.start()
        try:
            while True:
                group, control = self._next_group()
                if group:
                    self._commit(group)
                    for a in group:
                        yield StoredAck(a.transfer_id, a.announce.object_id)
                if control is None:
                    continue
                if isinstance(control, Exception):
                    raise control
                if isinstance(control, _End):
                    yield ManifestAck(self._manifest(control.transfer_ids))
                return  # _STREAM_CLOSED: the sender ended without BatchEnd
        finally:
            self.abort.set()
            self._discard_pending()

    def _next_group(self) -> tuple[list[_Arrived], object | None]:
        group: list[_Arrived] = []
        size = 0
        item = self.pending.get()
        while True:
            if not isinstance(item, _Arrived):
                return group, item
            group.append(item)
            size += item.announce.size
            if len(group) >= GROUP_OBJECTS or size >= GROUP_BYTES:
                return group, None
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                return group, None

    def _discard_pending(self) -> None:
        """Spool files handed over but never committed (the stream failed): delete the
        complete ones; nothing was acknowledged for them."""
        while True:
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Arrived) and not item.has_row:
                item.part.unlink(missing_ok=True)

    def _commit(self, group: list[_Arrived]) -> None:
        """Durable (grouped), read back, stored, catalogued and audited: then acked."""
        r = self.r
        try:
            results = list(self.owner._executor().map(_sync_and_hash, [a.part for a in group]))
        except OSError as exc:
            for a in group:
                if not a.has_row:
                    a.part.unlink(missing_ok=True)
            raise StorageError(
                f"batch {self.batch.batch_id}: spool files in {r.settings.spool_dir} failed: "
                f"{exc.strerror or exc}; the sender resumes"
            ) from exc
        for a, (digest, size) in zip(group, results, strict=True):
            a.digest, a.size = digest, size
        for a in group:
            if a.digest != a.announce.object_id or a.size != a.announce.size:
                for b in group:
                    b.part.unlink(missing_ok=True)
                self._refuse(a.transfer_id, a.announce, "object SHA-256/size", whole=True)
        self._store(group)
        now = utcnow()
        # One transaction for the group: the facts hook's own catalog writes (e.g. the
        # factory's study index) join it, so the group costs one catalog commit.
        with r.catalog.transaction():
            for a in group:
                a.facts = dict(r.facts_hook(a.announce, r.store)) if r.facts_hook else {}
            for a in group:
                an = a.announce
                r.catalog.add_object(
                    object_id=an.object_id,
                    size=an.size,
                    name=an.name,
                    media_type=an.media_type,
                    case_id=an.case_id,
                    origin_node=self.sender.subject_id,
                    labels=an.labels,
                )
                if r.catalog.find_transfer(a.transfer_id, "inbound") is None:
                    r.catalog.add_transfer(
                        transfer_id=a.transfer_id,
                        direction="inbound",
                        object_id=an.object_id,
                        size=an.size,
                        name=an.name,
                        case_id=an.case_id,
                        peer_node=self.sender.subject_id,
                        status="receiving",
                        header={"media_type": an.media_type},
                        batch_id=self.batch.batch_id,
                    )
                r.catalog.update_transfer(
                    a.transfer_id,
                    "inbound",
                    status="done",
                    bytes_done=an.size,
                    completed_at=now,
                    facts=a.facts,
                    history=("done", f"sha256 {an.object_id} (batch {self.batch.batch_id})"),
                )
        with r.audit.batch():
            for a in group:
                an = a.announce
                r.audit.record(
                    "object.stored",
                    actor=self.sender.label(),
                    object_id=an.object_id,
                    transfer_id=a.transfer_id,
                    details={"size": an.size, "store": r.store.describe()},
                )
                r.audit.record(
                    "transfer.received",
                    actor=self.sender.label(),
                    peer=self.sender.subject_id,
                    object_id=an.object_id,
                    transfer_id=a.transfer_id,
                    case_id=an.case_id or None,
                    details={
                        "size": an.size,
                        "name_sha256": sha256_hex(an.name.encode())[:16],
                        "batch_id": self.batch.batch_id,
                    },
                )
        self.owner._unspool(self.sender.subject_id, [a.transfer_id for a in group])  # stored
        if r.telemetry:
            for a in group:
                r.telemetry.transferred("inbound", a.announce.size, 0.0)

    def _store(self, group: list[_Arrived]) -> None:
        """Link the verified spool files into the store, durable together; a store that
        copied instead is read back from the store and hashed once more."""
        r = self.r
        links: list[tuple[str, Path]] = []
        seen: set[str] = set()
        for a in group:
            oid = a.announce.object_id
            if oid in seen or (
                r.catalog.find_object(oid) is not None and r.store.size(oid) == a.announce.size
            ):
                continue  # verified, and held already: the spool goes
            seen.add(oid)
            links.append((oid, a.part))
        try:
            r.store.link_files(links)
        except StorageError:
            log.error(
                "batch %s: storing %d object(s) failed; the sender resumes",
                self.batch.batch_id,
                len(links),
            )
            for a in group:
                if not a.has_row:
                    a.part.unlink(missing_ok=True)
            raise
        for oid, part in links:
            if not _same_file(r.store, oid, part):
                digest, _size = hash_chunks(r.store.open_read(oid))
                if digest != oid:
                    r.store.delete(oid)
                    for a in group:
                        a.part.unlink(missing_ok=True)
                    bad = next(a for a in group if a.announce.object_id == oid)
                    self._refuse(bad.transfer_id, bad.announce, "stored copy", whole=True)
        for a in group:
            a.part.unlink(missing_ok=True)

    # -- the end ------------------------------------------------------------
    def _manifest(self, listed: tuple[str, ...]) -> bytes:
        r = self.r
        batch_id = self.batch.batch_id
        rows = [t for t in r.catalog.batch_transfers(batch_id, "inbound") if t.status == "done"]
        held = {t.transfer_id for t in rows}
        missing = sorted(set(listed) - held)
        if missing:
            raise TransferError(
                f"batch {batch_id}: {len(missing)} object(s) the sender lists are not held "
                f"here (e.g. {', '.join(missing[:3])}); resume after BatchStatus"
            )
        batch = r.catalog.get_batch(batch_id, "inbound")
        if batch.status == "done" and batch.receipt and batch.expected == len(rows):
            return batch.receipt  # asked again: the identical receipt
        completed = utcnow()
        signed, root = make_manifest(
            r._sign,
            r.cert_pem,
            batch_id=batch_id,
            sender_node=self.sender.subject_id,
            receiver_node=r.settings.node_id,
            case_id=batch.case_id,
            ref=batch.ref,
            completed_at=completed,
            entries=[Entry(t.transfer_id, t.object_id, t.size, t.facts) for t in rows],
        )
        r.catalog.update_batch(
            batch_id,
            "inbound",
            status="done",
            sealed=1,
            expected=len(rows),
            receipt=signed,
            merkle_root=root,
            completed_at=completed,
            history=("done", f"manifest of {len(rows)} object(s), Merkle root {root}"),
        )
        r.audit.record(
            "transfer.batch.received",
            actor=self.sender.label(),
            peer=self.sender.subject_id,
            case_id=batch.case_id or None,
            details={
                "batch_id": batch_id,
                "count": len(rows),
                "bytes": sum(t.size for t in rows),
                "merkle_root": root,
            },
        )
        log.info(
            "batch %s from %s: %d object(s) held, manifest signed (root %s)",
            batch_id,
            self.sender.subject_id,
            len(rows),
            root[:16],
        )
        return signed


def _sync_and_hash(part: Path) -> tuple[str, int]:
    """Make one spool file durable, then read it back and hash it (GIL released)."""
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        return hash_fd(fd)
    finally:
        os.close(fd)


def _same_file(store: object, key: str, part: Path) -> bool:
    """Whether the store's copy of ``key`` is the spool file itself (a hard link)."""
    if not isinstance(store, FilesystemStore):
        return False
    try:
        return os.stat(part).st_ino == os.stat(store.path_for(key)).st_ino
    except OSError:
        return False
