"""A hostile receiver's receipts: the hospital refuses them, records why, retries, and
marks nothing done.

The receiver is the real factory (its receiver, store and catalog do the work) behind a
second real gRPC server with the factory's own certificate and key (mTLS, the federation
PKI of the tests): see :mod:`tests.hostile_receiver`. It alters what it signs — and
re-signs it with the factory's real key, so only the content is wrong — or answers with
a signature that does not verify. The hospital is a real node whose study came in
through its DICOM SCP and was confirmed by a clinician, so its instances leave as one
batch answered by one manifest receipt; the manifest is given a missing entry, an extra
entry, an altered entry (SHA-256, size, or format facts), a stale Merkle root or a bad
signature. Single objects (a submitted PDF) get their own receipt altered likewise.
Altered facts are refused for good (a security alert, as for single objects); every
other alteration is refused and retried.

For each alteration the test asserts on the hospital's transfer (and batch) statuses,
its transfer history, its audit log and the error texts: nothing is done, the failure
names what was wrong, the sender tries again; once the receiver turns honest the same
transfers complete with receipts both sides hold byte for byte (nothing was lost or
stuck by the refusals).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.catalog import BatchRecord, TransferRecord
from gateway.transfer.manifest import merkle_root
from hospital_node.release import BATCH_MIN_INSTANCES
from hospital_node.role import HospitalRole
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.dicom_factory import StudyInfo, ct_series
from tests.hostile_receiver import (
    HostileReceiver,
    hostile_factory_config,
    resign,
    resign_manifest,
)
from tests.outbound_files import clean_pdf
from yigong.v1 import common_pb2, hospital_pb2, hospital_pb2_grpc, transfer_pb2

INSTANCES = max(10, BATCH_MIN_INSTANCES)  # a study large enough to go as one batch
CASE = "CASE-HOSTILE-01"
TRANSFER_RPCS = {m.name for m in transfer_pb2.DESCRIPTOR.services_by_name["Transfer"].methods}
BATCH_EXCHANGE = {"BatchStatus", "PushBatch"} <= TRANSFER_RPCS
NO_BATCH_EXCHANGE = (
    "the manifest receipt needs the study-as-one-exchange (issue #10 item 1): this tree's "
    f"Transfer service has only {sorted(TRANSFER_RPCS)}"
)


@dataclass
class Switch:
    """What the hostile receiver does now (``None``: honest)."""

    alter: Callable[[Any], Any] | None = None
    seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, method: str, reply: Any) -> Any:
        with self.lock:
            alter = self.alter
            if alter is not None:
                self.seen += 1
        return reply if alter is None else alter(reply)


@dataclass
class Setup:
    hospital: InProcessNode
    factory: InProcessNode
    hostile: HostileReceiver
    switch: Switch
    federation: Federation

    @property
    def role(self) -> HospitalRole:
        hooks = self.hospital.node.hooks
        assert isinstance(hooks, HospitalRole)
        return hooks

    def outbound(self, transfer_ids: list[str]) -> list[TransferRecord]:
        return [self.hospital.node.catalog.get_transfer(t, "outbound") for t in transfer_ids]


@pytest.fixture
def setup(federation: Federation, tmp_path: Path) -> Iterator[Setup]:
    factory = InProcessNode(hostile_factory_config(federation, tmp_path))
    switch = Switch()
    hostile = HostileReceiver(factory, switch, {"Push", "Offer", "PushBatch", "BatchStatus"})
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital",
            peers={"factory-1": hostile.address},
            extra="[transfer]\nretry_initial_seconds = 0.1\nretry_max_seconds = 0.3",
        )
    )  # fmt: skip
    try:
        yield Setup(hospital, factory, hostile, switch, federation)
    finally:
        hospital.stop()
        hostile.stop()
        factory.stop()


def ingest_and_confirm(s: Setup, n: int = INSTANCES) -> list[str]:
    """C-STORE a study to the hospital, end its quiet period, a clinician confirms it."""
    datasets = list(ct_series(n, rows=16, cols=16, study=StudyInfo()))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(str(datasets[0].SOPClassUID), ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", s.role.dicom_port, ae_title="YIGONG")
    assert assoc.is_established
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            assert status and status.Status == 0x0000, status
    finally:
        assoc.release()
    s.hospital.settle()
    study_uid = str(datasets[0].StudyInstanceUID)
    assert s.role.studies.tick(datetime.now(UTC), 0.0) == [study_uid]
    clinician = s.federation.creds(s.federation.person("dr-h", "clinician", "hospital-1"))
    stub = hospital_pb2_grpc.HospitalStub(s.hospital.client(clinician).channel)
    reply = stub.ConfirmStudy(
        hospital_pb2.ConfirmStudyRequest(
            study_uid=study_uid, case_id=CASE, destination="factory-1"
        ),
        timeout=60,
    )
    assert len(reply.transfer_ids) == n
    return list(reply.transfer_ids)


# --- what the hostile receiver does ------------------------------------------------------


def per_object(
    node: Any, change: Callable[[common_pb2.ReceiptBody], None] | None, *, bad: bool = False
) -> Callable[[Any], Any]:
    """Alter a single object's receipt (a Push reply, or an Offer's for a held object) and
    sign it again with the factory's real key (``bad``: a signature that does not verify)."""

    def alter(reply: Any) -> Any:
        if isinstance(reply, common_pb2.SignedReceipt):
            signed = reply
        elif isinstance(reply, transfer_pb2.OfferResponse) and reply.HasField("receipt"):
            signed = reply.receipt
        else:
            return reply
        body = common_pb2.ReceiptBody.FromString(signed.body)
        if change is not None:
            change(body)
        signed.CopyFrom(
            common_pb2.SignedReceipt.FromString(
                resign(node, body.SerializeToString(deterministic=True), bad_signature=bad)
            )
        )
        return reply

    return alter


def manifest(
    node: Any, change: Callable[[transfer_pb2.BatchManifest], None] | None, *, bad: bool = False
) -> Callable[[Any], Any]:
    """Alter a batch's manifest receipt (the last PushBatch answer, or BatchStatus's for a
    batch completed before) and sign it again with the factory's real key."""

    def alter(reply: Any) -> Any:
        if isinstance(reply, transfer_pb2.BatchAck) and reply.WhichOneof("kind") == "receipt":
            signed = reply.receipt
        elif isinstance(reply, transfer_pb2.BatchStatusResponse) and reply.HasField("receipt"):
            signed = reply.receipt
        else:
            return reply
        body = transfer_pb2.BatchManifest.FromString(signed.body)
        if change is not None:
            change(body)
        signed.CopyFrom(resign_manifest(node, body, bad_signature=bad))
        return reply

    return alter


def consistent(body: transfer_pb2.BatchManifest) -> None:
    """Entries sorted, count, total and Merkle root recomputed: only the content is wrong."""
    entries = sorted(body.entries, key=lambda e: e.transfer_id)
    del body.entries[:]
    body.entries.extend(entries)
    body.count = len(entries)
    body.total_bytes = sum(e.size for e in entries)
    body.merkle_root = merkle_root(body.entries)


def drop_entry(body: transfer_pb2.BatchManifest) -> None:
    del body.entries[len(body.entries) // 2]
    consistent(body)


def add_entry(body: transfer_pb2.BatchManifest) -> None:
    extra = body.entries.add()
    extra.CopyFrom(body.entries[0])
    extra.transfer_id = "f" * 32  # an object this sender never sent
    consistent(body)


def alter_sha256(body: transfer_pb2.BatchManifest) -> None:
    body.entries[0].sha256 = body.entries[0].object_id = "0" * 64
    consistent(body)


def alter_size(body: transfer_pb2.BatchManifest) -> None:
    body.entries[-1].size += 1
    consistent(body)


def drop_entry_keep_root(body: transfer_pb2.BatchManifest) -> None:
    del body.entries[0]
    body.count = len(body.entries)  # the Merkle root still covers the dropped entry


def alter_pixels(body: transfer_pb2.BatchManifest) -> None:
    body.entries[0].facts["dicom.pixel_sha256"] = "0" * 64
    consistent(body)


# --- checks ---------------------------------------------------------------------------------


def _outbound_batch(s: Setup) -> BatchRecord:
    (batch,) = s.hospital.node.catalog.list_batches(direction="outbound")
    return batch


def _wait_batch_attempts(s: Setup, attempts: int) -> BatchRecord:
    def tried() -> BatchRecord | None:
        batches = s.hospital.node.catalog.list_batches(direction="outbound")
        return batches[0] if batches and batches[0].attempts >= attempts else None

    got: BatchRecord = wait_for(tried, timeout=60, what=f"{attempts} attempts of the batch")
    return got


def _honest_again_and_delivered(s: Setup, tids: list[str]) -> None:
    """The receiver turns honest: the same transfers complete, with receipts both nodes
    hold byte for byte (the refusals lost or stuck nothing)."""
    s.switch.alter = None
    wait_for(
        lambda: all(r.status == "done" for r in s.outbound(tids)),
        timeout=60,
        what="delivery once the receiver is honest",
    )
    catalog = s.factory.node.catalog
    for r in s.outbound(tids):
        inbound = catalog.get_transfer(r.transfer_id, "inbound")
        assert inbound.status == "done" and inbound.object_id == r.object_id
        if not r.batch_id:
            assert r.receipt and inbound.receipt == r.receipt
    for batch_id in {r.batch_id for r in s.outbound(tids)} - {""}:
        out = s.hospital.node.catalog.get_batch(batch_id, "outbound")
        assert out.status == "done" and out.receipt
        assert catalog.get_batch(batch_id, "inbound").receipt == out.receipt


# --- the study's manifest receipt -----------------------------------------------------------


RETRIED = [
    ("missing entry", drop_entry, False, "1 object(s) missing"),
    ("extra entry", add_entry, False, "1 object(s) never sent (e.g. " + "f" * 32),
    ("altered SHA-256", alter_sha256, False, "entr(y/ies) with another SHA-256 or size"),
    ("altered size", alter_size, False, "entr(y/ies) with another SHA-256 or size"),
    ("stale Merkle root", drop_entry_keep_root, False, "Merkle root does not match"),
    ("bad signature", None, True, "signature does not verify"),
]


@pytest.mark.parametrize(("what", "change", "bad", "error"), RETRIED, ids=[r[0] for r in RETRIED])
def test_hostile_manifest_receipt_is_refused_retried_and_nothing_marked_done(
    setup: Setup,
    what: str,
    change: Callable[[transfer_pb2.BatchManifest], None] | None,
    bad: bool,
    error: str,
) -> None:
    """A study's manifest receipt with an entry missing, an extra entry, an entry with
    another SHA-256 or size (re-signed with the factory's real key, Merkle root and count
    made consistent), a stale Merkle root, or a bad signature: refused, retried, not done.

    The batch stays queued with the reason as its last error, every object in it stays
    not done without a receipt, the audit log has a ``transfer.batch.failed``
    (ReceiptError) per attempt and no completion; honest again, the study completes."""
    if not BATCH_EXCHANGE:
        pytest.skip(NO_BATCH_EXCHANGE)
    s = setup
    s.switch.alter = manifest(s.factory.node, change, bad=bad)
    tids = ingest_and_confirm(s)
    batch = _wait_batch_attempts(s, 2)  # refused, then tried again
    assert batch.status in {"queued", "sending"} and batch.receipt is None, (what, batch)
    assert error in batch.last_error, (what, batch.last_error)
    assert f"manifest receipt for batch {batch.batch_id}" in batch.last_error
    for r in s.outbound(tids):
        assert r.batch_id == batch.batch_id
        assert r.status not in {"done", "failed"} and r.receipt is None, r
    audit = s.hospital.node.audit
    failed = [
        e
        for e in audit.events(event="transfer.batch.failed")
        if e.details["batch_id"] == batch.batch_id
    ]
    assert len(failed) >= 2 and {e.details["error"] for e in failed} == {"ReceiptError"}
    assert not audit.events(event="transfer.batch.completed")
    for tid in tids:
        assert not audit.events(event="transfer.completed", transfer_id=tid)
    assert s.switch.seen >= 2
    _honest_again_and_delivered(s, tids)
    assert not s.hospital.node.audit.events(event="security.alert")


def test_hostile_manifest_with_altered_facts_is_refused_for_good_as_a_security_alert(
    setup: Setup,
) -> None:
    """An entry whose pixel hash differs from what the hospital released (re-signed, root
    consistent): the facts disagree, so the batch is refused for good — batch and every
    object ``failed``, a ``security.alert``, nothing done, not retried."""
    if not BATCH_EXCHANGE:
        pytest.skip(NO_BATCH_EXCHANGE)
    s = setup
    s.switch.alter = manifest(s.factory.node, alter_pixels)
    tids = ingest_and_confirm(s)
    wait_for(lambda: _outbound_batch(s).status == "failed", timeout=60, what="the batch refused")
    batch = _outbound_batch(s)
    assert "dicom.pixel_sha256" in batch.last_error and batch.receipt is None
    for r in s.outbound(tids):
        assert r.status == "failed" and r.receipt is None
        assert f"batch {batch.batch_id} refused" in r.last_error
    audit = s.hospital.node.audit

    def alerts() -> list[str]:  # audited right after the batch is marked failed: poll
        return [e.details["reason"] for e in audit.events(event="security.alert")
                if e.details.get("batch_id") == batch.batch_id]  # fmt: skip

    wait_for(alerts, timeout=15, what="the security alert")
    assert alerts() == ["FactsDisagree"]
    assert not audit.events(event="transfer.batch.completed")
    assert all(not audit.events(event="transfer.completed", transfer_id=t) for t in tids)
    seen = s.switch.seen
    time.sleep(1.0)  # > retry_max_seconds: a retry would have asked again by now
    assert _outbound_batch(s).attempts == batch.attempts and s.switch.seen == seen


# --- single objects (design files, records, scans): one receipt each -------------------------


def submit_pdf(s: Setup, tmp_path: Path) -> list[str]:
    src = tmp_path / "scan.pdf"
    src.write_bytes(clean_pdf(os.urandom(200_000)))  # what a hospital may send
    with s.hospital.self_client() as client:
        return [t.transfer_id for t in client.submit(src, ["factory-1"], case_id=CASE).queued]


@pytest.mark.parametrize(
    ("what", "change", "error"),
    [
        ("sha256", lambda b: setattr(b, "sha256", "0" * 64), "SHA-256 is"),
        ("size", lambda b: setattr(b, "size", b.size + 1), "size is"),
        ("transfer id", lambda b: setattr(b, "transfer_id", "f" * 32), "transfer id is"),
        ("bad signature", None, "signature does not verify"),
    ],
)
def test_hostile_single_object_receipt_is_refused_retried_and_nothing_done(
    setup: Setup,
    tmp_path: Path,
    what: str,
    change: Callable[[common_pb2.ReceiptBody], None] | None,
    error: str,
) -> None:
    """A single object's receipt re-signed by the factory's real key with a wrong
    SHA-256, size or transfer id, or with a signature that does not verify: refused and
    retried, not done; in the transfer's last error, its history and the audit log
    (``transfer.failed``, no ``transfer.completed``); honest again, it completes."""
    s = setup
    s.switch.alter = per_object(s.factory.node, change, bad=change is None)
    (tid,) = submit_pdf(s, tmp_path)

    def tried() -> TransferRecord | None:
        (r,) = s.outbound([tid])
        return r if r.attempts >= 2 else None

    r = wait_for(tried, timeout=60, what="2 attempts")
    assert r.status in {"queued", "sending"} and r.receipt is None, (what, r)
    (r,) = s.outbound([tid])
    assert r.status != "done"
    assert error in r.last_error and "receipt for transfer" in r.last_error
    assert tid in r.last_error  # the message names the transfer
    kinds = [h.kind for h in s.hospital.node.catalog.history(tid, "outbound")]
    assert kinds.count("attempt_failed") >= 2 and "done" not in kinds
    audit = s.hospital.node.audit
    assert not audit.events(event="transfer.completed", transfer_id=tid)
    failed = audit.events(event="transfer.failed", transfer_id=tid)
    assert len(failed) >= 2 and {e.details["error"] for e in failed} == {"ReceiptError"}
    _honest_again_and_delivered(s, [tid])
