"""Signed manifest receipts: one receipt over every object of a batch.

The receiver builds the manifest from its own catalog at the end of a batch:
every object's transfer id, object id, size, SHA-256 and format facts, sorted
by transfer id, with a Merkle root over the entries, and signs it with its
node key. The sender checks the signature and signer, then compares every
entry with what it sent (:func:`check_manifest`): a missing, extra or altered
entry refuses the whole receipt.

Merkle tree: leaf = SHA-256(0x00 || entry bytes), inner node = SHA-256(0x01 ||
left || right), an odd node is carried up unchanged; the root of no entries is
SHA-256 of the empty string. Entry bytes are the deterministic serialization
of the ``ManifestEntry``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from gateway.errors import ReceiptError
from gateway.pki import TrustStore
from gateway.transfer.receipts import check_receiver_signed
from yigong.v1 import transfer_pb2


@dataclass(frozen=True)
class Entry:
    """One object of a batch, as a manifest lists it."""

    transfer_id: str
    object_id: str
    size: int
    facts: Mapping[str, str]

    def to_pb(self) -> transfer_pb2.ManifestEntry:
        return transfer_pb2.ManifestEntry(
            transfer_id=self.transfer_id,
            object_id=self.object_id,
            size=self.size,
            sha256=self.object_id,
            facts=dict(self.facts),
        )


@dataclass(frozen=True)
class Manifest:
    """A verified manifest receipt."""

    body: transfer_pb2.BatchManifest
    signed: bytes  # serialized SignedManifest, stored by both sides


def merkle_root(entries: Iterable[transfer_pb2.ManifestEntry]) -> str:
    level = [
        hashlib.sha256(b"\x00" + e.SerializeToString(deterministic=True)).digest() for e in entries
    ]
    if not level:
        return hashlib.sha256(b"").hexdigest()
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0].hex()


def make_manifest(
    sign: Callable[[bytes], bytes],
    cert_pem: bytes,
    *,
    batch_id: str,
    sender_node: str,
    receiver_node: str,
    case_id: str,
    ref: str,
    completed_at: str,
    entries: Iterable[Entry],
) -> tuple[bytes, str]:
    """Build and sign a manifest: (serialized SignedManifest, Merkle root)."""
    pbs = sorted((e.to_pb() for e in entries), key=lambda e: e.transfer_id)
    root = merkle_root(pbs)
    body = transfer_pb2.BatchManifest(
        batch_id=batch_id,
        sender_node=sender_node,
        receiver_node=receiver_node,
        case_id=case_id,
        ref=ref,
        count=len(pbs),
        total_bytes=sum(e.size for e in pbs),
        merkle_root=root,
        completed_at=completed_at,
        entries=pbs,
    )
    body_bytes = body.SerializeToString(deterministic=True)
    signed = transfer_pb2.SignedManifest(
        body=body_bytes, signature=sign(body_bytes), signer_certificate=cert_pem
    )
    return signed.SerializeToString(deterministic=True), root


def verify_manifest(
    signed_bytes: bytes,
    trust: TrustStore,
    *,
    expect_receiver: str,
    expect_sender: str,
    expect_batch_id: str,
) -> Manifest:
    """Check a manifest receipt's signature, signer, names and Merkle root."""
    try:
        signed = transfer_pb2.SignedManifest.FromString(signed_bytes)
        body = transfer_pb2.BatchManifest.FromString(signed.body)
    except DecodeError as exc:
        raise ReceiptError(f"manifest receipt does not decode: {exc}") from exc
    what = f"manifest receipt for batch {body.batch_id or '?'}"
    check_receiver_signed(
        what, signed.signer_certificate, signed.body, signed.signature, body.receiver_node, trust
    )
    for label, expected, actual in (
        ("receiver", expect_receiver, body.receiver_node),
        ("sender", expect_sender, body.sender_node),
        ("batch id", expect_batch_id, body.batch_id),
    ):
        if expected != actual:
            raise ReceiptError(f"{what}: {label} is {actual!r}, expected {expected!r}")
    if body.count != len(body.entries):
        raise ReceiptError(f"{what}: says {body.count} entries but lists {len(body.entries)}")
    if merkle_root(body.entries) != body.merkle_root:
        raise ReceiptError(f"{what}: the Merkle root does not match its entries")
    return Manifest(body=body, signed=signed_bytes)


def check_manifest(
    manifest: Manifest, ours: Mapping[str, tuple[str, int]]
) -> dict[str, Mapping[str, str]]:
    """Compare the manifest's entries with ``ours`` (transfer id → (SHA-256, size)).

    Returns each transfer's facts; raises ReceiptError naming every missing,
    extra or altered entry (at most a few of each)."""
    what = f"manifest receipt for batch {manifest.body.batch_id}"
    theirs = {e.transfer_id: e for e in manifest.body.entries}
    problems: list[str] = []
    if len(theirs) != len(manifest.body.entries):
        problems.append("an entry is listed twice")
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    if missing:
        problems.append(f"{len(missing)} object(s) missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} object(s) never sent (e.g. {', '.join(extra[:3])})")
    altered = [
        tid
        for tid, (sha, size) in ours.items()
        if tid in theirs
        and (theirs[tid].object_id != sha or theirs[tid].sha256 != sha or theirs[tid].size != size)
    ]
    if altered:
        problems.append(
            f"{len(altered)} entr(y/ies) with another SHA-256 or size (e.g. "
            f"{', '.join(sorted(altered)[:3])})"
        )
    if problems:
        raise ReceiptError(f"{what} does not match what was sent: {'; '.join(problems)}")
    return {tid: dict(e.facts) for tid, e in theirs.items()}
