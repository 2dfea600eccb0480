"""Sending side of a batch: every object of it in one stream, one verified manifest receipt.

An attempt asks the peer once what it holds of the batch (``BatchStatus``:
held objects are skipped, an interrupted one resumes at its offset), then
streams the rest in one ``PushBatch`` call: each object with its chunks (each
with its SHA-256) and end message. The outbound gate (``hooks.check_outgoing``)
runs for every object just before it is sent. A batch that is still open
(objects are still being queued into it, e.g. while a study is de-identified)
keeps the stream open and sends what arrives; once it is sealed and everything
is sent, ``BatchEnd`` lists every object and the receiver answers with its
signed manifest.

The manifest is verified (signature, signer = the peer, names, Merkle root),
compared entry by entry with what this node sent (a missing, extra or altered
entry refuses the receipt: the attempt fails and is retried with backoff;
nothing is marked done) and every object's facts are checked as for a single
transfer. Only then are the batch and every object in it marked done, in one
catalog transaction, with the audit events written in one batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.catalog import BatchRecord, TransferRecord
from gateway.errors import (
    FactsDisagree,
    IdentifiableData,
    IntegrityError,
    ReceiptError,
    ResidencyViolation,
    ShuttingDown,
    TransferError,
    YigongError,
)
from gateway.fidelity.formats import check_design_facts, is_design_media_type
from gateway.hashing import ChunkProducer
from gateway.transfer.manifest import Manifest, check_manifest, verify_manifest
from gateway.transfer.model import (
    Announce,
    BatchEndMsg,
    BatchItem,
    BatchStartMsg,
    BatchStatusResult,
    ChunkMsg,
    EndMsg,
    ManifestAck,
    ObjectStartMsg,
    StoredAck,
)

if TYPE_CHECKING:
    from gateway.transfer.outbox import Outbox, PeerLink

log = logging.getLogger(__name__)

OPEN_BATCH_POLL_SECONDS = 0.5
"""How often a stream of an open batch looks for new objects when not woken."""


@dataclass
class _State:
    """What the request stream found, for the thread that reads the answers."""

    sent_bytes: int = 0
    objects_sent: int = 0
    stored: int = 0
    stopped: bool = False
    error: YigongError | None = None
    refused: dict[str, IdentifiableData] = field(default_factory=dict)
    listed: tuple[str, ...] = ()


class BatchSender:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._cv = threading.Condition()

    def notify(self) -> None:
        """Objects were queued into a batch or it was sealed: wake streams waiting on it."""
        with self._cv:
            self._cv.notify_all()

    # -- one attempt ----------------------------------------------------------
    def send(self, batch: BatchRecord) -> bool:
        """Try one outbound batch (already marked sending). True when done."""
        o = self.outbox
        attempt = batch.attempts + 1
        peer = batch.peer_node
        state = _State()
        link: PeerLink | None = None
        began = time.monotonic()
        try:
            link = o._link_factory(peer)
            o._check_residency(link, peer)
            status = link.batch_status(batch.batch_id)
            o.audit.record(
                "transfer.batch.begun",
                actor=f"node:{o.settings.node_id}",
                peer=peer,
                case_id=batch.case_id or None,
                details={
                    "batch_id": batch.batch_id,
                    "attempt": attempt,
                    "held": sum(s.held for s in status.objects),
                },
            )
            receipt: bytes | None = None
            if status.receipt and batch.sealed:
                receipt = status.receipt  # completed there before: check it like a new one
                state.listed = tuple(
                    t.transfer_id
                    for t in o.catalog.batch_transfers(batch.batch_id, "outbound")
                    if t.status != "failed"
                )
            else:
                for ack in link.push_batch(self._messages(batch, status, state)):
                    if isinstance(ack, StoredAck):
                        state.stored += 1
                    elif isinstance(ack, ManifestAck):
                        receipt = ack.signed
                if state.error is not None:
                    raise state.error
                if state.stopped or o._stop.is_set():
                    raise ShuttingDown("node stopping")
                if receipt is None:
                    raise TransferError(
                        f"peer {peer} ended batch {batch.batch_id} without a manifest receipt"
                    )
            manifest, facts = self._verify(batch, receipt, state)
        except (FactsDisagree, ResidencyViolation) as err:
            self._refused(batch, attempt, err, state)
            return False
        except YigongError as err:
            if state.stopped or isinstance(err, ShuttingDown) or o._stop.is_set():
                o.catalog.update_batch(
                    batch.batch_id,
                    "outbound",
                    status="queued",
                    history=("interrupted", f"node stopping after {state.sent_bytes} bytes"),
                )
                return False
            self._failed(batch, attempt, err, state)
            return False
        finally:
            if link is not None:
                link.close()
        self._done(batch, attempt, manifest, facts, state)
        if o.telemetry is not None:
            o.telemetry.transferred("outbound", state.sent_bytes, time.monotonic() - began)
        return True

    # -- the request stream (runs in gRPC's sending thread) -------------------
    def _messages(
        self, batch: BatchRecord, status: BatchStatusResult, state: _State
    ) -> Iterator[BatchItem]:
        """Never raises: a problem is left in ``state`` and the stream ends."""
        try:
            yield from self._stream(batch, status, state)
        except YigongError as exc:
            state.error = exc
        except Exception as exc:  # a bug: end the stream, report it as a failed attempt
            log.exception("batch %s: error while streaming", batch.batch_id)
            state.error = TransferError(f"internal error while streaming: {exc!r}")

    def _stream(
        self, batch: BatchRecord, status: BatchStatusResult, state: _State
    ) -> Iterator[BatchItem]:
        o = self.outbox
        yield BatchStartMsg(batch.batch_id, batch.case_id, batch.ref, batch.kind)
        held = {s.transfer_id for s in status.objects if s.held}
        offsets = {s.transfer_id: s.resume_offset for s in status.objects if not s.held}
        seen: set[str] = set()
        while True:
            if o._stop.is_set():
                state.stopped = True
                return
            sealed = o.catalog.get_batch(batch.batch_id, "outbound").sealed
            rows = o.catalog.batch_transfers(batch.batch_id, "outbound")
            fresh = [r for r in rows if r.transfer_id not in seen]
            for rec in fresh:
                seen.add(rec.transfer_id)
                if rec.transfer_id in held or rec.status in ("done", "failed"):
                    continue
                yield from self._object(
                    rec, batch.peer_node, offsets.get(rec.transfer_id, 0), state
                )
                if state.stopped or state.error is not None:
                    return
            if sealed:
                state.listed = tuple(
                    r.transfer_id
                    for r in rows
                    if r.status != "failed" and r.transfer_id not in state.refused
                )
                yield BatchEndMsg(state.listed)
                return
            if not fresh:
                with self._cv:
                    self._cv.wait(OPEN_BATCH_POLL_SECONDS)

    def _object(
        self, rec: TransferRecord, peer: str, offset: int, state: _State
    ) -> Iterator[BatchItem]:
        o = self.outbox
        obj = o.catalog.get_object(rec.object_id)
        try:
            o.hooks.check_outgoing(obj, o.store, peer)  # re-checked just before it leaves
        except IdentifiableData as err:
            state.refused[rec.transfer_id] = err
            return
        announce = Announce(
            object_id=obj.object_id,
            size=obj.size,
            name=obj.name,
            media_type=obj.media_type,
            case_id=obj.case_id,
            labels=obj.labels,
        )
        yield ObjectStartMsg(rec.transfer_id, announce, offset)
        limit = o.settings.max_bytes_per_second
        began = time.monotonic()
        sent_before = state.sent_bytes
        blocks = o.store.open_read(obj.object_id, offset, o.settings.chunk_bytes)
        producer = ChunkProducer(blocks, offset=offset, make=ChunkMsg)
        for chunk in producer:
            if o._stop.is_set():
                state.stopped = True
                return
            yield chunk
            state.sent_bytes += len(chunk.data)
            if limit:
                ahead = (state.sent_bytes - sent_before) / limit - (time.monotonic() - began)
                if ahead > 0:
                    o._stop.wait(ahead)
        if producer.position != obj.size:
            state.error = IntegrityError(o._corrupt_message(announce))
            return
        state.objects_sent += 1
        yield EndMsg(obj.object_id, obj.size)

    # -- the answer -------------------------------------------------------------
    def _verify(
        self, batch: BatchRecord, receipt: bytes, state: _State
    ) -> tuple[Manifest, dict[str, dict[str, str]]]:
        o = self.outbox
        manifest = verify_manifest(
            receipt,
            o.trust,
            expect_receiver=batch.peer_node,
            expect_sender=o.settings.node_id,
            expect_batch_id=batch.batch_id,
        )
        listed = set(state.listed)
        rows = [
            r
            for r in o.catalog.batch_transfers(batch.batch_id, "outbound")
            if r.transfer_id in listed
        ]
        facts = check_manifest(manifest, {r.transfer_id: (r.object_id, r.size) for r in rows})
        try:
            for r in rows:
                obj = o.catalog.get_object(r.object_id)
                theirs = facts[r.transfer_id]
                if o.design_facts is not None and is_design_media_type(obj.media_type):
                    ours = o.design_facts(obj.media_type, o.store, obj.object_id)
                    check_design_facts(obj.media_type, ours, theirs)
                o.hooks.check_receipt(obj, theirs, o.store)
        except ReceiptError as err:
            raise FactsDisagree(str(err)) from err
        return manifest, {tid: dict(f) for tid, f in facts.items()}

    def _done(
        self,
        batch: BatchRecord,
        attempt: int,
        manifest: Manifest,
        facts: dict[str, dict[str, str]],
        state: _State,
    ) -> None:
        o = self.outbox
        body = manifest.body
        node = f"node:{o.settings.node_id}"
        rows = o.catalog.batch_transfers(batch.batch_id, "outbound")
        listed = set(state.listed)
        with o.catalog.transaction():
            o.catalog.update_batch(
                batch.batch_id,
                "outbound",
                status="done",
                attempts=attempt,
                receipt=manifest.signed,
                merkle_root=body.merkle_root,
                completed_at=body.completed_at,
                last_error="",
                history=(
                    "done",
                    f"manifest of {body.count} object(s) verified, Merkle root {body.merkle_root}",
                ),
            )
            for r in rows:
                if r.transfer_id in listed:
                    o.catalog.update_transfer(
                        r.transfer_id,
                        "outbound",
                        status="done",
                        attempts=attempt,
                        bytes_done=r.size,
                        completed_at=body.completed_at,
                        last_error="",
                        facts=facts.get(r.transfer_id, {}),
                        history=(
                            "done",
                            f"in batch {batch.batch_id} manifest, sha256 {r.object_id}",
                        ),
                    )
                elif r.transfer_id in state.refused:
                    err = state.refused[r.transfer_id]
                    o.catalog.update_transfer(
                        r.transfer_id,
                        "outbound",
                        status="failed",
                        attempts=attempt,
                        last_error=str(err)[:2000],
                        history=("refused", f"{type(err).__name__}: {err}"[:2000]),
                    )
        with o.audit.batch():
            for r in rows:
                if r.transfer_id in listed:
                    o.audit.record(
                        "transfer.completed",
                        actor=node,
                        peer=batch.peer_node,
                        object_id=r.object_id,
                        transfer_id=r.transfer_id,
                        case_id=r.case_id or None,
                        details={"size": r.size, "attempt": attempt, "batch_id": batch.batch_id},
                    )
                elif r.transfer_id in state.refused:
                    o.audit.record(
                        "security.alert",
                        actor=node,
                        outcome="failure",
                        peer=batch.peer_node,
                        object_id=r.object_id,
                        transfer_id=r.transfer_id,
                        details={"reason": "IdentifiableData", "action": "send refused"},
                    )
            o.audit.record(
                "transfer.batch.completed",
                actor=node,
                peer=batch.peer_node,
                case_id=batch.case_id or None,
                details={
                    "batch_id": batch.batch_id,
                    "count": body.count,
                    "bytes": body.total_bytes,
                    "merkle_root": body.merkle_root,
                    "attempt": attempt,
                    "sent_bytes": state.sent_bytes,
                    "refused": len(state.refused),
                },
            )
        log.info(
            "batch %s to %s done: %d object(s), %d bytes, attempt %d, Merkle root %s",
            batch.batch_id,
            batch.peer_node,
            body.count,
            body.total_bytes,
            attempt,
            body.merkle_root[:16],
        )

    def _failed(self, batch: BatchRecord, attempt: int, exc: YigongError, state: _State) -> None:
        o = self.outbox
        delay, update = o.retry_later(attempt, exc)
        o.catalog.update_batch(batch.batch_id, "outbound", **update)
        o.audit.record(
            "transfer.batch.failed",
            actor=f"node:{o.settings.node_id}",
            outcome="failure",
            peer=batch.peer_node,
            case_id=batch.case_id or None,
            details={
                "batch_id": batch.batch_id,
                "attempt": attempt,
                "error": type(exc).__name__,
                "retry_in_s": delay,
                "objects_sent": state.objects_sent,
                "objects_stored": state.stored,
            },
        )
        log.warning(
            "batch %s to %s failed (attempt %d, retry in %.1f s): %s",
            batch.batch_id,
            batch.peer_node,
            attempt,
            delay,
            exc,
        )

    def _refused(self, batch: BatchRecord, attempt: int, exc: YigongError, state: _State) -> None:
        """Facts that disagree or a peer outside the residency policy: stop retrying."""
        o = self.outbox
        why = f"{type(exc).__name__}: {exc}"[:2000]
        with o.catalog.transaction():
            o.catalog.update_batch(
                batch.batch_id,
                "outbound",
                status="failed",
                attempts=attempt,
                last_error=str(exc)[:2000],
                history=("refused", why),
            )
            for r in o.catalog.batch_transfers(batch.batch_id, "outbound"):
                if r.status not in ("done", "failed"):
                    o.catalog.update_transfer(
                        r.transfer_id,
                        "outbound",
                        status="failed",
                        last_error=f"batch {batch.batch_id} refused: {exc}"[:2000],
                        history=("refused", why),
                    )
        node = f"node:{o.settings.node_id}"
        if isinstance(exc, ResidencyViolation):
            o.audit.record(
                "residency.refused",
                actor=node,
                outcome="failure",
                peer=batch.peer_node,
                case_id=batch.case_id or None,
                details={"reason": "peer region not allowed", "batch_id": batch.batch_id},
            )
        o.audit.record(
            "transfer.batch.failed",
            actor=node,
            outcome="failure",
            peer=batch.peer_node,
            case_id=batch.case_id or None,
            details={"batch_id": batch.batch_id, "attempt": attempt, "error": type(exc).__name__},
        )
        o.audit.record(
            "security.alert",
            actor=node,
            outcome="failure",
            peer=batch.peer_node,
            case_id=batch.case_id or None,
            details={
                "reason": type(exc).__name__,
                "action": "batch send refused",
                "batch_id": batch.batch_id,
            },
        )
        log.error("batch %s to %s refused: %s", batch.batch_id, batch.peer_node, exc)
