"""Records from the case's other node: verify, place in the chain, keep both equal.

Every appended record travels as an object (media type
``application/vnd.yigong.case-record+json``) over the verified transfer; on the
receiving node :func:`case_facts_hook` hands it to :func:`accept`, whose answer goes
into the signed receipt (``case.status``, ``case.seq``, ``case.record_hash`` or
``case.error``), so the sender's ``yigong case show`` can say what the peer did.

Placement rules (both nodes must end with the same chain):

- the envelope must verify (both signatures, certificates at the record's time) and
  be countersigned by the case's *other* node;
- a record already held is acknowledged again (receipts may be re-issued);
- a record that arrives before an earlier one waits in ``case_pending`` and is
  applied when the gap closes (transfers may overtake each other);
- the next record must link to the head, pass the stage gate and agree with this
  node's facts (:mod:`gateway.cases.facts`), else it is refused; a record naming a
  fact that has not arrived yet (a study, a design file) waits in ``case_pending``
  and is placed when an object of its case arrives;
- **the hospital orders the chain.** When both nodes append a record at the same seq
  concurrently (e.g. the clinical and the production design confirmation signed in
  the same second), the hospital keeps its own and refuses the factory's; the factory
  moves its own record(s) from that seq on to ``case_rejected`` (``displaced``) and
  takes the hospital's. The displaced author sees this in ``yigong case show`` and
  signs again. A node also refuses a person's new record while records from the peer
  are still pending, which makes such races rare.

Nothing here raises into the receiver: refusals are returned as facts, stored in
``case_rejected`` and audited.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from gateway import authz
from gateway.audit import CASE_RECORD
from gateway.cases.chain import Verified, verify_envelope
from gateway.cases.facts import FactsPending
from gateway.cases.records import (
    CASE_MEDIA_TYPE,
    MAX_ENVELOPE_BYTES,
    OPENED_AT,
    OPENED_BY,
    genesis_hash,
)
from gateway.cases.store import CaseRow, StoredRecord
from gateway.cases.workflow import apply, identifiers
from gateway.catalog import utcnow
from gateway.errors import PermissionDenied, PKIError, Refused, ValidationError, YigongError
from gateway.hashing import sha256_hex
from gateway.storage import ObjectStore
from gateway.transfer.model import Announce
from gateway.transfer.receiver import FactsHook

if TYPE_CHECKING:
    from gateway.cases.service import CaseService

log = logging.getLogger(__name__)

FACT_STATUS, FACT_ERROR = "case.status", "case.error"
FACT_CASE, FACT_SEQ, FACT_HASH = "case.id", "case.seq", "case.record_hash"


def accept(
    svc: CaseService, raw: bytes, labels: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Take in one envelope from the peer; returns receipt facts and never raises.

    ``labels``: the object's labels from the sender (record 0: who opened the case)."""
    digest = sha256_hex(raw)
    v: Verified | None = None
    try:
        with svc.lock:
            v = _verify(svc, raw, digest)
            status = _place(svc, v, labels or {})
            if status != "pending":
                drain(svc, v.record.case_id)
        r = v.record
        return {FACT_CASE: r.case_id, FACT_SEQ: str(r.seq), FACT_HASH: digest, FACT_STATUS: status}
    except Exception as exc:  # never raise into the receiver: the receipt carries the refusal
        if isinstance(exc, YigongError):
            reason = str(exc)
        else:
            log.exception("case record %s: internal error", digest[:16])
            reason = f"internal error ({type(exc).__name__}); see the log of node {svc.node_id}"
        _refused(svc, v, digest, raw, reason, exc)
        return {FACT_HASH: digest, FACT_STATUS: "refused", FACT_ERROR: reason[:500]}


def _refused(
    svc: CaseService, v: Verified | None, digest: str, raw: bytes, reason: str, exc: Exception
) -> None:
    case_id = v.record.case_id if v else "?"
    try:
        if v is not None:
            svc.cases.add_rejected(case_id, v.record.seq, digest, raw, reason)
        error = exc if isinstance(exc, YigongError) else YigongError(reason)
        svc.audit_refusal(v.record.author.label() if v else "unknown", case_id, "accept", error)
    except Exception:
        log.exception("case record %s: could not record its refusal", digest[:16])


def _verify(svc: CaseService, raw: bytes, digest: str) -> Verified:
    try:
        v = verify_envelope(raw, svc.trust)
    except (ValidationError, PKIError) as exc:
        raise Refused(f"case record {digest[:16]}… does not verify: {exc}") from exc
    if v.envelope.node_id == svc.node_id:
        raise Refused(
            f"case {v.record.case_id}: record {v.record.seq} is countersigned by this node; "
            "only the other node's records are taken in"
        )
    what = f"{v.record.case_id}: record {v.record.seq}"
    try:
        authz.authorize(v.node, authz.CASE_TAKE_RECORD, svc.node_self, resource=what)
    except PermissionDenied as exc:
        raise Refused(str(exc)) from exc
    return v


def _open_from_peer(
    svc: CaseService, v: Verified, labels: Mapping[str, str]
) -> CaseRow | None:
    """At a factory: the case's first record opens it here. None: wait for record 0.

    Who opened the case and when come from the hospital (record 0's labels), so both
    nodes show the same; without them (an older hospital): the hospital node, now."""
    r = v.record
    try:
        authz.authorize(v.node, authz.CASE_OPEN_FROM_PEER, svc.node_self, resource=r.case_id)
    except PermissionDenied as exc:
        raise Refused(str(exc)) from exc
    if r.seq != 0:
        return None
    hospital = v.envelope.node_id
    opened_by, opened_at = _opened(labels, hospital)
    case = CaseRow(r.case_id, hospital, svc.node_id, opened_at, opened_by)
    svc.cases.add_case(case)
    svc.audit.record(
        CASE_RECORD,
        actor=f"node:{hospital}",
        peer=hospital,
        case_id=r.case_id,
        details={"action": "opened", "manufacturer": svc.node_id},
    )
    log.info("case %s opened here by hospital %s", r.case_id, hospital)
    return case


_OPENER = re.compile(r"clinician:[a-z0-9][a-z0-9._-]{0,62}@(?P<node>[a-z0-9][a-z0-9._-]{0,62})")


def _opened(labels: Mapping[str, str], hospital: str) -> tuple[str, str]:
    """(opened by, opened at) as the hospital recorded them, if they are well formed."""
    by, at = labels.get(OPENED_BY, ""), labels.get(OPENED_AT, "")
    m = _OPENER.fullmatch(by)
    try:
        when = datetime.fromisoformat(at) if len(at) <= 40 else None
    except ValueError:
        when = None
    if m is None or m["node"] != hospital or when is None or when.tzinfo is None:
        if by or at:
            log.warning("case opener facts from %s are not well formed; not used", hospital)
        return f"node:{hospital}", utcnow()
    return by, at


def _place(svc: CaseService, v: Verified, labels: Mapping[str, str] | None = None) -> str:
    """Append ``v``, or park it, or raise Refused; returns held | appended | pending."""
    r, sender = v.record, v.envelope.node_id
    case = svc.cases.find_case(r.case_id) or _open_from_peer(svc, v, labels or {})
    if case is None:
        svc.cases.add_pending(r.case_id, r.seq, v.hash, v.envelope.to_bytes())
        return "pending"
    if sender != svc.counterparty(case):
        raise Refused(
            f"case {r.case_id} runs between {case.hospital} and {case.manufacturer}; "
            f"node {sender} is not part of it"
        )
    stored = svc.cases.records(r.case_id)
    if r.seq < len(stored):
        if stored[r.seq].envelope_hash == v.hash:
            return "held"
        stored = _resolve_conflict(svc, case, v, stored)
    head = stored[-1].envelope_hash if stored else genesis_hash(r.case_id)
    if r.seq > len(stored) or (r.prev_hash != head and svc.node_id == case.manufacturer):
        # an earlier record is still on its way (at the factory: possibly the hospital's
        # record that displaces ours)
        svc.cases.add_pending(r.case_id, r.seq, v.hash, v.envelope.to_bytes())
        return "pending"
    if r.prev_hash != head:
        raise Refused(
            f"case {r.case_id}: record {r.seq} ({r.type}) from {sender} does not extend this "
            f"node's chain (it follows {r.prev_hash[:16]}…, the head is {head[:16]}…); the "
            "hospital's chain orders the case, so it must be signed again"
        )
    state = svc.intact(case).state
    apply(state, r, v.hash)
    try:
        svc.check_facts(case, state, r, arriving=True)  # RecordUnfounded: refused
    except FactsPending as exc:
        log.info("%s", exc)
        svc.cases.add_pending(r.case_id, r.seq, v.hash, v.envelope.to_bytes())
        return "pending"
    svc.cases.append(v, "remote", identifiers(r))
    svc.audit_appended(v, "remote")
    return "appended"


def _resolve_conflict(
    svc: CaseService, case: CaseRow, v: Verified, stored: list[StoredRecord]
) -> list[StoredRecord]:
    """Two different records at one seq: the hospital's wins (see the module docstring)."""
    r, sender = v.record, v.envelope.node_id
    ours = stored[r.seq]
    if svc.node_id == case.hospital:
        raise Refused(
            f"case {r.case_id}: record {r.seq} ({r.type}) from {sender} was signed concurrently "
            f"with record {r.seq} already in the chain; the hospital's chain orders the case, "
            f"so {r.author.label()} must sign again"
        )
    prev = stored[r.seq - 1].envelope_hash if r.seq else genesis_hash(r.case_id)
    if r.prev_hash != prev:
        return stored  # it follows a record we do not hold yet: parked by the caller
    if any(row.origin != "local" for row in stored[r.seq :]):
        raise Refused(
            f"case {r.case_id}: record {r.seq} from {sender} conflicts with records {sender} "
            "sent earlier; the chains of the two nodes diverged — a security officer must look"
        )
    moved = svc.cases.displace(
        r.case_id,
        r.seq,
        f"displaced by record {r.seq} ({r.type}) of {sender}, signed concurrently; the "
        "hospital's chain orders the case: sign again",
    )
    log.warning(
        "case %s: %d local record(s) from seq %d displaced by %s (concurrent signing)",
        r.case_id,
        moved,
        r.seq,
        ours.envelope_hash[:16],
    )
    svc.audit.record(
        CASE_RECORD,
        actor=f"node:{svc.node_id}",
        outcome="failure",
        peer=sender,
        object_id=ours.envelope_hash,
        case_id=r.case_id,
        details={"action": "displaced", "seq": r.seq, "records": moved},
    )
    return stored[: r.seq]


def drain(svc: CaseService, case_id: str) -> None:
    """Apply parked records of ``case_id`` that can now be placed."""
    progress = True
    while progress:
        progress = False
        for seq, digest, raw in svc.cases.pending(case_id):
            v: Verified | None = None
            try:
                v = _verify(svc, raw, digest)
                status = _place(svc, v)
            except YigongError as exc:
                _refused(svc, v, digest, raw, str(exc), exc)
                svc.cases.drop_pending(digest)
                progress = True
                continue
            if status != "pending":
                svc.cases.drop_pending(digest)
                progress = True
                log.info("case %s: parked record %d placed (%s)", case_id, seq, status)


def case_facts_hook(svc: CaseService, previous: FactsHook | None) -> FactsHook:
    """A receiver facts hook: case envelopes to ``svc``, everything else to ``previous``."""

    def hook(announce: Announce, store: ObjectStore) -> Mapping[str, str]:
        if announce.media_type.split(";", 1)[0].strip().lower() != CASE_MEDIA_TYPE:
            facts = previous(announce, store) if previous else {}
            if announce.case_id:  # records of the case may have waited for this object
                svc.retry_pending(announce.case_id)
            return facts
        if announce.size > MAX_ENVELOPE_BYTES:
            return {FACT_ERROR: f"case envelope of {announce.size} bytes is too large"}
        try:
            with store.open_read(announce.object_id) as chunks:
                data = b"".join(chunks)
        except YigongError as exc:
            log.error("case envelope %s cannot be read: %s", announce.object_id[:16], exc)
            return {FACT_ERROR: f"case envelope cannot be read on {svc.node_id}"}
        return svc.accept_remote(data, announce.labels)

    return hook
