"""A hostile peer on the transfer path, over real sockets (issue #14).

The hostile client is built from ``proto/`` (the yigong.v1 stubs) and presents a
real certificate of another hospital node, ``hospital-2``, issued by the test
CA: it is a certified federation node, so it passes both gates and talks to the
factory's Transfer service like any peer. What it must not get: a signed receipt
for bytes it does not hold, a hint whether the factory holds an object another
node sent, or a full disk. Every refusal is audited with its certificate.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.audit import AuditEvent
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.transfer.receipts import verify_receipt
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.outbound_files import clean_pdf
from yigong.v1 import common_pb2, exchange_pb2, exchange_pb2_grpc, transfer_pb2, transfer_pb2_grpc

Pair = tuple[InProcessNode, InProcessNode]
CHUNK = 64 * 1024
RETRY = "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n"


# --------------------------------------------------------------------------- the hostile client


class Hostile:
    """Raw Transfer stub to the factory with hospital-2's certificate."""

    def __init__(self, stub: transfer_pb2_grpc.TransferStub, serial: int) -> None:
        self.stub = stub
        self.serial = serial

    def offer(self, tid: str, header: common_pb2.ObjectHeader) -> transfer_pb2.OfferResponse:
        req = transfer_pb2.OfferRequest(transfer_id=tid, object=header)
        return self.stub.Offer(req, timeout=30)

    def push(
        self,
        tid: str,
        header: common_pb2.ObjectHeader,
        data: bytes,
        *,
        start: int = 0,
        end: bool = True,
        first_chunk_offset: int | None = None,
    ) -> common_pb2.SignedReceipt:
        """Push ``data`` as the bytes from ``start`` (PushEnd with the header's hash/size)."""

        def messages() -> Iterator[transfer_pb2.PushMessage]:
            yield transfer_pb2.PushMessage(
                start=transfer_pb2.PushStart(transfer_id=tid, object=header, offset=start)
            )
            for i in range(0, len(data), CHUNK):
                piece = data[i : i + CHUNK]
                offset = start + i
                if i == 0 and first_chunk_offset is not None:
                    offset = first_chunk_offset
                yield transfer_pb2.PushMessage(
                    chunk=common_pb2.Chunk(
                        offset=offset, data=piece, sha256=hashlib.sha256(piece).digest()
                    )
                )
            if end:
                yield transfer_pb2.PushMessage(
                    end=transfer_pb2.PushEnd(sha256=header.object_id, size=header.size)
                )

        return self.stub.Push(messages(), timeout=60)


@contextmanager
def hostile(federation: Federation, factory: InProcessNode, node_id: str = "hospital-2") -> Any:
    from gateway.rpc.channel import open_channel

    issued = federation.node(node_id, "hospital")
    with open_channel(factory.address, federation.creds(issued), peer_node_id="factory-1") as ch:
        yield Hostile(transfer_pb2_grpc.TransferStub(ch), issued.serial)


def header_of(payload: bytes, name: str = "scan.bin") -> common_pb2.ObjectHeader:
    return common_pb2.ObjectHeader(
        object_id=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        name=name,
        media_type="application/octet-stream",
    )


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def deliver(hospital: InProcessNode, tmp_path: Path, payload: bytes) -> str:
    """hospital-1 sends ``payload`` (a PDF: what a hospital may send) to the factory through
    its outbox; the transfer id."""
    src = tmp_path / f"{hashlib.sha256(payload).hexdigest()[:12]}.pdf"
    src.write_bytes(payload)
    with hospital.self_client() as client:
        tid = str(client.submit(src, ["factory-1"]).queued[0].transfer_id)
    wait_for(
        lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done",
        timeout=60,
        what="delivery by hospital-1",
    )
    return tid


def events(node: InProcessNode, event: str) -> list[AuditEvent]:
    return node.node.audit.events(event=event, limit=100_000)


def spooled_bytes(node: InProcessNode) -> int:
    spool = node.node.receiver.settings.spool_dir
    return sum(p.stat().st_size for p in spool.glob("*.part"))


def factory_with(federation: Federation, tmp_path: Path, transfer: str) -> InProcessNode:
    return InProcessNode(
        write_config(federation, tmp_path, "factory-1", "factory", extra=RETRY + transfer)
    )


# --------------------------------------------------------------------------- proof of possession


def test_receipt_refused_to_a_node_that_knows_only_the_hash_and_size(
    pair: Pair, federation: Federation, tmp_path: Path
) -> None:
    hospital, factory = pair
    payload = clean_pdf(os.urandom(300_000))
    deliver(hospital, tmp_path, payload)
    header = header_of(payload)
    with hostile(federation, factory) as h2:
        answer = h2.offer("h2-claim-0001", header)
        assert (answer.complete, answer.resume_offset, answer.HasField("receipt")) == (
            False,
            0,
            False,
        )
        # Claiming the end without the bytes, or sending other bytes, gets no receipt.
        err = refused(lambda: h2.push("h2-claim-0001", header, b""))
        assert err.code() == grpc.StatusCode.DATA_LOSS
        assert "object SHA-256/size does not match" in (err.details() or "")
        h2.offer("h2-claim-0002", header)
        err = refused(lambda: h2.push("h2-claim-0002", header, os.urandom(len(payload))))
        assert err.code() == grpc.StatusCode.DATA_LOSS
        serial = h2.serial
    cat = factory.node.catalog
    assert not cat.delivered_by(header.object_id, "hospital-2")
    assert [e.peer for e in events(factory, "transfer.received")] == ["hospital-1"]
    mine = [t for t in cat.list_transfers(direction="inbound") if t.peer_node == "hospital-2"]
    assert mine and all(t.status != "done" and t.receipt is None for t in mine)

    def withheld_events() -> list[AuditEvent]:  # written off the request path
        refused_ = events(factory, "transfer.refused")
        return [e for e in refused_ if e.details.get("reason") == "possession not proven"]

    withheld = wait_for(lambda: len(withheld_events()) == 2 and withheld_events())
    assert [(e.actor, e.transfer_id, e.object_id) for e in withheld] == [
        ("node:hospital-2", "h2-claim-0001", header.object_id),
        ("node:hospital-2", "h2-claim-0002", header.object_id),
    ]
    assert withheld[0].details["cert_serial"] == f"{serial:x}"
    assert withheld[0].outcome == "failure"
    # The object hospital-1 delivered is untouched.
    assert b"".join(factory.node.store.open_read(header.object_id)) == payload


def test_node_that_pushes_the_bytes_proves_possession_and_gets_its_receipt(
    pair: Pair, federation: Federation, tmp_path: Path
) -> None:
    hospital, factory = pair
    payload = clean_pdf(os.urandom(200_000))
    deliver(hospital, tmp_path, payload)
    header = header_of(payload)
    with hostile(federation, factory) as h2:
        assert not h2.offer("h2-proves-0001", header).complete
        signed = h2.push("h2-proves-0001", header, payload)
        body = verify_receipt(signed.SerializeToString(), factory.node.trust).body
        assert (body.sender_node, body.receiver_node, body.sha256, body.size) == (
            "hospital-2",
            "factory-1",
            header.object_id,
            len(payload),
        )
        assert body.transfer_id == "h2-proves-0001"
        # Having delivered it, hospital-2's re-send is idempotent now.
        again = h2.offer("h2-proves-0001", header)
        assert again.complete and again.receipt.SerializeToString() == signed.SerializeToString()
    assert factory.node.catalog.delivered_by(header.object_id, "hospital-2")
    assert len(factory.node.catalog.list_objects()) == 1
    assert b"".join(factory.node.store.open_read(header.object_id)) == payload
    assert spooled_bytes(factory) == 0


def test_original_senders_resend_is_still_idempotent(
    pair: Pair, federation: Federation, tmp_path: Path
) -> None:
    hospital, factory = pair
    payload = clean_pdf(os.urandom(150_000))
    tid = deliver(hospital, tmp_path, payload)
    header = header_of(payload)
    stored = factory.node.catalog.get_transfer(tid, "inbound").receipt
    with hostile(federation, factory, "hospital-1") as h1:
        same = h1.offer(tid, header)
        assert same.complete and same.resume_offset == len(payload)
        assert same.receipt.SerializeToString() == stored
        fresh = h1.offer("h1-again-0001", header)  # a new send of bytes it delivered before
        assert fresh.complete
        body = verify_receipt(fresh.receipt.SerializeToString(), factory.node.trust).body
        assert (body.transfer_id, body.sender_node, body.sha256) == (
            "h1-again-0001",
            "hospital-1",
            header.object_id,
        )
    assert events(factory, "transfer.refused") == []


def test_offer_answer_is_identical_for_held_and_unheld_objects_of_other_senders(
    pair: Pair, federation: Federation, tmp_path: Path
) -> None:
    hospital, factory = pair
    held = clean_pdf(os.urandom(120_000))
    deliver(hospital, tmp_path, held)
    unheld = os.urandom(len(held))
    partial = os.urandom(4 * CHUNK)
    with hostile(federation, factory, "hospital-1") as h1:
        # hospital-1 starts another transfer and is cut after two chunks: resumable by it.
        assert h1.offer("h1-partial-01", header_of(partial)).resume_offset == 0
        err = refused(
            lambda: h1.push("h1-partial-01", header_of(partial), partial[: 2 * CHUNK], end=False)
        )
        assert err.code() == grpc.StatusCode.ABORTED
        assert h1.offer("h1-partial-01", header_of(partial)).resume_offset == 2 * CHUNK
    with hostile(federation, factory) as h2:
        answers = [
            h2.offer(tid, header_of(data, "same-name.bin")).SerializeToString()
            for tid, data in (
                ("h2-probe-held", held),
                ("h2-probe-unheld", unheld),
            )
        ]
        assert answers[0] == answers[1]
        # hospital-1's partial: offered under hospital-2's own id it starts at 0 ...
        resumed = h2.offer("h2-probe-partial", header_of(partial, "same-name.bin"))
        assert (resumed.complete, resumed.resume_offset) == (False, 0)
        # ... and hospital-1's transfer id cannot be taken over.
        err = refused(lambda: h2.offer("h1-partial-01", header_of(partial)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "was announced by hospital-1" in (err.details() or "")
    unheld_probe = transfer_pb2.OfferResponse.FromString(answers[1])
    assert (unheld_probe.complete, unheld_probe.resume_offset) == (False, 0)


# --------------------------------------------------------------------------- refusals audited


def test_every_refused_transfer_request_is_audited_with_the_callers_certificate(
    federation: Federation, tmp_path: Path
) -> None:
    factory = factory_with(federation, tmp_path, "max_object_bytes = 1048576\n")
    try:
        payload = os.urandom(3 * CHUNK)
        header = header_of(payload)
        with hostile(federation, factory, "hospital-1") as h1:
            h1.offer("h1-owned-0001", header)
        INVALID = grpc.StatusCode.INVALID_ARGUMENT
        with hostile(federation, factory) as h2:
            cases: list[tuple[str, str, Any]] = [
                (
                    "Transfer.Offer",
                    "was announced by hospital-1",
                    lambda: h2.offer("h1-owned-0001", header),
                ),
                (
                    "Transfer.Offer",
                    "must be 8-64 characters",
                    lambda: h2.offer("../../../etc/passwd", header),
                ),
                (
                    "Transfer.Offer",
                    "no path separators",
                    lambda: h2.offer("h2-name-0001", header_of(payload, "../../x.bin")),
                ),
                (
                    "Transfer.Offer",
                    "transfer.max_object_bytes",
                    lambda: h2.offer("h2-size-0001", header_of(os.urandom(1048577))),
                ),
                (
                    "Transfer.Push",
                    "was not offered",
                    lambda: h2.push("h2-never-offered", header, payload),
                ),
                (
                    "Transfer.Push",
                    f"chunk at offset {CHUNK}, expected 0",
                    lambda: (
                        h2.offer("h2-offset-0001", header),
                        h2.push("h2-offset-0001", header, payload, first_chunk_offset=CHUNK),
                    ),
                ),
                (
                    "Transfer.Push",
                    "exceeds the chunk limit or the announced size",
                    lambda: (
                        h2.offer("h2-beyond-0001", header),
                        h2.push("h2-beyond-0001", header, payload + b"x" * CHUNK),
                    ),
                ),
                (
                    "Transfer.Push",
                    "push starts at offset 4096 but 0 verified bytes are held",
                    lambda: (
                        h2.offer("h2-start-0001", header),
                        h2.push("h2-start-0001", header, payload[4096:], start=4096),
                    ),
                ),
            ]
            for method, text, call in cases:
                err = refused(call)
                assert err.code() == INVALID, (method, text, err)
                assert text in (err.details() or ""), (text, err.details())
            serial = h2.serial
        audited = events(factory, "transfer.refused")
        assert [(e.details["method"], e.details["reason"]) for e in audited] == [
            (method, "ValidationError") for method, _, _ in cases
        ]
        for (_, text, _), event in zip(cases, audited, strict=True):
            assert event.actor == "node:hospital-2" and event.peer == "hospital-2"
            assert event.outcome == "failure"
            assert event.details["cert_serial"] == f"{serial:x}"
            assert event.details["cert_subject"] == "hospital-2"
            assert text in str(event.details["why"])
            assert "ipv4:127.0.0.1" in str(event.details["remote"])
        # The refused file name is not repeated anywhere (names may carry patient data).
        assert all("../../x.bin" not in str(e.details) for e in audited)
    finally:
        factory.stop()


# --------------------------------------------------------------------------- caps and janitor


def test_per_peer_cap_on_open_inbound_transfers(federation: Federation, tmp_path: Path) -> None:
    factory = factory_with(federation, tmp_path, "max_open_inbound_per_peer = 3\n")
    try:
        payloads = [os.urandom(10_000) for _ in range(4)]
        with hostile(federation, factory) as h2:
            for i in range(3):
                h2.offer(f"h2-open-000{i}", header_of(payloads[i]))
            err = refused(lambda: h2.offer("h2-open-0003", header_of(payloads[3])))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "hospital-2 already has 3 open inbound transfer(s)" in (err.details() or "")
            assert "transfer.max_open_inbound_per_peer" in (err.details() or "")
            # an open transfer may still be offered again and completed
            assert not h2.offer("h2-open-0000", header_of(payloads[0])).complete
            h2.push("h2-open-0000", header_of(payloads[0]), payloads[0])
            h2.offer("h2-open-0003", header_of(payloads[3]))  # room again
        with hostile(federation, factory, "hospital-1") as h1:  # the cap is per peer
            h1.offer("h1-other-0001", header_of(payloads[3]))
        (quota,) = [
            e for e in events(factory, "transfer.refused") if e.details["reason"] == "QuotaExceeded"
        ]
        assert quota.actor == "node:hospital-2" and quota.details["method"] == "Transfer.Offer"
    finally:
        factory.stop()


def test_hostile_peer_abandoning_1000_pushes_is_bounded_by_the_cap_then_expired(
    federation: Federation, tmp_path: Path
) -> None:
    """1,000 pushes opened and cut half-way: the spool never holds more than the peer's
    cap (8 objects of 4 KiB), every admitted transfer is expired, its spool deleted and
    its expiry audited; then the peer has room again."""
    cap = 32 * 1024
    factory = factory_with(
        federation,
        tmp_path,
        "max_object_bytes = 4096\nmax_open_inbound_per_peer = 1000\n"
        f"max_spooled_bytes_per_peer = {cap}\ninbound_expiry_seconds = 3600\n",
    )
    try:
        admitted: list[str] = []
        headers: dict[str, common_pb2.ObjectHeader] = {}
        exhausted = high = 0
        with hostile(federation, factory) as h2:
            for i in range(1000):
                payload = os.urandom(4096)
                tid, header = f"h2-flood-{i:05d}", header_of(payload)
                try:
                    h2.offer(tid, header)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    exhausted += 1
                    continue
                admitted.append(tid)
                headers[tid] = header
                err = refused(lambda t=tid, h=header, p=payload: h2.push(t, h, p[:2048], end=False))
                assert err.code() == grpc.StatusCode.ABORTED
                high = max(high, spooled_bytes(factory))
        assert (len(admitted), exhausted) == (8, 992)
        assert 0 < high <= cap and spooled_bytes(factory) == 8 * 2048
        cat = factory.node.catalog
        assert len(cat.open_inbound("hospital-2")) == 8
        # Nothing heard from the peer for longer than the expiry: everything goes.
        later = datetime.now(UTC) + timedelta(seconds=3601)
        assert factory.node.janitor.expire_once(now=later) == 8
        assert spooled_bytes(factory) == 0
        assert cat.open_inbound("hospital-2") == []
        for tid in admitted:
            rec = cat.get_transfer(tid, "inbound")
            assert (rec.status, rec.bytes_done) == ("abandoned", 0)
            assert "more than 3600 s" in rec.last_error
        expired = events(factory, "transfer.abandoned")
        assert sorted(e.transfer_id or "" for e in expired) == admitted
        assert {e.details["spooled_bytes"] for e in expired} == {2048}
        # The peer has room again; an abandoned transfer offered again starts at 0.
        with hostile(federation, factory) as h2:
            assert h2.offer(admitted[0], headers[admitted[0]]).resume_offset == 0
            assert h2.offer("h2-after-00001", header_of(os.urandom(4096))).resume_offset == 0
    finally:
        factory.stop()


def test_abandoned_inbound_transfer_expires_in_the_background(
    federation: Federation, tmp_path: Path
) -> None:
    factory = factory_with(federation, tmp_path, "inbound_expiry_seconds = 1\n")
    try:
        payload = os.urandom(3 * CHUNK)
        with hostile(federation, factory) as h2:
            h2.offer("h2-quiet-0001", header_of(payload))
            refused(
                lambda: h2.push("h2-quiet-0001", header_of(payload), payload[:CHUNK], end=False)
            )
        part = factory.node.receiver.settings.spool_dir / "h2-quiet-0001.part"
        assert part.stat().st_size == CHUNK
        assert stat.S_IMODE(part.stat().st_mode) == 0o600
        cat = factory.node.catalog
        wait_for(
            lambda: cat.get_transfer("h2-quiet-0001", "inbound").status == "abandoned",
            timeout=30,
            what="the janitor to expire the quiet transfer",
        )
        assert not part.exists()
        (event,) = events(factory, "transfer.abandoned")
        assert (event.peer, event.details["spooled_bytes"]) == ("hospital-2", CHUNK)
        # The sender comes back: it starts again from 0 and delivers.
        with hostile(federation, factory) as h2:
            assert h2.offer("h2-quiet-0001", header_of(payload)).resume_offset == 0
            h2.push("h2-quiet-0001", header_of(payload), payload)
        assert cat.get_transfer("h2-quiet-0001", "inbound").status == "done"
    finally:
        factory.stop()


def test_interrupted_uploads_and_orphaned_spool_files_swept_at_start(
    federation: Federation, tmp_path: Path
) -> None:
    cfg = write_config(federation, tmp_path, "factory-1", "factory")
    factory = InProcessNode(cfg)
    payload = os.urandom(3 * CHUNK)
    try:
        with hostile(federation, factory) as h2:  # an open transfer: kept for its resume
            h2.offer("h2-kept-00001", header_of(payload))
            refused(
                lambda: h2.push("h2-kept-00001", header_of(payload), payload[:CHUNK], end=False)
            )
    finally:
        factory.stop()
    data = load_config(cfg).data_dir
    submit, inbound = data / "spool" / "submit", data / "spool" / "inbound"
    cut_upload = submit / "0123456789abcdef.part"
    cut_upload.write_bytes(b"half an upload")
    orphan = inbound / "no-such-transfer.part"
    orphan.write_bytes(b"x" * 1000)
    kept = inbound / "h2-kept-00001.part"
    os.chmod(kept, 0o644)
    dead_writer = subprocess.Popen(["true"])
    dead_writer.wait()
    shard = load_config(cfg).storage.path / "75" / "16"
    cut_link = shard / f".tmp-{dead_writer.pid}-link-139627264386752"
    cut_link.parent.mkdir(parents=True, exist_ok=True)
    cut_link.write_bytes(b"a study object linked in when the node was killed")
    factory = InProcessNode(cfg)
    try:
        assert not cut_upload.exists() and not orphan.exists() and not cut_link.exists()
        assert kept.stat().st_size == CHUNK and stat.S_IMODE(kept.stat().st_mode) == 0o600
        with hostile(federation, factory) as h2:
            assert h2.offer("h2-kept-00001", header_of(payload)).resume_offset == CHUNK
    finally:
        factory.stop()


def test_upload_spool_file_is_created_0600(pair: Pair, tmp_path: Path) -> None:
    hospital, _ = pair
    submit = hospital.node.exchange.spool_dir
    seen: list[int] = []

    def messages() -> Iterator[exchange_pb2.SubmitMessage]:
        yield exchange_pb2.SubmitMessage(
            start=exchange_pb2.SubmitStart(name="cut.bin", media_type="application/octet-stream")
        )
        data = os.urandom(CHUNK)
        yield exchange_pb2.SubmitMessage(
            chunk=common_pb2.Chunk(offset=0, data=data, sha256=hashlib.sha256(data).digest())
        )
        parts = wait_for(lambda: list(submit.glob("*.part")), timeout=30, what="the upload spool")
        seen.extend(stat.S_IMODE(p.stat().st_mode) for p in parts)
        yield exchange_pb2.SubmitMessage(
            chunk=common_pb2.Chunk(offset=5, data=b"x", sha256=hashlib.sha256(b"x").digest())
        )

    from gateway.rpc.channel import open_channel

    creds = hospital.node.client_credentials
    with open_channel(hospital.address, creds, peer_node_id="hospital-1") as ch:
        err = refused(lambda: exchange_pb2_grpc.ExchangeStub(ch).Submit(messages(), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert seen == [0o600]
    assert list(submit.glob("*.part")) == []


# --------------------------------------------------------------------------- message limit


def test_max_message_bytes_below_8_mib_is_honoured(federation: Federation, tmp_path: Path) -> None:
    limit = 2 * 1024 * 1024
    cfg = write_config(federation, tmp_path, "factory-1", "factory")
    cfg.write_text(
        cfg.read_text().replace("[server]\n", f"[server]\nmax_message_bytes = {limit}\n", 1)
    )
    factory = InProcessNode(cfg)
    try:
        big = os.urandom(3 * 1024 * 1024)
        header = header_of(big)
        with hostile(federation, factory) as h2:
            answer = h2.offer("h2-big-00001", header)
            assert answer.max_chunk_bytes == limit - 64 * 1024
            one = transfer_pb2.PushMessage(
                chunk=common_pb2.Chunk(offset=0, data=big, sha256=hashlib.sha256(big).digest())
            )
            start = transfer_pb2.PushMessage(
                start=transfer_pb2.PushStart(transfer_id="h2-big-00001", object=header)
            )
            err = refused(lambda: h2.stub.Push(iter([start, one]), timeout=30))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # chunks within the limit are received
            h2.push("h2-big-00001", header, big)
        assert b"".join(factory.node.store.open_read(header.object_id)) == big
    finally:
        factory.stop()
    cfg.write_text(cfg.read_text().replace(str(limit), "1048576"))
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "server.max_message_bytes (1048576) must be at least transfer.chunk_bytes" in str(
        err.value
    )
