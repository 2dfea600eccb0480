"""Failure paths of the verified transfer, each made to happen for real:
a hostile sender altering bytes, the receiver killed mid-transfer, the peer
down while the sender restarts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from gateway.catalog import TransferRecord
from gateway.config import load_config
from gateway.rpc.channel import ClientCredentials, open_channel
from gateway.transfer.receipts import verify_receipt
from tests.cluster import (
    Federation,
    InProcessNode,
    NodeProcess,
    broken,
    pin_port,
    wait_for,
    write_config,
)
from tests.outbound_files import clean_pdf
from yigong.v1 import common_pb2, transfer_pb2, transfer_pb2_grpc

CHUNK = 64 * 1024


def _hostile_push(
    factory: InProcessNode, creds: ClientCredentials, payload: bytes, tamper: str
) -> grpc.RpcError:
    """Push ``payload`` as a peer would, altering it as ``tamper`` says; return the error."""
    digest = hashlib.sha256(payload).hexdigest()
    header = common_pb2.ObjectHeader(
        object_id=digest, size=len(payload), name="design.stl", media_type="model/stl"
    )
    tid = f"hostile-{tamper}"
    with open_channel(factory.address, creds, peer_node_id="factory-1") as channel:
        stub = transfer_pb2_grpc.TransferStub(channel)
        offer = stub.Offer(transfer_pb2.OfferRequest(transfer_id=tid, object=header))
        assert offer.resume_offset == 0 and not offer.complete

        def messages():  # type: ignore[no-untyped-def]
            yield transfer_pb2.PushMessage(
                start=transfer_pb2.PushStart(transfer_id=tid, object=header, offset=0)
            )
            for offset in range(0, len(payload), CHUNK):
                data = payload[offset : offset + CHUNK]
                sha = hashlib.sha256(data).digest()
                if offset == CHUNK * 2:
                    if tamper == "chunk":  # bytes altered in flight, hash left as sent
                        data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
                    elif tamper == "rehashed":  # re-hashed: only the object hash catches it
                        data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
                        sha = hashlib.sha256(data).digest()
                yield transfer_pb2.PushMessage(
                    chunk=common_pb2.Chunk(offset=offset, data=data, sha256=sha)
                )
            yield transfer_pb2.PushMessage(
                end=transfer_pb2.PushEnd(sha256=digest, size=len(payload))
            )

        with pytest.raises(grpc.RpcError) as err:
            stub.Push(messages())
    return err.value


@pytest.mark.parametrize("tamper", ["chunk", "rehashed"])
def test_altered_chunk_is_detected_and_not_stored(
    pair: tuple[InProcessNode, InProcessNode], federation: Federation, tamper: str
) -> None:
    _, factory = pair
    payload = os.urandom(CHUNK * 5 + 7)
    digest = hashlib.sha256(payload).hexdigest()
    creds = federation.creds(federation.node("hospital-1", "hospital"))
    err = _hostile_push(factory, creds, payload, tamper)
    assert err.code() == grpc.StatusCode.DATA_LOSS
    if tamper == "chunk":
        assert f"chunk at offset {CHUNK * 2}" in err.details()
    else:
        assert "object SHA-256/size" in err.details()
    assert "not stored as complete" in err.details()
    # Nothing stored or catalogued as complete.
    assert factory.node.catalog.find_object(digest) is None
    assert factory.node.store.size(digest) is None
    rec = factory.node.catalog.get_transfer(f"hostile-{tamper}", "inbound")
    assert rec.status != "done" and rec.receipt is None
    events = factory.node.audit.events(event="transfer.integrity_failed")
    assert [e.transfer_id for e in events] == [f"hostile-{tamper}"]
    # The verified prefix is kept for a resume; the altered chunk was not written.
    part = factory.node.receiver._part(f"hostile-{tamper}")
    if tamper == "chunk":
        assert part.read_bytes() == payload[: CHUNK * 2]
    else:
        assert not part.exists()


def test_receiver_spool_failure_is_reported_retried_and_delivered(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    """The factory cannot write its transfer spool: the push fails with a storage error
    that names the spool, nothing is stored or receipted, and the hospital keeps the
    transfer queued and delivers it, bit-identical, once the disk is back."""
    hospital, factory = pair
    payload = clean_pdf(os.urandom(300_000))  # what a hospital may send
    digest = hashlib.sha256(payload).hexdigest()
    src = tmp_path / "scan.pdf"
    src.write_bytes(payload)

    def outbound() -> TransferRecord:
        return hospital.node.catalog.get_transfer(tid, "outbound")

    with broken(factory.node.receiver.settings.spool_dir):
        with hospital.self_client() as client:
            tid = client.submit(src, ["factory-1"]).queued[0].transfer_id
        wait_for(lambda: outbound().attempts >= 1, timeout=20, what="a failed attempt")
        assert outbound().status != "done"
        assert f"transfer {tid}: spool file" in outbound().last_error
        assert "check the disk behind" in outbound().last_error
        assert factory.node.catalog.find_object(digest) is None
        assert factory.node.store.size(digest) is None
    wait_for(lambda: outbound().status == "done", timeout=30, what="delivery after the repair")
    assert b"".join(factory.node.store.open_read(digest)) == payload
    inbound = factory.node.catalog.get_transfer(tid, "inbound")
    assert inbound.status == "done" and inbound.receipt == outbound().receipt


def test_receiver_killed_mid_transfer_resumes_bit_identical(
    federation: Federation, tmp_path: Path
) -> None:
    size = 48 * 1024 * 1024
    fcfg = write_config(federation, tmp_path, "factory-1", "factory")
    factory = NodeProcess(fcfg, tmp_path / "factory.log")
    port = factory.start()
    # Restart must come back on the same address: pin the port it got.
    pin_port(fcfg, port)
    hcfg = write_config(
        federation,
        tmp_path,
        "hospital-1",
        "hospital",
        peers={"factory-1": factory.address},
        extra="[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 0.5\n"
        "max_bytes_per_second = 24000000\nchunk_bytes = 262144",
    )
    hospital = InProcessNode(hcfg)
    try:
        payload = clean_pdf(os.urandom(size))  # what a hospital may send
        src = tmp_path / "ct.pdf"
        src.write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        with hospital.self_client() as client:
            tid = client.submit(src, ["factory-1"], case_id="case-k").queued[0].transfer_id
        spool = load_config(fcfg).data_dir / "spool" / "inbound" / f"{tid}.part"
        wait_for(
            lambda: spool.exists() and spool.stat().st_size > size // 3,
            timeout=60,
            interval=0.01,
            what="a third of the object at the factory",
        )
        factory.kill()
        killed_at = spool.stat().st_size
        assert 0 < killed_at < size
        out = hospital.node.catalog.get_transfer(tid, "outbound")
        assert out.status != "done"
        factory.start()
        wait_for(
            lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done",
            timeout=90,
            what="transfer done after restart",
        )
        out = hospital.node.catalog.get_transfer(tid, "outbound")
        body = verify_receipt(out.receipt or b"", hospital.node.trust, expect_sha256=digest).body
        assert body.size == len(payload)
        # Resumed, not restarted: the last attempt sent only what was missing.
        done = hospital.node.audit.events(event="transfer.completed", transfer_id=tid)
        assert done[-1].details["sent_bytes"] <= len(payload) - killed_at
        failures = [
            h for h in hospital.node.catalog.history(tid, "outbound") if h.kind == "attempt_failed"
        ]
        assert failures, "the interrupted attempt is recorded"
    finally:
        hospital.stop()
        factory.stop()
    # Exactly one, bit-identical copy at the factory.
    fac = load_config(fcfg)
    stored = [p for p in fac.storage.path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert [p.name for p in stored] == [digest]
    assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == digest
    from gateway.catalog import Catalog

    cat = Catalog(fac.catalog.path)
    try:
        (inbound,) = cat.list_transfers(direction="inbound")
        assert inbound.status == "done" and inbound.transfer_id == tid
        kinds = [h.kind for h in cat.history(tid, "inbound")]
        assert "resume" in kinds
    finally:
        cat.close()


def test_peer_down_then_sender_restarts_nothing_lost(
    federation: Federation, tmp_path: Path
) -> None:
    fcfg = write_config(federation, tmp_path, "factory-1", "factory")
    factory = NodeProcess(fcfg, tmp_path / "factory.log")
    port = factory.start()
    factory.stop()  # learn a port, then the factory is down
    pin_port(fcfg, port)
    hcfg = write_config(
        federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": f"127.0.0.1:{port}"}
    )
    hospital = NodeProcess(hcfg, tmp_path / "hospital.log")
    hospital.start()
    payload = clean_pdf(os.urandom(2 * 1024 * 1024 + 5))  # what a hospital may send
    src = tmp_path / "study.pdf"
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    creds = federation.creds(federation.node("hospital-1", "hospital"))
    from gateway.rpc.client import NodeClient

    try:
        with NodeClient(hospital.address, creds, node_id="hospital-1") as client:
            tid = client.submit(src, ["factory-1"]).queued[0].transfer_id

            def failed_once():  # type: ignore[no-untyped-def]
                (t,) = client.list_transfers(direction="outbound")
                return t if t.attempts >= 1 and t.status == "queued" else None

            t = wait_for(failed_once, what="a failed attempt while the peer is down")
            assert "factory-1" in t.last_error and "UNAVAILABLE" in t.last_error
        assert hospital.stop() == 0  # sender restarts with the send still queued
        hospital.start()
        factory.start()
        with NodeClient(hospital.address, creds, node_id="hospital-1") as client:
            wait_for(
                lambda: client.list_transfers(direction="outbound")[0].status == "done",
                what="delivery after the peer came back",
            )
            (t,) = client.list_transfers(direction="outbound")
            assert t.transfer_id == tid and t.attempts >= 2
        fcreds = federation.creds(federation.node("factory-1", "factory"))
        with NodeClient(factory.address, fcreds, node_id="factory-1") as fc:
            got, _ = fc.download(digest, tmp_path / "got.bin")
        assert got == digest and (tmp_path / "got.bin").read_bytes() == payload
    finally:
        hospital.stop()
        factory.stop()
