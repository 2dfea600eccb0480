"""CaseService: open cases, take signed records from persons, show verified chains.

A person signs a record with their own key (:mod:`gateway.cases.signing`) and
submits it over mTLS with the same certificate. The node checks that the record
names the caller as author, that the signature verifies against the caller's
TLS-verified certificate, that it extends the current head, and the stage gate
(:mod:`gateway.cases.workflow`); then it countersigns the envelope, appends it to
the chain, stores the envelope as an object (media type
``application/vnd.yigong.case-record+json``) and queues it to the case's other
node, where :meth:`CaseService.accept_remote` (:mod:`gateway.cases.sync`) takes it in.

Logs and audit entries carry case ids, record types, seqs and hashes only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway import authz
from gateway.audit import CASE_RECORD, QUERY, AuditLog
from gateway.cases.chain import (
    ChainError,
    ChainReport,
    Verified,
    verify_chain,
    verify_envelope,
)
from gateway.cases.facts import FactCheck, RecordFacts, check_core
from gateway.cases.records import (
    CASE_MEDIA_TYPE,
    OPENED_AT,
    OPENED_BY,
    Envelope,
    Record,
    check_case_id,
)
from gateway.cases.schema import NODE_ID
from gateway.cases.store import CaseRow, CaseStore
from gateway.cases.views import CaseView, build_view
from gateway.cases.workflow import CaseState, NextAction, StageRefused, apply, identifiers
from gateway.catalog import Catalog, utcnow
from gateway.errors import (
    AuthenticationError,
    BadSignature,
    ConfigError,
    NotFound,
    NotReady,
    PermissionDenied,
    ValidationError,
    YigongError,
)
from gateway.hashing import sha256_hex
from gateway.identity import Identity
from gateway.pki import TrustStore, verify_signature
from gateway.storage import ObjectStore
from gateway.transfer.outbox import Outbox

log = logging.getLogger(__name__)

MAX_CLOCK_SKEW = timedelta(minutes=10)
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
FILE_TYPES = ("design_output", "design_change", "data_delivery")



def opened_labels(case: CaseRow, seq: int) -> dict[str, str]:
    """Labels of record 0's object: who opened the case at the hospital, and when, so the
    factory (which learns of the case from record 0) shows the same opener and time."""
    if seq != 0:
        return {}
    return {OPENED_BY: case.created_by, OPENED_AT: case.created_at}


def _fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate in ``pem`` (as :attr:`Identity.fingerprint`), or ""."""
    try:
        return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()
    except ValueError:
        return ""


class CaseService:
    """The case workflow of one node (hospital or factory)."""

    def __init__(
        self,
        *,
        node_id: str,
        node_role: str,
        catalog: Catalog,
        store: ObjectStore,
        audit: AuditLog,
        trust: TrustStore,
        sign: Callable[[bytes], bytes],
        cert_pem: bytes,
        outbox: Outbox,
        facts: FactCheck | None = None,
    ) -> None:
        self.node_id, self.node_role = node_id, node_role
        self.node_self = authz.NodeSelf(node_id, node_role)
        self.facts = facts  # the role's fact check (gateway.cases.facts)
        self.catalog, self.store, self.audit, self.trust = catalog, store, audit, trust
        self.outbox = outbox
        self.cases = CaseStore(catalog)
        self.sign, self.cert_pem = sign, cert_pem
        self.identity = trust.verify_pem(cert_pem)
        self.lock = threading.RLock()

    # -- opening a case -------------------------------------------------------------
    def create(self, caller: Identity, case_id: str, manufacturer: str) -> CaseView:
        """A clinician of this hospital node opens a case with a manufacturer node."""
        try:
            check_case_id(case_id)
            authz.authorize(caller, authz.CASE_OPEN, self.node_self)
            NODE_ID(manufacturer, "manufacturer")
            if manufacturer not in self.outbox.settings.known_peers:
                raise ConfigError(
                    f"manufacturer {manufacturer!r} is not a configured peer of node "
                    f"{self.node_id}; case records could not be exchanged with it"
                )
            row = CaseRow(case_id, self.node_id, manufacturer, utcnow(), caller.label())
            with self.lock:
                if not self.cases.add_case(row):
                    raise ValidationError(f"case {case_id} exists already; choose another id")
        except YigongError as exc:
            self.audit_refusal(caller.label(), case_id, "open", exc)
            raise
        self.audit.record(
            CASE_RECORD,
            actor=caller.label(),
            peer=manufacturer,
            case_id=case_id,
            details={"action": "opened", "manufacturer": manufacturer},
        )
        log.info("case %s opened by %s with %s", case_id, caller.label(), manufacturer)
        return self.view(case_id)

    # -- a person's signed record ---------------------------------------------------
    def submit(
        self, caller: Identity, caller_pem: bytes, record_bytes: bytes, signature: bytes
    ) -> CaseView:
        """Check, countersign, append and send one record signed by ``caller``."""
        case_id = "?"
        try:
            record = Record.parse(record_bytes)
            case_id = record.case_id
            self._check_author(caller, caller_pem, record, record_bytes, signature)
            with self.lock:
                verified = self._append_local(caller, record, record_bytes, signature, caller_pem)
        except YigongError as exc:
            self.audit_refusal(caller.label(), case_id, "submit", exc)
            raise
        self.audit_appended(verified, "local")
        self.send(verified)
        return self.view(case_id)

    def _check_author(
        self, caller: Identity, pem: bytes, record: Record, raw: bytes, signature: bytes
    ) -> None:
        authz.authorize(caller, authz.CASE_SIGN, self.node_self, resource=record.case_id)
        # ``caller`` was verified from its certificate at the edge, once for this call; the
        # certificate given must be that one (no second verification).
        if _fingerprint(pem) != caller.fingerprint:
            raise AuthenticationError("the certificate given is not the caller's TLS certificate")
        a = record.author
        if (a.id, a.role, a.org, a.cert_fingerprint) != (
            caller.subject_id,
            caller.role,
            caller.org_node,
            caller.fingerprint,
        ):
            raise PermissionDenied(
                f"case {record.case_id}: the record names author {a.label()} (certificate "
                f"{a.cert_fingerprint[:16]}…), but the caller is {caller.label()} (certificate "
                f"{caller.fingerprint[:16]}…); a person submits only records they signed"
            )
        try:
            verify_signature(x509.load_pem_x509_certificate(pem), raw, signature)
        except BadSignature as exc:
            raise ChainError(
                f"case {record.case_id}: the author signature of the {record.type} record does "
                f"not verify against the certificate of {caller.label()}; nothing was recorded"
            ) from exc
        skew = abs(datetime.now(UTC) - datetime.fromisoformat(record.time))
        if skew > MAX_CLOCK_SKEW:
            raise ValidationError(
                f"case {record.case_id}: the record was signed for {record.time}, "
                f"{int(skew.total_seconds() // 60)} minutes off this node's clock; sign again"
            )

    def _append_local(
        self, caller: Identity, record: Record, raw: bytes, signature: bytes, pem: bytes
    ) -> Verified:
        case = self.case(record.case_id)
        peer = self.counterparty(case)
        state = self.intact(case).state
        if any(seq >= state.length for seq, _, _ in self.cases.pending(case.case_id)):
            raise NotReady(
                f"case {case.case_id}: records from {peer} are still arriving; sign again "
                "in a moment"
            )
        if (record.seq, record.prev_hash) != (state.length, state.head):
            raise StageRefused(
                f"case {case.case_id}: the record was signed as record {record.seq} after "
                f"{record.prev_hash[:16]}…, but the case now has {state.length} records "
                f"(head {state.head[:16]}…); fetch the case and sign again"
            )
        env = Envelope(raw, signature, pem, self.node_id, self.cert_pem)
        env = dataclasses.replace(env, node_signature=self.sign(env.node_signing_bytes()))
        data = env.to_bytes()
        digest = sha256_hex(data)
        apply(state, record, digest)  # the stage gate: raises StageRefused / SignerRefused
        self._check_files(case, record)
        self.check_facts(case, state, record, arriving=False)
        if peer not in self.outbox.settings.known_peers:
            raise ConfigError(
                f"case {case.case_id}: node {peer} is not a configured peer of {self.node_id}; "
                "the record could not be exchanged, so it is not recorded"
            )
        if self.store.size(digest) != len(data):
            self.store.put_stream(digest, [data])
        verified = Verified(env, record, caller, self.identity, digest)
        self.cases.append(verified, "local", identifiers(record))
        return verified

    def check_facts(
        self, case: CaseRow, state: CaseState, record: Record, *, arriving: bool
    ) -> None:
        """The record's content against this node's facts (:mod:`gateway.cases.facts`);
        raises RecordUnfounded, or FactsPending for an arriving record."""
        ctx = RecordFacts(
            case.case_id, case.hospital, case.manufacturer, self.node_id, record, state, arriving
        )
        check_core(ctx, self.catalog, self.cases)
        if self.facts is not None:
            self.facts(ctx)

    def retry_pending(self, case_id: str) -> None:
        """Place records of ``case_id`` that wait for a fact (call when an object of the
        case arrived); never raises."""
        from gateway.cases.sync import drain

        try:
            if self.cases.pending(case_id):
                with self.lock:
                    drain(self, case_id)
        except Exception:  # the arriving object's receipt must not fail because of it
            log.exception("case %s: waiting records could not be retried", case_id)

    def _check_files(self, case: CaseRow, record: Record) -> None:
        """Files a design or data delivery names must be held by this node, for this case."""
        if record.type not in FILE_TYPES:
            return
        for n, f in enumerate(record.data.get("files", ())):
            obj = self.catalog.find_object(f["object_id"])
            if obj is None or obj.case_id not in ("", case.case_id):
                why = "is not held by" if obj is None else f"belongs to case {obj.case_id} on"
                raise ValidationError(
                    f"case {case.case_id}: data.files[{n}] (object {f['object_id'][:16]}…) {why} "
                    f"node {self.node_id}; upload it for this case first (yigong send --case)"
                )

    def send(self, v: Verified) -> None:
        """Catalogue the envelope as an object and queue it to the case's other node."""
        r, data = v.record, v.envelope.to_bytes()
        case = self.case(r.case_id)
        try:
            if self.store.size(v.hash) != len(data):
                self.store.put_stream(v.hash, [data])
            obj = self.catalog.add_object(
                object_id=v.hash,
                size=len(data),
                name=f"{r.case_id}.{r.seq:04d}.{r.type}.json",
                media_type=CASE_MEDIA_TYPE,
                case_id=r.case_id,
                origin_node=self.node_id,
                labels={"case.seq": str(r.seq), "case.type": r.type, **opened_labels(case, r.seq)},
            )
            self.outbox.queue(obj, self.counterparty(case), actor=r.author.label())
        except YigongError:
            log.exception(
                "case %s: record %d stored but not queued; resume() retries", r.case_id, r.seq
            )

    def resume(self) -> int:
        """Queue local records that were appended but never queued (e.g. a crash between).

        Call once at start-up; returns how many were queued."""
        queued = 0
        for case in self.cases.list_cases(1_000_000):
            for row in self.cases.records(case.case_id):
                if row.origin != "local" or self.catalog.list_transfers(
                    object_id=row.envelope_hash, direction="outbound", limit=1
                ):
                    continue
                try:
                    self.send(verify_envelope(row.envelope, self.trust))
                except YigongError as exc:
                    log.error("case %s: record %d cannot be sent: %s", case.case_id, row.seq, exc)
                    continue
                queued += 1
        return queued

    def is_own_record(self, object_id: str) -> bool:
        """Whether ``object_id`` is a case record this node countersigned and holds in a
        chain (for an outgoing guard that lets only known kinds of objects leave)."""
        found = self.cases.find_record(object_id)
        return found is not None and found.origin == "local"

    # -- from the peer ----------------------------------------------------------------
    def accept_remote(
        self, envelope_bytes: bytes, labels: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Take in an envelope the case's other node sent; never raises (receipt facts).

        ``labels``: the object's labels as the sender catalogued them (record 0 carries
        who opened the case and when, see :func:`opened_labels`)."""
        from gateway.cases.sync import accept

        return accept(self, envelope_bytes, labels or {})

    # -- reading ----------------------------------------------------------------------
    def case(self, case_id: str) -> CaseRow:
        check_case_id(case_id)
        case = self.cases.find_case(case_id)
        if case is None:
            raise NotFound(f"case {case_id} is not known to node {self.node_id}")
        return case

    def counterparty(self, case: CaseRow) -> str:
        return case.manufacturer if self.node_id == case.hospital else case.hospital

    def intact(self, case: CaseRow) -> ChainReport:
        """The verified chain, or ChainError when its bytes, signatures or links are wrong."""
        report = verify_chain(case, self.cases.records(case.case_id), self.trust)
        if not report.intact:
            raise ChainError(
                f"case {case.case_id}: the stored chain does not verify ({report.problem}); "
                "it is not extended until a security officer has looked at it"
            )
        return report

    def show(self, caller: Identity, case_id: str) -> CaseView:
        """:meth:`view` for a person or the node, audited as a query."""
        view = self.view(case_id)
        self.audit.record(
            QUERY,
            actor=caller.label(),
            case_id=case_id,
            details={"query": "case", "records": len(view.records), "verified": view.ok},
        )
        return view

    def list_cases(self, caller: Identity, limit: int = 0) -> list[CaseView]:
        limit = min(limit or DEFAULT_LIMIT, MAX_LIMIT)
        views = [self.view(c.case_id) for c in self.cases.list_cases(limit)]
        self.audit.record(
            QUERY, actor=caller.label(), details={"query": "cases", "results": len(views)}
        )
        return views

    def next_actor(self, case_id: str) -> list[NextAction]:
        """Who must act next on ``case_id`` (empty when its chain does not verify)."""
        view = self.view(case_id)
        return list(view.next) if view.ok else []

    def view(self, case_id: str) -> CaseView:
        """The whole chain of ``case_id``, every record verified, stage and next actor."""
        case = self.case(case_id)
        return build_view(case, self.cases, self.catalog, self.trust, self.counterparty(case))

    # -- audit --------------------------------------------------------------------------
    def audit_appended(self, v: Verified, origin: str) -> None:
        r = v.record
        self.audit.record(
            CASE_RECORD,
            actor=r.author.label(),
            object_id=v.hash,
            peer=v.envelope.node_id if origin == "remote" else None,
            case_id=r.case_id,
            details={"action": "appended", "seq": r.seq, "type": r.type, "origin": origin},
        )
        log.info("case %s: record %d (%s) appended (%s)", r.case_id, r.seq, r.type, origin)

    def audit_refusal(self, actor: str, case_id: str, action: str, exc: YigongError) -> None:
        """Log and audit a refusal; an invalid case id (it might be anything a person typed,
        even a patient's name) is left out of both."""
        try:
            check_case_id(case_id)
        except ValidationError:
            case_id = "?"
        log.warning("case %s: %s refused: %s", case_id, action, exc)
        try:
            self.audit.record(
                CASE_RECORD,
                actor=actor,
                outcome="failure",
                case_id=case_id if case_id != "?" else None,
                details={"action": action, "reason": type(exc).__name__, "message": str(exc)[:500]},
            )
        except YigongError:
            log.exception("could not audit a refused case %s", action)
