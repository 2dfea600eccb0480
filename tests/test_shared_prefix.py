"""An inbound transfer cut off at one replica resumes at another (issue #13).

Two receivers stand for two replicas of one factory: one PostgreSQL catalog, one S3
bucket (moto server), each its own spool directory (its own disk) and audit log. The
sender's stream to replica A breaks after ~2.5 segments (as when A is SIGKILLed or
HAProxy sends the next connection elsewhere); A's spool file is gone with its machine.
Replica B answers the Offer with the offset of the segments A copied to the shared store,
the sender pushes only the rest, and the stored object is bit-identical. A damaged
segment costs a re-send, never a wrong object.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import pki
from gateway.audit import AuditLog
from gateway.catalog import Catalog
from gateway.errors import IntegrityError, TransferError
from gateway.identity import Identity
from gateway.storage import S3Store
from gateway.transfer.model import Announce, ChunkMsg, EndMsg, PushItem, StartMsg
from gateway.transfer.receiver import Receiver, ReceiverSettings
from gateway.transfer.shared_prefix import PREFIX
from tests.cluster import Federation

SEGMENT = 1024 * 1024
CHUNK = 256 * 1024
SIZE = 5 * SEGMENT + 12345


def _sender() -> Identity:
    now = datetime.now(UTC)
    return Identity("node", "hospital-1", "node", "cn-east", "hospital-1", 7, now, now, "f" * 64)


def _stream(tid: str, data: bytes, announce: Announce, offset: int, stop_at: int | None = None
            ) -> Iterator[PushItem]:  # fmt: skip
    yield StartMsg(tid, announce, offset)
    at = offset
    while at < len(data):
        if stop_at is not None and at >= stop_at:
            return  # the connection breaks: no PushEnd
        piece = data[at : at + CHUNK]
        yield ChunkMsg(at, piece, hashlib.sha256(piece).digest())
        at += len(piece)
    yield EndMsg(hashlib.sha256(data).hexdigest(), len(data))


@pytest.fixture
def replicas(
    pg_url: str, s3_store: S3Store, federation: Federation, tmp_path: Path
) -> Iterator[tuple[Receiver, Receiver, Catalog, S3Store]]:
    issued = federation.node("factory-1", "factory", "cn-east")
    key = pki.load_private_key(issued.key_path)
    cert_pem = Path(issued.cert_path).read_bytes()
    made: list[tuple[Receiver, Catalog, AuditLog]] = []
    for name in ("a", "b"):
        catalog = Catalog.open(pg_url, tmp_path / "unused")
        audit = AuditLog(tmp_path / f"audit-{name}.sqlite", "factory-1")
        settings = ReceiverSettings(
            node_id="factory-1", spool_dir=tmp_path / f"spool-{name}", max_chunk_bytes=CHUNK,
            max_object_bytes=1 << 30, shared_segment_bytes=SEGMENT,
        )  # fmt: skip
        receiver = Receiver(
            settings, s3_store, catalog, audit, lambda b: pki.sign(key, b), cert_pem
        )
        made.append((receiver, catalog, audit))
    yield made[0][0], made[1][0], made[0][1], s3_store
    for receiver, catalog, audit in made:
        receiver.close()
        catalog.close()
        audit.close()


def _keys(store: S3Store) -> list[str]:
    return sorted(
        o.object_name
        for o in store._client.list_objects(store.bucket, prefix=PREFIX + "/", recursive=True)
    )


def test_a_transfer_cut_at_one_replica_resumes_at_another(
    replicas: tuple[Receiver, Receiver, Catalog, S3Store],
) -> None:
    a, b, catalog, store = replicas
    data = os.urandom(SIZE)
    oid = hashlib.sha256(data).hexdigest()
    announce = Announce(oid, SIZE, "scan.bin", "application/octet-stream")
    tid = "ab" * 16
    sender = _sender()

    assert a.offer(sender, tid, announce).resume_offset == 0
    with pytest.raises(TransferError, match="without PushEnd"):
        a.receive(sender, _stream(tid, data, announce, 0, stop_at=2 * SEGMENT + SEGMENT // 2))
    # two whole segments reached the shared store; A's own disk is lost with A
    assert [(s, n) for s, n, _k in catalog.segments(tid)] == [(0, SEGMENT), (SEGMENT, SEGMENT)]
    assert len(_keys(store)) == 2
    a._part(tid).unlink()

    offer = b.offer(sender, tid, announce)
    assert offer.resume_offset == 2 * SEGMENT  # not 0: B took over A's verified prefix
    receipt = b.receive(sender, _stream(tid, data, announce, offer.resume_offset))
    assert receipt
    stored = b"".join(store.open_read(oid))
    assert hashlib.sha256(stored).hexdigest() == oid and stored == data
    assert catalog.get_transfer(tid, "inbound").status == "done"
    history = [(h.kind, h.detail) for h in catalog.history(tid, "inbound")]
    assert ("resume", f"offset {2 * SEGMENT}") in history
    # segments are deleted once the object is stored
    assert catalog.segments(tid) == [] and _keys(store) == []


def test_a_damaged_segment_costs_a_resend_not_a_wrong_object(
    replicas: tuple[Receiver, Receiver, Catalog, S3Store],
) -> None:
    a, b, catalog, store = replicas
    data = os.urandom(SIZE)
    oid = hashlib.sha256(data).hexdigest()
    announce = Announce(oid, SIZE, "scan.bin", "application/octet-stream")
    tid = "cd" * 16
    sender = _sender()
    a.offer(sender, tid, announce)
    with pytest.raises(TransferError):
        a.receive(sender, _stream(tid, data, announce, 0, stop_at=3 * SEGMENT))
    a._part(tid).unlink()
    # someone with write access to the bucket flips one byte of the first segment
    key = catalog.segments(tid)[0][2]
    bad = bytearray(b"".join(store.open_read(key)))
    bad[1000] ^= 0xFF
    store.put_stream(key, [bytes(bad)])

    offer = b.offer(sender, tid, announce)
    assert offer.resume_offset > 0
    with pytest.raises(IntegrityError, match="does not match"):
        b.receive(sender, _stream(tid, data, announce, offer.resume_offset))
    assert store.size(oid) is None  # nothing stored under the object's id
    assert catalog.segments(tid) == [] and _keys(store) == []  # the prefix is dropped


def test_small_objects_and_sqlite_nodes_copy_nothing(
    replicas: tuple[Receiver, Receiver, Catalog, S3Store], tmp_path: Path
) -> None:
    a, _b, catalog, store = replicas
    data = os.urandom(SEGMENT // 2)
    oid = hashlib.sha256(data).hexdigest()
    announce = Announce(oid, len(data), "small.bin", "application/octet-stream")
    tid = "ef" * 16
    a.offer(_sender(), tid, announce)
    a.receive(_sender(), _stream(tid, data, announce, 0))
    assert catalog.segments(tid) == [] and _keys(store) == []
    lone = Catalog(tmp_path / "single.sqlite")
    try:
        settings = ReceiverSettings(
            node_id="factory-1", spool_dir=tmp_path / "spool-single", max_chunk_bytes=CHUNK,
            max_object_bytes=1 << 30, shared_segment_bytes=SEGMENT,
        )  # fmt: skip
        single = Receiver(settings, store, lone, a.audit, a._sign, a.cert_pem)
        assert single.prefix is None  # one process per SQLite file: nobody to share with
        single.close()
    finally:
        lone.close()


def test_two_replicas_finishing_one_transfer_hold_one_receipt(
    replicas: tuple[Receiver, Receiver, Catalog, S3Store],
) -> None:
    """A sender's retry reached replica B while A was still storing the same transfer:
    both verified the whole object, but only the first to commit signs the receipt both
    sides keep; the other answers with that one."""
    a, b, catalog, _store = replicas
    data = os.urandom(SEGMENT // 4)
    oid = hashlib.sha256(data).hexdigest()
    announce = Announce(oid, len(data), "scan.bin", "application/octet-stream")
    tid = "aa" * 16
    a.offer(_sender(), tid, announce)
    first = a.receive(_sender(), _stream(tid, data, announce, 0))
    late = b._finish(_sender(), tid, announce, "2026-12-04T00:00:00.000000Z")
    assert late == first == catalog.get_transfer(tid, "inbound").receipt
