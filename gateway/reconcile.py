"""Cross-node reconciliation of shared transfers.

Both ends of every transfer keep the same signed receipt — or, for the objects
of a batch (a study sent as one exchange), both ends keep the batch's one signed
manifest receipt. Given this node's records of the transfers and batches it
shares with one peer and the peer's records of the same (fetched over the peer's
query endpoint), :func:`reconcile` reports every transfer one side has and the
other lacks, every pair whose digest, size or receipt bytes disagree or whose
receipt does not verify, and every batch whose manifest receipt differs between
the sides, does not verify, or does not list exactly the batch's transfers with
the digests and sizes on record here.

A transfer still in progress (queued, sending, receiving) on either side is
reported as ``in_progress``, not as a discrepancy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import ReceiptError
from gateway.pki import TrustStore
from gateway.transfer.manifest import check_manifest, verify_manifest
from gateway.transfer.receipts import verify_receipt

OPPOSITE = {"outbound": "inbound", "inbound": "outbound"}
IN_PROGRESS = frozenset({"queued", "sending", "receiving"})


@dataclass(frozen=True)
class SharedTransfer:
    """One side's record of a transfer, as either catalog or query endpoint shows it."""

    transfer_id: str
    direction: str
    peer_node: str
    object_id: str
    size: int
    status: str
    receipt: bytes | None
    batch_id: str = ""  # set: the transfer is covered by its batch's manifest receipt


@dataclass(frozen=True)
class SharedBatch:
    """One side's record of a batch (its transfers carry its id)."""

    batch_id: str
    direction: str
    peer_node: str
    status: str
    receipt: bytes | None  # the signed manifest receipt, once done


@dataclass(frozen=True)
class Finding:
    # missing_at_peer | missing_here | direction | digest | size | status | receipt |
    # signature | manifest | in_progress | audit_log
    kind: str
    transfer_id: str  # for a manifest finding: the batch id
    detail: str

    @property
    def is_discrepancy(self) -> bool:
        return self.kind != "in_progress"


def reconcile(
    node_id: str,
    peer: str,
    ours: Iterable[SharedTransfer],
    theirs: Iterable[SharedTransfer],
    trust: TrustStore,
    ours_batches: Iterable[SharedBatch] = (),
    theirs_batches: Iterable[SharedBatch] = (),
) -> list[Finding]:
    """Compare both sides' records of the transfers (and the batches they were sent in)
    between ``node_id`` and ``peer``."""
    mine = {t.transfer_id: t for t in ours if t.peer_node == peer}
    other = {t.transfer_id: t for t in theirs if t.peer_node == node_id}
    findings = _transfers(node_id, peer, mine, other, trust)
    findings += _batches(node_id, peer, mine, ours_batches, theirs_batches, trust)
    return findings


def _transfers(
    node_id: str,
    peer: str,
    mine: dict[str, SharedTransfer],
    other: dict[str, SharedTransfer],
    trust: TrustStore,
) -> list[Finding]:
    findings: list[Finding] = []
    for tid in sorted(set(mine) | set(other)):
        a, b = mine.get(tid), other.get(tid)
        if a is None or b is None:
            present = a or b
            assert present is not None
            if present.status in IN_PROGRESS:
                findings.append(Finding("in_progress", tid, f"{present.status} on one side only"))
            elif a is None:
                findings.append(
                    Finding(
                        "missing_here",
                        tid,
                        f"{peer} has it ({b.status if b else ''}); {node_id} has no record",
                    )
                )
            else:
                findings.append(
                    Finding(
                        "missing_at_peer",
                        tid,
                        f"{node_id} has it ({a.status}); {peer} has no record",
                    )
                )
            continue
        if b.direction != OPPOSITE.get(a.direction):
            findings.append(Finding("direction", tid, f"both sides say {a.direction}"))
        if a.object_id != b.object_id:
            findings.append(
                Finding("digest", tid, f"SHA-256 {a.object_id} here, {b.object_id} at {peer}")
            )
        if a.size != b.size:
            findings.append(Finding("size", tid, f"{a.size} bytes here, {b.size} at {peer}"))
        if a.status in IN_PROGRESS or b.status in IN_PROGRESS:
            findings.append(Finding("in_progress", tid, f"{a.status} here, {b.status} at {peer}"))
            continue
        if a.status != b.status:
            findings.append(Finding("status", tid, f"{a.status} here, {b.status} at {peer}"))
        if a.batch_id or b.batch_id:
            if a.batch_id != b.batch_id:
                findings.append(
                    Finding("receipt", tid, f"batch {a.batch_id!r} here, {b.batch_id!r} at {peer}")
                )
            continue  # covered by the batch's one manifest receipt, not a receipt of its own
        if a.receipt != b.receipt:
            findings.append(Finding("receipt", tid, "the two sides hold different receipts"))
        receiver = a.peer_node if a.direction == "outbound" else node_id
        for side, record in (("here", a), (f"at {peer}", b)):
            if record.receipt is None:
                if record.status == "done":
                    findings.append(Finding("receipt", tid, f"done {side} but no receipt"))
                continue
            try:
                verify_receipt(
                    record.receipt,
                    trust,
                    expect_receiver=receiver,
                    expect_sha256=record.object_id,
                    expect_transfer_id=tid,
                )
            except ReceiptError as exc:
                findings.append(Finding("signature", tid, f"receipt {side}: {exc}"))
    return findings


def _batches(
    node_id: str,
    peer: str,
    mine: dict[str, SharedTransfer],
    ours: Iterable[SharedBatch],
    theirs: Iterable[SharedBatch],
    trust: TrustStore,
) -> list[Finding]:
    """Every batch with ``peer``: the same manifest receipt on both sides, signed by the
    batch's receiver, listing exactly the transfers recorded here in that batch with
    their SHA-256 and size."""
    here = {b.batch_id: b for b in ours if b.peer_node == peer}
    there = {b.batch_id: b for b in theirs if b.peer_node == node_id}
    members: dict[str, dict[str, tuple[str, int]]] = {}
    for t in mine.values():
        if t.batch_id:
            members.setdefault(t.batch_id, {})[t.transfer_id] = (t.object_id, t.size)
    findings: list[Finding] = []
    for bid in sorted(set(here) | set(there) | set(members)):
        a, b = here.get(bid), there.get(bid)
        if a is None or b is None or a.status != "done" or b.status != "done":
            states = [f"{x.status} {side}" if x else f"no record {side}"
                      for x, side in ((a, "here"), (b, f"at {peer}"))]  # fmt: skip
            kind = "in_progress" if any(x and x.status != "done" for x in (a, b)) else "manifest"
            findings.append(Finding(kind, bid, f"batch: {', '.join(states)}"))
            continue
        if a.receipt is None or b.receipt is None:
            side = "here" if a.receipt is None else f"at {peer}"
            findings.append(Finding("manifest", bid, f"batch done {side} but no manifest receipt"))
            continue
        if a.receipt != b.receipt:
            findings.append(
                Finding("manifest", bid, "the two sides hold different manifest receipts")
            )
        outbound = a.direction == "outbound"
        try:
            manifest = verify_manifest(
                a.receipt,
                trust,
                expect_receiver=peer if outbound else node_id,
                expect_sender=node_id if outbound else peer,
                expect_batch_id=bid,
            )
        except ReceiptError as exc:
            findings.append(Finding("signature", bid, f"manifest receipt here: {exc}"))
            continue
        try:
            check_manifest(manifest, members.get(bid, {}))
        except ReceiptError as exc:
            findings.append(Finding("manifest", bid, f"against the transfers here: {exc}"))
    return findings
