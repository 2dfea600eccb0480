"""Verified transfer between two real nodes over mTLS gRPC."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gateway.transfer.receipts import verify_receipt
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.outbound_files import clean_pdf
from yigong.v1 import common_pb2


def _done(node: InProcessNode, transfer_id: str, direction: str) -> bool:
    rec = node.node.catalog.find_transfer(transfer_id, direction)
    return rec is not None and rec.status == "done"


def test_send_hospital_to_factory_same_receipt_both_sides(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    payload = clean_pdf(os.urandom(3 * 1024 * 1024 + 123))  # what a hospital may send
    src = tmp_path / "report.pdf"
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    with hospital.self_client() as client:
        reply = client.submit(src, ["factory-1"], case_id="case-7")
    assert reply.object.object_id == digest
    (queued,) = reply.queued
    tid = queued.transfer_id
    wait_for(lambda: _done(hospital, tid, "outbound"), what="outbound transfer done")
    assert _done(factory, tid, "inbound")

    out = hospital.node.catalog.get_transfer(tid, "outbound")
    inn = factory.node.catalog.get_transfer(tid, "inbound")
    assert out.receipt == inn.receipt and out.receipt
    receipt = verify_receipt(out.receipt, hospital.node.trust, expect_sha256=digest)
    assert receipt.body.sender_node == "hospital-1"
    assert receipt.body.receiver_node == "factory-1"
    assert receipt.body.size == len(payload)
    assert receipt.body.case_id == "case-7"

    # The factory stored the exact bytes, and its query endpoint shows them.
    stored = b"".join(factory.node.store.open_read(digest))
    assert stored == payload
    with factory.self_client() as fc:
        detail = fc.get_object(digest)
        assert detail.object.size == len(payload)
        (t,) = detail.transfers
        assert t.direction == "inbound" and t.status == "done"
        assert (
            t.receipt.SerializeToString()
            == common_pb2.SignedReceipt.FromString(inn.receipt).SerializeToString()
        )
        got, size = fc.download(digest, tmp_path / "back.bin")
    assert got == digest and size == len(payload)
    assert (tmp_path / "back.bin").read_bytes() == payload


def test_identical_content_twice_is_idempotent(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    src = tmp_path / "same.pdf"
    src.write_bytes(clean_pdf(b"identical content " * 1000))
    with hospital.self_client() as client:
        first = client.submit(src, ["factory-1"]).queued[0].transfer_id
        wait_for(lambda: _done(hospital, first, "outbound"))
        second = client.submit(src, ["factory-1"]).queued[0].transfer_id
        wait_for(lambda: _done(hospital, second, "outbound"))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert len(factory.node.catalog.list_objects()) == 1
    inbound = factory.node.catalog.list_transfers(direction="inbound")
    assert {t.transfer_id for t in inbound} == {first, second}
    second_rec = hospital.node.catalog.get_transfer(second, "outbound")
    body = verify_receipt(second_rec.receipt or b"", hospital.node.trust).body
    assert body.sha256 == digest and body.transfer_id == second
    # exactly one stored copy
    files = [
        p for p in Path(factory.node.store.describe().split(":", 1)[1]).rglob("*") if p.is_file()
    ]
    assert [p.name for p in files if not p.name.startswith(".")] == [digest]


def test_unknown_destination_refused_before_upload(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    from gateway.errors import YigongError

    hospital, _ = pair
    src = tmp_path / "x.bin"
    src.write_bytes(b"x")
    with hospital.self_client() as client, pytest.raises(YigongError) as err:
        client.submit(src, ["nowhere-9"])
    assert "nowhere-9" in str(err.value) and "not a configured peer" in str(err.value)
    assert hospital.node.catalog.list_objects() == []


def test_bytes_done_advances_on_both_nodes_during_a_transfer(
    federation: Federation, tmp_path: Path
) -> None:
    """Issue #11: a throttled 4 MiB send is watched on both nodes; bytes_done is seen
    strictly between 0 and the size on the sender's outbound and the receiver's inbound
    row while the bytes flow (written at most once a second, not per chunk)."""
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-1": factory.address},
            extra="[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n"
            "max_bytes_per_second = 1048576\nchunk_bytes = 65536",
        )
    )
    try:
        payload = clean_pdf(os.urandom(4 * 1024 * 1024))  # what a hospital may send
        size = len(payload)
        src = tmp_path / "slow.pdf"
        src.write_bytes(payload)
        with hospital.self_client() as client:
            tid = client.submit(src, ["factory-1"]).queued[0].transfer_id
        seen: dict[str, set[int]] = {"outbound": set(), "inbound": set()}

        def watch() -> bool:
            for node, direction in ((hospital, "outbound"), (factory, "inbound")):
                rec = node.node.catalog.find_transfer(tid, direction)
                if rec is not None and rec.status != "done":
                    seen[direction].add(rec.bytes_done)
            return _done(hospital, tid, "outbound")

        wait_for(watch, timeout=120, interval=0.05, what="the throttled transfer")
        for direction in ("outbound", "inbound"):
            moving = sorted(v for v in seen[direction] if 0 < v < size)
            assert moving, (direction, sorted(seen[direction]))
        assert factory.node.catalog.get_transfer(tid, "inbound").bytes_done == size
        assert hospital.node.catalog.get_transfer(tid, "outbound").bytes_done == size
    finally:
        hospital.stop()
        factory.stop()
