"""Signed transfer receipts.

A receipt is the exact serialized bytes of a ``yigong.v1.ReceiptBody``, an
ECDSA-SHA256 signature by the receiving node's key over those bytes, and the
receiving node's certificate. Verifying needs only the federation CA: the
certificate must be issued by it, not revoked, and name the node the receipt
says received the object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from google.protobuf.message import DecodeError

from gateway.errors import BadSignature, CertificateError, ReceiptError
from gateway.pki import TrustStore, verify_signature
from yigong.v1 import common_pb2


@dataclass(frozen=True)
class Receipt:
    """A verified receipt."""

    body: common_pb2.ReceiptBody
    signed: bytes  # serialized SignedReceipt, stored by both sides


def make_receipt(
    sign: Callable[[bytes], bytes],
    cert_pem: bytes,
    *,
    transfer_id: str,
    object_id: str,
    size: int,
    sha256: str,
    sender_node: str,
    receiver_node: str,
    started_at: str,
    completed_at: str,
    name: str,
    case_id: str,
    facts: Mapping[str, str] | None = None,
) -> bytes:
    """Build and sign a receipt; returns the serialized SignedReceipt."""
    body = common_pb2.ReceiptBody(
        transfer_id=transfer_id,
        object_id=object_id,
        size=size,
        sha256=sha256,
        sender_node=sender_node,
        receiver_node=receiver_node,
        started_at=started_at,
        completed_at=completed_at,
        name=name,
        case_id=case_id,
        facts=dict(facts or {}),
    )
    body_bytes = body.SerializeToString(deterministic=True)
    signed = common_pb2.SignedReceipt(
        body=body_bytes, signature=sign(body_bytes), signer_certificate=cert_pem
    )
    return signed.SerializeToString(deterministic=True)


def check_receiver_signed(
    what: str, signer_pem: bytes, body: bytes, signature: bytes, receiver: str, trust: TrustStore
) -> None:
    """``body`` is signed by the node it names as ``receiver``, with a certificate of the
    federation (a receipt or a batch's manifest receipt); else ReceiptError about ``what``."""
    try:
        cert = x509.load_pem_x509_certificate(signer_pem)
    except ValueError as exc:
        raise ReceiptError(f"{what}: signer certificate is not PEM: {exc}") from exc
    try:
        signer = trust.verify(cert)
        verify_signature(cert, body, signature)
    except CertificateError as exc:
        raise ReceiptError(f"{what}: signer certificate refused: {exc}") from exc
    except BadSignature as exc:
        raise ReceiptError(f"{what}: signature does not verify: {exc}") from exc
    if not signer.is_node or signer.subject_id != receiver:
        raise ReceiptError(f"{what}: signed by {signer.label()}, but names receiver {receiver!r}")


def verify_receipt(
    signed_bytes: bytes,
    trust: TrustStore,
    *,
    expect_receiver: str | None = None,
    expect_sender: str | None = None,
    expect_sha256: str | None = None,
    expect_size: int | None = None,
    expect_transfer_id: str | None = None,
) -> Receipt:
    """Check a receipt's signature, signer and content; raise ReceiptError on any mismatch."""
    try:
        signed = common_pb2.SignedReceipt.FromString(signed_bytes)
        body = common_pb2.ReceiptBody.FromString(signed.body)
    except DecodeError as exc:
        raise ReceiptError(f"receipt does not decode: {exc}") from exc
    what = f"receipt for transfer {body.transfer_id or '?'}"
    check_receiver_signed(
        what, signed.signer_certificate, signed.body, signed.signature, body.receiver_node, trust
    )
    checks = (
        ("receiver", expect_receiver, body.receiver_node),
        ("sender", expect_sender, body.sender_node),
        ("SHA-256", expect_sha256, body.sha256),
        ("size", expect_size, body.size),
        ("transfer id", expect_transfer_id, body.transfer_id),
    )
    for label, expected, actual in checks:
        if expected is not None and expected != actual:
            raise ReceiptError(f"{what}: {label} is {actual!r}, expected {expected!r}")
    if body.sha256 != body.object_id:
        raise ReceiptError(f"{what}: object id and SHA-256 disagree")
    return Receipt(body=body, signed=signed_bytes)
