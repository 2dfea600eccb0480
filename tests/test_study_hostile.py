"""A hostile receiver's receipts: the hospital refuses them, records why, retries, and
marks nothing done.

The receiver is the real factory (its receiver, store and catalog do the work) behind a
second real gRPC server with the factory's own certificate and key (mTLS, the federation
PKI of the tests): see :mod:`tests.hostile_receiver`. It alters what it signs — and
re-signs it with the factory's real key, so only the content is wrong — or answers with
a signature that does not verify. The hospital is a real node whose study came in
through its DICOM SCP and was confirmed by a clinician.

For each alteration the test asserts on the hospital's transfer (and batch) statuses,
its transfer history, its audit log and the error texts: nothing is done, the failure
names what was wrong, the sender tries again; once the receiver turns honest the same
transfers complete with receipts both sides hold byte for byte (nothing was lost or
stuck by the refusals).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from gateway.catalog import TransferRecord
from hospital_node.role import HospitalRole
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.dicom_factory import StudyInfo, ct_series
from tests.hostile_receiver import HostileReceiver, hostile_factory_config, resign
from yigong.v1 import common_pb2, hospital_pb2, hospital_pb2_grpc

INSTANCES = 4
CASE = "CASE-HOSTILE-01"


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
    hostile = HostileReceiver(factory, switch, {"Push", "Offer"})
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


def body_of(signed: common_pb2.SignedReceipt) -> common_pb2.ReceiptBody:
    return common_pb2.ReceiptBody.FromString(signed.body)


def resigned(node: Any, change: Callable[[common_pb2.ReceiptBody], None]) -> Callable[[Any], Any]:
    """Alter a per-object receipt's body and sign it again with the factory's real key."""

    def alter(reply: Any) -> Any:
        signed = reply if isinstance(reply, common_pb2.SignedReceipt) else reply.receipt
        if not signed.body:
            return reply  # an Offer without a receipt: nothing to alter
        body = body_of(signed)
        change(body)
        new = common_pb2.SignedReceipt.FromString(
            resign(node, body.SerializeToString(deterministic=True))
        )
        if isinstance(reply, common_pb2.SignedReceipt):
            return new
        reply.receipt.CopyFrom(new)
        return reply

    return alter


def bad_signature(node: Any) -> Callable[[Any], Any]:
    def alter(reply: Any) -> Any:
        signed = reply if isinstance(reply, common_pb2.SignedReceipt) else reply.receipt
        if not signed.body:
            return reply
        new = common_pb2.SignedReceipt.FromString(resign(node, signed.body, bad_signature=True))
        if isinstance(reply, common_pb2.SignedReceipt):
            return new
        reply.receipt.CopyFrom(new)
        return reply

    return alter


def _wait_attempts(s: Setup, tids: list[str], attempts: int) -> list[TransferRecord]:
    def tried() -> list[TransferRecord] | None:
        recs = s.outbound(tids)
        return recs if all(r.attempts >= attempts for r in recs) else None

    return wait_for(tried, timeout=60, what=f"{attempts} attempts of every transfer")  # type: ignore[no-any-return]


def _honest_again_and_delivered(s: Setup, tids: list[str]) -> None:
    s.switch.alter = None
    wait_for(
        lambda: all(r.status == "done" for r in s.outbound(tids)),
        timeout=60,
        what="delivery once the receiver is honest",
    )
    for r in s.outbound(tids):
        inbound = s.factory.node.catalog.get_transfer(r.transfer_id, "inbound")
        assert r.receipt and inbound.receipt == r.receipt


# --- per-object receipts (the exchange as it is per instance) ------------------------------


@pytest.mark.parametrize(
    ("what", "change", "error"),
    [
        ("sha256", lambda b: setattr(b, "sha256", "0" * 64), "SHA-256 is"),
        ("size", lambda b: setattr(b, "size", b.size + 1), "size is"),
        ("transfer id", lambda b: setattr(b, "transfer_id", "f" * 32), "transfer id is"),
        ("bad signature", None, "signature does not verify"),
    ],
)
def test_hostile_per_object_receipt_is_refused_retried_and_nothing_done(
    setup: Setup, what: str, change: Callable[[common_pb2.ReceiptBody], None] | None, error: str
) -> None:
    """A receipt re-signed by the factory's real key with a wrong SHA-256, size or
    transfer id, or one whose signature does not verify: refused and retried, not done.

    The failure is in each transfer's last error, its history and the audit log
    (``transfer.failed``, no ``transfer.completed``); honest again, it completes."""
    s = setup
    node = s.factory.node
    s.switch.alter = bad_signature(node) if change is None else resigned(node, change)
    tids = ingest_and_confirm(s)
    recs = _wait_attempts(s, tids, 2)  # refused, then tried again
    for r in recs:
        assert r.status in {"queued", "sending"} and r.receipt is None, (what, r)
    for r in s.outbound(tids):
        assert r.status != "done"
        assert error in r.last_error and "receipt for transfer" in r.last_error
        assert r.transfer_id in r.last_error  # the message names the transfer
        kinds = [h.kind for h in s.hospital.node.catalog.history(r.transfer_id, "outbound")]
        assert kinds.count("attempt_failed") >= 2 and "done" not in kinds
    audit = s.hospital.node.audit
    for tid in tids:
        assert not audit.events(event="transfer.completed", transfer_id=tid)
        failed = audit.events(event="transfer.failed", transfer_id=tid)
        assert len(failed) >= 2 and {e.details["error"] for e in failed} == {"ReceiptError"}
    assert s.switch.seen >= 2 * len(tids)
    _honest_again_and_delivered(s, tids)


def test_hostile_per_object_receipt_with_altered_facts_is_refused_as_a_security_alert(
    setup: Setup,
) -> None:
    """Re-signed with the pixel hash altered: the facts disagree with what the hospital
    released, so the send is refused for good (``failed``, ``security.alert``)."""
    s = setup

    def wrong_pixels(body: common_pb2.ReceiptBody) -> None:
        body.facts["dicom.pixel_sha256"] = "0" * 64

    s.switch.alter = resigned(s.factory.node, wrong_pixels)
    tids = ingest_and_confirm(s)
    wait_for(
        lambda: all(r.status == "failed" for r in s.outbound(tids)),
        timeout=60,
        what="every transfer refused",
    )
    for r in s.outbound(tids):
        assert "dicom.pixel_sha256" in r.last_error and r.receipt is None
    alerts = s.hospital.node.audit.events(event="security.alert")
    assert {e.transfer_id for e in alerts} >= set(tids)
    assert all(not s.hospital.node.audit.events(event="transfer.completed", transfer_id=t)
               for t in tids)  # fmt: skip
