"""What GetCase shows: the verified chain, the stage, who acts next, the exchange."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.cases.chain import RecordCheck, verify_chain
from gateway.cases.store import CaseRow, CaseStore, StoredRecord
from gateway.cases.workflow import NextAction, next_actions
from gateway.catalog import Catalog
from gateway.errors import ReceiptError
from gateway.pki import TrustStore
from gateway.transfer.receipts import verify_receipt


@dataclass(frozen=True)
class RecordView:
    seq: int
    type: str
    author: str  # label: clinician:dr-li@hospital-1
    node_id: str  # the countersigning node
    time: str
    record_hash: str  # SHA-256 of the canonical envelope
    prev_hash: str
    ok: bool
    problem: str
    origin: str  # local | remote
    exchange: str  # what happened to it between the two nodes
    envelope: bytes
    record_json: str


@dataclass(frozen=True)
class CaseView:
    case: CaseRow
    stage: str
    next: tuple[NextAction, ...]
    records: tuple[RecordView, ...]
    ok: bool
    problem: str
    head_hash: str  # what the next record's prev_hash must be
    pending: int  # records from the peer waiting for an earlier one
    rejected: tuple[tuple[int, str, str, str], ...]  # (seq, hash, kind, reason): not in the chain

    @property
    def next_seq(self) -> int:
        return len(self.records)


def build_view(
    case: CaseRow, cases: CaseStore, catalog: Catalog, trust: TrustStore, peer: str
) -> CaseView:
    """Verify every stored record of ``case`` and describe it (``peer``: the other node)."""
    stored = cases.records(case.case_id)
    report = verify_chain(case, stored, trust)
    records = tuple(
        _record_view(row, check, _exchange(catalog, trust, row, check, peer))
        for row, check in zip(stored, report.checks, strict=True)
    )
    return CaseView(
        case=case,
        stage=report.state.stage,
        next=tuple(next_actions(report.state)) if report.ok else (),
        records=records,
        ok=report.ok,
        problem=report.problem,
        head_hash=records[-1].record_hash if records else report.state.head,
        pending=len(cases.pending(case.case_id)),
        rejected=tuple(cases.rejected(case.case_id)),
    )


def _record_view(row: StoredRecord, check: RecordCheck, exchange: str) -> RecordView:
    r = check.record
    return RecordView(
        seq=row.seq,
        type=r.type if r else "?",
        author=r.author.label() if r else "?",
        node_id=check.verified.envelope.node_id if check.verified else "?",
        time=r.time if r else "",
        record_hash=check.envelope_hash,
        prev_hash=r.prev_hash if r else "",
        ok=check.ok,
        problem=check.problem,
        origin=row.origin,
        exchange=exchange,
        envelope=row.envelope,
        record_json=r.canonical().decode("utf-8") if r else "",
    )


def _exchange(
    catalog: Catalog, trust: TrustStore, row: StoredRecord, check: RecordCheck, peer: str
) -> str:
    """What happened to a record between the nodes, from the transfer and its receipt."""
    if row.origin == "remote":
        return f"received from {check.verified.envelope.node_id if check.verified else peer}"
    found = catalog.list_transfers(object_id=row.envelope_hash, direction="outbound", limit=1)
    if not found:
        return f"not yet queued to {peer}"
    t = found[0]
    if t.status != "done" or not t.receipt:
        return f"{t.status} to {peer} ({t.attempts} attempts)"
    try:
        receipt = verify_receipt(
            t.receipt, trust, expect_receiver=t.peer_node, expect_sha256=t.object_id
        )
    except ReceiptError as exc:
        return f"receipt from {peer} does not verify: {exc}"
    error = receipt.body.facts.get("case.error")
    return f"refused by {peer}: {error}" if error else f"delivered to {peer} (signed receipt)"
