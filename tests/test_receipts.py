"""Receipts verify only when signed by the named receiver and matching what was sent."""

from __future__ import annotations

import pytest

from gateway import pki
from gateway.errors import ReceiptError
from gateway.transfer.receipts import make_receipt, verify_receipt
from tests.cluster import Federation
from yigong.v1 import common_pb2

SHA = "ab" * 32


def _receipt(fed: Federation, signer_node: str, receiver_node: str, **kw: object) -> bytes:
    issued = fed.node(signer_node, "factory")
    key = pki.load_private_key(issued.key_path)
    fields: dict[str, object] = dict(
        transfer_id="t-0000001",
        object_id=SHA,
        size=10,
        sha256=SHA,
        sender_node="hospital-1",
        receiver_node=receiver_node,
        started_at="2026-01-01T00:00:00+00:00",
        completed_at="2026-01-01T00:00:01+00:00",
        name="x.stl",
        case_id="c1",
    )
    fields.update(kw)
    return make_receipt(
        lambda data: pki.sign(key, data),
        issued.cert_path.read_bytes(),
        **fields,  # type: ignore[arg-type]
    )


def test_good_receipt_verifies(federation: Federation) -> None:
    trust = pki.TrustStore(federation.ca, federation.crl)
    r = verify_receipt(
        _receipt(federation, "factory-1", "factory-1"),
        trust,
        expect_receiver="factory-1",
        expect_sender="hospital-1",
        expect_sha256=SHA,
        expect_size=10,
        expect_transfer_id="t-0000001",
    )
    assert r.body.case_id == "c1"


def test_receipt_signed_by_another_node_refused(federation: Federation) -> None:
    trust = pki.TrustStore(federation.ca, federation.crl)
    forged = _receipt(federation, "factory-2", "factory-1")
    with pytest.raises(ReceiptError, match="signed by node:factory-2, but names receiver"):
        verify_receipt(forged, trust)


def test_receipt_body_altered_refused(federation: Federation) -> None:
    trust = pki.TrustStore(federation.ca, federation.crl)
    signed = common_pb2.SignedReceipt.FromString(_receipt(federation, "factory-1", "factory-1"))
    body = common_pb2.ReceiptBody.FromString(signed.body)
    body.size = 11
    signed.body = body.SerializeToString()
    with pytest.raises(ReceiptError, match="signature does not verify"):
        verify_receipt(signed.SerializeToString(), trust)


def test_receipt_digest_mismatch_refused(federation: Federation) -> None:
    trust = pki.TrustStore(federation.ca, federation.crl)
    other = "cd" * 32
    signed = _receipt(federation, "factory-1", "factory-1", object_id=other, sha256=other)
    with pytest.raises(ReceiptError, match="SHA-256 is"):
        verify_receipt(signed, trust, expect_sha256=SHA)


def test_receipt_garbage_refused(federation: Federation) -> None:
    trust = pki.TrustStore(federation.ca, federation.crl)
    with pytest.raises(ReceiptError):
        verify_receipt(b"\xff\x00garbage", trust)
