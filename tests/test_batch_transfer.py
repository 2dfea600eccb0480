"""A batch of objects (a study) as one verified exchange between two real nodes over mTLS
gRPC: one stream, per-chunk and per-object SHA-256, group commits, one signed manifest."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.catalog import MIGRATIONS, Catalog, ObjectRecord
from gateway.errors import (
    IntegrityError,
    QuotaExceeded,
    ReceiptError,
    TransferError,
    ValidationError,
    YigongError,
)
from gateway.rpc.peer_link import GrpcPeerLink
from gateway.transfer.manifest import (
    Entry,
    check_manifest,
    make_manifest,
    merkle_root,
    verify_manifest,
)
from gateway.transfer.model import (
    Announce,
    BatchAckItem,
    BatchEndMsg,
    BatchItem,
    BatchStartMsg,
    ChunkMsg,
    EndMsg,
    ManifestAck,
    ObjectStartMsg,
    StoredAck,
)
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.outbound_files import clean_pdf

FACTORY = "factory-1"
HOSPITAL = "hospital-1"


def _submit(
    node: InProcessNode, tmp_path: Path, n: int, *, size: int = 20_000
) -> list[ObjectRecord]:
    """``n`` distinct clean PDFs stored (not sent) at ``node``."""
    out = []
    for i in range(n):
        src = tmp_path / f"obj-{i}.pdf"
        src.write_bytes(clean_pdf(os.urandom(size + i)))
        with node.self_client() as client:
            reply = client.submit(src, [], case_id="case-b")
        out.append(node.node.catalog.get_object(reply.object.object_id))
    return out


def _batch_done(node: InProcessNode, batch_id: str, direction: str) -> bool:
    b = node.node.catalog.find_batch(batch_id, direction)
    return b is not None and b.status == "done"


def _events(node: InProcessNode, event: str) -> list[object]:
    return list(node.node.audit.events(event=event, limit=10_000))


def test_study_of_objects_delivered_as_one_batch_with_one_manifest_held_by_both_nodes(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    objs = _submit(hospital, tmp_path, 12)
    outbox = hospital.node.outbox
    bid = outbox.open_batch(FACTORY, case_id="case-b", actor="test", ref="conf-1")
    tids = [outbox.queue(o, FACTORY, actor="test", batch_id=bid).transfer_id for o in objs]
    outbox.seal_batch(bid, expected=len(objs))
    wait_for(lambda: _batch_done(hospital, bid, "outbound"), what="batch done at the sender")

    out = hospital.node.catalog.get_batch(bid, "outbound")
    inn = factory.node.catalog.get_batch(bid, "inbound")
    assert out.receipt and out.receipt == inn.receipt
    assert out.merkle_root == inn.merkle_root and out.expected == inn.expected == 12
    m = verify_manifest(
        out.receipt,
        hospital.node.trust,
        expect_receiver=FACTORY,
        expect_sender=HOSPITAL,
        expect_batch_id=bid,
    )
    assert m.body.count == 12 and m.body.case_id == "case-b" and m.body.ref == "conf-1"
    assert m.body.merkle_root == merkle_root(m.body.entries) == out.merkle_root
    by_tid = {e.transfer_id: e for e in m.body.entries}
    assert set(by_tid) == set(tids)
    for tid, o in zip(tids, objs, strict=True):
        e = by_tid[tid]
        assert e.object_id == e.sha256 == o.object_id and e.size == o.size
        assert e.facts["design.media_type"] == "application/pdf"  # the receiver's facts hook
        # every object: the exact bytes at the factory, done on both sides, in the batch
        assert hashlib.sha256(b"".join(factory.node.store.open_read(o.object_id))).hexdigest() == (
            o.object_id
        )
        sent = hospital.node.catalog.get_transfer(tid, "outbound")
        got = factory.node.catalog.get_transfer(tid, "inbound")
        assert (sent.status, got.status) == ("done", "done")
        assert sent.batch_id == got.batch_id == bid
        assert sent.facts == got.facts == dict(e.facts)
    assert m.body.total_bytes == sum(o.size for o in objs)

    # audit: per object completion (the sender) and receipt (the receiver), one batch event each
    completed = [e for e in _events(hospital, "transfer.completed") if e.transfer_id in tids]  # type: ignore[attr-defined]
    assert len(completed) == 12
    (done,) = _events(hospital, "transfer.batch.completed")
    assert done.details["batch_id"] == bid and done.details["count"] == 12  # type: ignore[attr-defined]
    assert done.details["merkle_root"] == out.merkle_root  # type: ignore[attr-defined]
    (received,) = _events(factory, "transfer.batch.received")
    assert received.details["merkle_root"] == out.merkle_root  # type: ignore[attr-defined]
    assert len([e for e in _events(factory, "transfer.received") if e.transfer_id in tids]) == 12  # type: ignore[attr-defined]
    # no per-object Offer/Push: nothing in the spool, no single-object receipts
    assert not list(factory.node.receiver.settings.spool_dir.glob("*.part"))
    # every object's row shows the batch's one manifest receipt (stored once, on the batch)
    for t in tids:
        assert hospital.node.catalog.get_transfer(t, "outbound").receipt == out.receipt
        assert factory.node.catalog.get_transfer(t, "inbound").receipt == out.receipt


def test_open_batch_streams_objects_before_it_is_sealed(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    objs = _submit(hospital, tmp_path, 5)
    outbox = hospital.node.outbox
    bid = outbox.open_batch(FACTORY, case_id="case-b", actor="test")
    early = [outbox.queue(o, FACTORY, actor="test", batch_id=bid).transfer_id for o in objs[:3]]

    def at_factory(tids: list[str]) -> bool:
        rows = [factory.node.catalog.find_transfer(t, "inbound") for t in tids]
        return all(r is not None and r.status == "done" for r in rows)

    # the first objects are stored and catalogued at the factory while the batch is open
    wait_for(lambda: at_factory(early), what="objects of the open batch at the factory")
    assert hospital.node.catalog.get_batch(bid, "outbound").status == "sending"
    late = [outbox.queue(o, FACTORY, actor="test", batch_id=bid).transfer_id for o in objs[3:]]
    with pytest.raises(YigongError, match=r"4 object.* but 5 were queued"):
        outbox.seal_batch(bid, expected=4)  # a miscount is an error, not a silent loss
    outbox.seal_batch(bid, expected=5)
    wait_for(lambda: _batch_done(hospital, bid, "outbound"), what="batch done")
    body = verify_manifest(
        hospital.node.catalog.get_batch(bid, "outbound").receipt or b"",
        hospital.node.trust,
        expect_receiver=FACTORY,
        expect_sender=HOSPITAL,
        expect_batch_id=bid,
    ).body
    assert sorted(e.transfer_id for e in body.entries) == sorted(early + late)
    with pytest.raises(YigongError, match="sealed"):
        outbox.queue(objs[0], FACTORY, actor="test", batch_id=bid)


def _link(hospital: InProcessNode, factory: InProcessNode) -> GrpcPeerLink:
    return GrpcPeerLink(FACTORY, factory.address, hospital.node.client_credentials, 30.0)


def _object_items(
    tid: str, obj: ObjectRecord, data: bytes, *, start: int = 0, stop: int | None = None,
    chunk: int = 64 * 1024, end: bool = True, corrupt_at: int = -1,
) -> Iterator[BatchItem]:  # fmt: skip
    announce = Announce(obj.object_id, obj.size, obj.name, obj.media_type, obj.case_id)
    yield ObjectStartMsg(tid, announce, start)
    stop = len(data) if stop is None else stop
    for pos in range(start, stop, chunk):
        piece = data[pos : min(pos + chunk, stop)]
        digest = hashlib.sha256(piece).digest()
        if pos == corrupt_at:
            piece = bytes([piece[0] ^ 1]) + piece[1:]
        yield ChunkMsg(pos, piece, digest)
    if end:
        yield EndMsg(obj.object_id, obj.size)


def _acks(link: GrpcPeerLink, items: Iterator[BatchItem]) -> list[BatchAckItem]:
    return list(link.push_batch(items))


def test_corrupted_chunk_in_a_batch_is_refused_and_nothing_of_it_is_stored(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    (good, bad) = _submit(hospital, tmp_path, 2, size=300_000)
    data = {o.object_id: b"".join(hospital.node.store.open_read(o.object_id)) for o in (good, bad)}

    def items() -> Iterator[BatchItem]:
        yield BatchStartMsg("batch-corrupt-1", "case-b", "", "objects")
        yield from _object_items("tid-good-0001", good, data[good.object_id])
        yield from _object_items(
            "tid-bad-00001", bad, data[bad.object_id], corrupt_at=2 * 64 * 1024
        )
        yield BatchEndMsg(("tid-good-0001", "tid-bad-00001"))

    link = _link(hospital, factory)
    try:
        with pytest.raises(IntegrityError, match=r"tid-bad-00001.*chunk at offset 131072"):
            _acks(link, items())
        status = link.batch_status("batch-corrupt-1")
    finally:
        link.close()
    assert factory.node.catalog.find_object(bad.object_id) is None
    assert factory.node.store.size(bad.object_id) is None
    held = {s.transfer_id: s for s in status.objects}
    # the object before the corrupt one may or may not have been committed; never the bad one
    assert "tid-bad-00001" not in held or not held["tid-bad-00001"].held
    assert status.receipt is None
    (alert,) = [
        e
        for e in _events(factory, "transfer.integrity_failed")
        if e.transfer_id == "tid-bad-00001"  # type: ignore[attr-defined]
    ]
    assert alert.details["where"] == "chunk at offset 131072"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fault", "text"),
    [
        ("offset", "transfer tid-skip-0001: chunk at offset 65536, expected 0"),
        (
            "past_end",
            "transfer tid-skip-0001: chunk of 65536 bytes at {last} exceeds the chunk limit "
            "or the announced size",
        ),
    ],
)
def test_batch_chunk_out_of_place_or_past_the_announced_size_is_refused_with_its_offsets(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path, fault: str, text: str
) -> None:
    """A chunk that skips ahead or runs past the announced size fails the batch stream.

    The batch receiver checks each chunk through the one ChunkVerifier; the sender sees a
    ValidationError naming the peer, PushBatch, the transfer id and the offsets; nothing
    of the object is stored."""
    hospital, factory = pair
    (obj,) = _submit(hospital, tmp_path, 1, size=200_000)
    data = b"".join(hospital.node.store.open_read(obj.object_id))
    chunk = 64 * 1024
    last = (len(data) // chunk) * chunk

    def items() -> Iterator[BatchItem]:
        yield BatchStartMsg(f"batch-{fault.replace('_', '-')}-1", "case-b", "", "objects")
        for item in _object_items("tid-skip-0001", obj, data, chunk=chunk, end=False):
            if fault == "offset" and isinstance(item, ChunkMsg) and item.offset == 0:
                continue  # the first chunk is left out: the next arrives out of place
            if fault == "past_end" and isinstance(item, ChunkMsg) and item.offset == last:
                piece = (item.data + bytes(chunk))[:chunk]  # longer than what is left
                item = ChunkMsg(item.offset, piece, hashlib.sha256(piece).digest())
            yield item
        yield EndMsg(obj.object_id, obj.size)
        yield BatchEndMsg(("tid-skip-0001",))

    link = _link(hospital, factory)
    try:
        with pytest.raises(ValidationError) as err:
            _acks(link, items())
    finally:
        link.close()
    assert str(err.value).startswith(f"peer {FACTORY} at {factory.address} answered ")
    assert " to PushBatch: " in str(err.value)
    assert str(err.value).endswith(text.format(last=last))
    assert factory.node.catalog.find_object(obj.object_id) is None
    assert factory.node.store.size(obj.object_id) is None


def test_interrupted_batch_resumes_held_objects_skipped_partial_object_at_its_offset(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    a, b = _submit(hospital, tmp_path, 2, size=400_000)
    data = {o.object_id: b"".join(hospital.node.store.open_read(o.object_id)) for o in (a, b)}
    half = 3 * 64 * 1024
    link = _link(hospital, factory)
    try:

        def first() -> Iterator[BatchItem]:  # a whole, b cut after `half` bytes
            yield BatchStartMsg("batch-resume-1", "case-b", "", "objects")
            yield from _object_items("tid-resume-a", a, data[a.object_id])
            yield from _object_items("tid-resume-b", b, data[b.object_id], stop=half, end=False)

        acks = _acks(link, first())
        assert acks == [StoredAck("tid-resume-a", a.object_id)]  # no manifest: no BatchEnd
        status = {s.transfer_id: s for s in link.batch_status("batch-resume-1").objects}
        assert status["tid-resume-a"].held
        assert not status["tid-resume-b"].held and status["tid-resume-b"].resume_offset == half
        spooled = factory.node.receiver.settings.spool_dir / "tid-resume-b.part"
        assert spooled.read_bytes() == data[b.object_id][:half]

        with pytest.raises(YigongError, match="offset 0 but 196608"):  # not from the start
            _acks(
                link,
                iter(
                    [
                        BatchStartMsg("batch-resume-1", "case-b", "", "objects"),
                        *_object_items("tid-resume-b", b, data[b.object_id], end=False, stop=1),
                    ]
                ),
            )

        def second() -> Iterator[BatchItem]:  # only the rest of b, then the end
            yield BatchStartMsg("batch-resume-1", "case-b", "", "objects")
            yield from _object_items("tid-resume-b", b, data[b.object_id], start=half)
            yield BatchEndMsg(("tid-resume-a", "tid-resume-b"))

        acks = _acks(link, second())
        assert acks[0] == StoredAck("tid-resume-b", b.object_id)
        assert isinstance(acks[-1], ManifestAck)
        receipt = acks[-1].signed

        # idempotent: the same BatchEnd again gets the identical receipt, and so does status
        again = _acks(
            link,
            iter(
                [
                    BatchStartMsg("batch-resume-1", "case-b", "", "objects"),
                    BatchEndMsg(("tid-resume-a", "tid-resume-b")),
                ]
            ),
        )
        assert again == [ManifestAck(receipt)]
        assert link.batch_status("batch-resume-1").receipt == receipt
        # an object the receiver does not hold cannot be listed into a manifest
        with pytest.raises(TransferError, match="not held here"):
            _acks(
                link,
                iter(
                    [
                        BatchStartMsg("batch-resume-1", "case-b", "", "objects"),
                        BatchEndMsg(("tid-resume-a", "tid-resume-b", "tid-never-sent")),
                    ]
                ),
            )
    finally:
        link.close()
    body = verify_manifest(
        receipt,
        hospital.node.trust,
        expect_receiver=FACTORY,
        expect_sender=HOSPITAL,
        expect_batch_id="batch-resume-1",
    ).body
    assert {(e.transfer_id, e.sha256, e.size) for e in body.entries} == {
        ("tid-resume-a", a.object_id, a.size),
        ("tid-resume-b", b.object_id, b.size),
    }
    assert b"".join(factory.node.store.open_read(b.object_id)) == data[b.object_id]
    assert not spooled.exists()


def test_manifest_missing_extra_or_altered_entry_is_refused_by_the_check(
    pair: tuple[InProcessNode, InProcessNode],
) -> None:
    hospital, factory = pair
    node = factory.node
    ours = {"t-1": ("a" * 64, 10), "t-2": ("b" * 64, 20)}

    def signed(entries: list[Entry]) -> bytes:
        return make_manifest(
            node.sign, node.cert_pem, batch_id="b-1", sender_node=HOSPITAL,
            receiver_node=FACTORY, case_id="", ref="", completed_at="now", entries=entries,
        )[0]  # fmt: skip

    def check(entries: list[Entry]) -> None:
        m = verify_manifest(
            signed(entries),
            hospital.node.trust,
            expect_receiver=FACTORY,
            expect_sender=HOSPITAL,
            expect_batch_id="b-1",
        )
        check_manifest(m, ours)

    good = [Entry("t-1", "a" * 64, 10, {}), Entry("t-2", "b" * 64, 20, {"k": "v"})]
    check(good)
    with pytest.raises(ReceiptError, match=r"1 object\(s\) missing \(e\.g\. t-2\)"):
        check(good[:1])
    with pytest.raises(ReceiptError, match=r"never sent \(e\.g\. t-3\)"):
        check([*good, Entry("t-3", "c" * 64, 5, {})])
    with pytest.raises(ReceiptError, match=r"another SHA-256 or size \(e\.g\. t-2\)"):
        check([good[0], Entry("t-2", "b" * 64, 21, {})])
    # a manifest altered after signing does not verify
    raw = bytearray(signed(good))
    raw[raw.index(b"a" * 64)] = ord("c")
    with pytest.raises(ReceiptError, match=r"does not verify|Merkle"):
        verify_manifest(
            bytes(raw),
            hospital.node.trust,
            expect_receiver=FACTORY,
            expect_sender=HOSPITAL,
            expect_batch_id="b-1",
        )


def test_query_shows_the_batch_on_each_object_and_single_sends_stay_unbatched(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    objs = _submit(hospital, tmp_path, 3)
    outbox = hospital.node.outbox
    bid = outbox.open_batch(FACTORY, case_id="case-b", actor="test")
    for o in objs:
        outbox.queue(o, FACTORY, actor="test", batch_id=bid)
    outbox.seal_batch(bid, expected=3)
    single = tmp_path / "single.pdf"
    single.write_bytes(clean_pdf(b"single object " * 500))
    with hospital.self_client() as client:
        tid = client.submit(single, [FACTORY], case_id="case-b").queued[0].transfer_id
    wait_for(lambda: _batch_done(hospital, bid, "outbound"), what="batch done")
    wait_for(
        lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done",
        what="single transfer done",
    )
    for node, direction in ((hospital, "outbound"), (factory, "inbound")):
        with node.self_client() as client:
            listed = client.list_transfers(case_id="case-b", direction=direction)
        in_batch = [t for t in listed if t.batch_id == bid]
        assert sorted(t.object_id for t in in_batch) == sorted(o.object_id for o in objs)
        assert all(t.status == "done" for t in in_batch)
        (alone,) = [t for t in listed if t.transfer_id == tid]
        assert alone.batch_id == "" and alone.HasField("receipt")  # its own signed receipt
        with node.self_client() as client:
            (batch,) = client.list_batches(case_id="case-b", direction=direction)
        assert (batch.batch_id, batch.status, batch.sealed) == (bid, "done", True)
        assert dict(batch.objects_by_status) == {"done": 3} and batch.expected == 3
        stored = node.node.catalog.get_batch(bid, direction)
        assert batch.receipt.SerializeToString() == stored.receipt
        assert batch.merkle_root == stored.merkle_root != ""
    # a peer node asking sees only the batches it took part in
    with hospital.client(factory.node.client_credentials) as as_factory:
        assert [b.batch_id for b in as_factory.list_batches()] == [bid]
    query_events = [e for e in _events(factory, "query") if e.details["query"] == "list_batches"]  # type: ignore[attr-defined]
    assert query_events  # who looked at what


def test_catalog_of_the_previous_schema_is_migrated_with_batches(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO transfers (transfer_id, direction, object_id, peer_node, status, size,"
        " created_at, updated_at) VALUES ('t-old-0001', 'outbound', 'x', 'p', 'done', 1, 'a', 'a')"
    )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    catalog = Catalog(path)
    try:
        assert catalog.schema_version == len(MIGRATIONS) >= 2
        old = catalog.get_transfer("t-old-0001", "outbound")
        assert (old.batch_id, old.facts, old.status) == ("", {}, "done")
        assert catalog.list_batches() == []
    finally:
        catalog.close()


@pytest.fixture
def capped(federation: Federation, tmp_path: Path) -> Iterator[tuple[InProcessNode, InProcessNode]]:
    """A factory that lets each peer hold 2 open inbound transfers of 500,000 bytes
    (objects of at most 400,000)."""
    factory = InProcessNode(
        write_config(
            federation, tmp_path, "factory-1", "factory",
            extra="[transfer]\nmax_open_inbound_per_peer = 2\n"
            "max_spooled_bytes_per_peer = 500000\nmax_object_bytes = 400000\n",
        )
    )  # fmt: skip
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital", peers={FACTORY: factory.address}
        )
    )
    yield hospital, factory
    hospital.stop()
    factory.stop()


def test_batch_streams_and_objects_count_in_the_peers_one_inbound_quota(
    capped: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    """A batch stream is one more open inbound transfer of its peer and each object it
    spools counts against the peer's bytes: two stalled batch streams leave no room for a
    third stream nor a single transfer (the quota is one, shared); an object larger than
    the bytes left is refused before a byte of it is spooled; once the streams end there
    is room again. Every refusal names the peer, the counts and the settings to change."""
    hospital, factory = capped
    batches = factory.node.receiver.batches
    release = threading.Event()
    (small,) = _submit(hospital, tmp_path, 1, size=20_000)
    data = b"".join(hospital.node.store.open_read(small.object_id))

    def stalled(n: int) -> Iterator[BatchItem]:
        yield BatchStartMsg(f"batch-stall-{n}", "case-b", "", "objects")
        release.wait(60)

    links = [_link(hospital, factory) for _ in range(2)]
    errors: list[BaseException] = []

    def run(link: GrpcPeerLink, n: int) -> None:
        try:
            _acks(link, stalled(n))
        except BaseException as exc:  # the stream ends without BatchEnd: reported
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(link, n)) for n, link in enumerate(links)]
    for t in threads:
        t.start()
    third = _link(hospital, factory)
    try:
        wait_for(lambda: batches.held_by("hospital-1")[0] == 2, what="two open batch streams")

        def one() -> Iterator[BatchItem]:
            yield BatchStartMsg("batch-third-1", "case-b", "", "objects")
            yield from _object_items("tid-third-001", small, data)
            yield BatchEndMsg(("tid-third-001",))

        with pytest.raises(QuotaExceeded) as err:
            _acks(third, one())
        assert "batch batch-third-1 refused: hospital-1 already has 2 open inbound" in str(
            err.value
        )
        assert "transfer.max_open_inbound_per_peer" in str(err.value)
        with pytest.raises(QuotaExceeded, match="hospital-1 already has 2 open inbound"):
            third.offer("tid-single-01", Announce(small.object_id, small.size, small.name,
                                                   small.media_type, small.case_id))  # fmt: skip
    finally:
        release.set()
        for t in threads:
            t.join(30)
        for link in links:
            link.close()
    wait_for(lambda: batches.held_by("hospital-1") == (0, 0), what="the streams closed")

    # An object larger than the peer's bytes left is refused before it is spooled: a
    # single transfer of ~300,000 bytes is open, another ~300,000 would pass 500,000.
    (tmp_path / "big").mkdir()
    held, big = _submit(hospital, tmp_path / "big", 2, size=300_000)
    big_data = b"".join(hospital.node.store.open_read(big.object_id))
    third.offer("tid-open-0001", Announce(held.object_id, held.size, held.name,
                                          held.media_type, held.case_id))  # fmt: skip

    def too_big() -> Iterator[BatchItem]:
        yield BatchStartMsg("batch-big-1", "case-b", "", "objects")
        yield from _object_items("tid-big-00001", big, big_data)
        yield BatchEndMsg(("tid-big-00001",))

    try:
        with pytest.raises(QuotaExceeded) as err:
            _acks(third, too_big())
        assert "transfer tid-big-00001 of batch batch-big-1 refused: hospital-1 already has " \
            f"2 open inbound transfer(s) of {held.size} bytes" in str(err.value)  # fmt: skip
        assert "transfer.max_spooled_bytes_per_peer" in str(err.value)
        assert not list(factory.node.receiver.settings.spool_dir.glob("tid-big-00001*"))
        # Room again: the small object goes through as a batch of one.
        acks = _acks(third, one())
    finally:
        third.close()
    assert isinstance(acks[-1], ManifestAck)
    assert factory.node.catalog.get_transfer("tid-third-001", "inbound").status == "done"
    assert batches.held_by("hospital-1") == (0, 0)
