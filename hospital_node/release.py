"""Clinician confirmation and de-identified release of a received study (§4.5).

Flow of :meth:`Releaser.confirm` (a verified clinician, or an auto-forward rule):

1. the study must be ``received`` (complete), the case id valid, the destination a
   configured peer, and the study not yet confirmed for that case and destination;
2. all instances must belong to one patient (:mod:`hospital_node.release_patient`:
   read from the head of each object, before anything leaves), who is bound to the
   case in the pseudonym vault (:mod:`hospital_node.vault`);
3. the signed confirmation record and one ``pending`` release row per instance are
   stored in one transaction, and the confirmation's outbox batch is opened (from
   :data:`BATCH_MIN_INSTANCES` instances on; fewer go object by object);
4. the instances are de-identified, a few at a time, on both cores
   (:mod:`hospital_node.deid_pool`): each for its recipient, i.e. the patient (Patient
   ID + Issuer) at this destination: one pseudonym, one date offset and one UID mapping
   per patient and destination (:meth:`PseudonymVault.recipient_for`,
   :meth:`Deidentifier.for_recipient`), so a patient's cases to one manufacturer are
   consistent with each other and nothing links them to what another manufacturer
   receives (a case released to a destination before this scheme keeps its per-case
   pseudonym and the node-wide key there). Geometry and pixel hashes are checked by
   the de-identifier; an instance that may show patient data in its pixels is held
   back unless burned-in annotation was allowed; an instance the de-identifier
   refuses (e.g. a Structured Report whose content would be emptied) is recorded as
   failed with the reason; the de-identified bytes become a new object;
5. as each group of instances is done, their objects are made durable together, and
   in one catalog transaction (with one audit commit: ``deid.applied``,
   ``transfer.queued``) each row gets its outcome, and each released object passes the
   outgoing guard and is queued into the batch — so the first instances leave while
   later ones are still being de-identified;
6. the batch is sealed with the number queued and ``case.confirmation`` is audited.

A confirmation cut short at any point (stop, crash, SIGKILL) is finished at start-up
(:meth:`Releaser.resume`): pending instances are de-identified (deterministically: the
same bytes again), released ones that were never queued are queued, the batch is
sealed and the confirmation audited. A row gets its transfer in the same transaction
that queues it, so no instance is queued twice or lost.

The confirmation record is canonical JSON (sorted keys, compact) signed with the
node key on behalf of the clinician whose certificate the gatekeeper verified.
Original SOP Instance UIDs stay in the local tables; nothing that leaves names them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gateway import authz
from gateway.catalog import ObjectRecord, TransferRecord, utcnow
from gateway.errors import (
    IdentifiableData,
    StorageError,
    StudyNotReady,
    ValidationError,
    YigongError,
)
from gateway.identity import Identity
from gateway.storage import ObjectStore
from gateway.storage.filesystem import FilesystemStore
from hospital_node.deid import TABLE_EDITION, Deidentifier
from hospital_node.deid_pool import (
    ERROR,
    RELEASED,
    DeidPool,
    Outcome,
    Source,
    clear_scratch,
    patient_key,
    run_one,
)
from hospital_node.guard import DICOM_MEDIA_TYPE, MAX_LISTED, read_object
from hospital_node.release_patient import study_patient
from hospital_node.release_store import (
    PENDING,
    Confirmation,
    InstanceRelease,
    ReleaseStore,
)
from hospital_node.studies import StudyCatalog
from hospital_node.vault import (
    SCHEME_CASE,
    PatientIdentity,
    PseudonymVault,
    Recipient,
    check_case_id,
)

if TYPE_CHECKING:
    from gateway.audit import AuditLog
    from gateway.catalog import Catalog
    from gateway.config import NodeConfig
    from gateway.transfer.outbox import Outbox

log = logging.getLogger(__name__)

RECORD_TYPE = "data_confirmation"
MAX_CACHED_RECIPIENTS = 64
DEID_LABEL = f"PS3.15-{TABLE_EDITION}"
BATCH_MIN_INSTANCES = 8
"""A release of fewer instances is queued object by object (each with its own signed
receipt); from this many on, as one outbox batch with one manifest receipt."""


class NodeServices(Protocol):
    """What the release uses of its node: configuration, identity, signing key, catalog,
    store, audit log and outbox (the composition root passes them; docs/architecture.md)."""

    @property
    def cfg(self) -> NodeConfig: ...
    @property
    def node_id(self) -> str: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def store(self) -> ObjectStore: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def outbox(self) -> Outbox: ...
    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True)
class ConfirmResult:
    confirmation: Confirmation
    instances: list[InstanceRelease]
    transfer_ids: list[str]


@dataclass(frozen=True)
class _Signer:
    """Who a confirmation is recorded for."""

    label: str
    serial: str
    fingerprint: str
    auto: bool


class Releaser:
    """Confirms studies and releases their de-identified instances to a peer."""

    def __init__(
        self,
        node: NodeServices,
        vault: PseudonymVault,
        deidentifier: Deidentifier,
        records: ReleaseStore,
        studies: Callable[[], StudyCatalog],
        check_outgoing: Callable[[ObjectRecord, ObjectStore, str], None],
        *,
        vouch: Callable[[str, str], None] | None = None,
    ) -> None:
        self.node_id = node.node_id
        me = node.identity
        self._node_signer = _Signer(me.label(), f"{me.serial:x}", me.fingerprint, True)
        self._sign = node.sign
        self.catalog, self.store, self.audit = node.catalog, node.store, node.audit
        self.outbox = node.outbox
        self.vault = vault
        self.deid = deidentifier
        self.records = records
        self._studies = studies
        self._check_outgoing = check_outgoing
        self._vouch = vouch  # the outgoing guard's scan verdict, from the worker's own scan
        self._lock = threading.RLock()
        self._recipients: dict[bytes, Deidentifier] = {}  # context digest -> de-identifier
        d = node.cfg.deid
        self.scratch = node.cfg.node.data_dir / "spool" / "release"
        self.pool = DeidPool(d.workers, self.scratch)
        self.pool_min_instances = d.pool_min_instances

    def close(self) -> None:
        """Stop the de-identification workers (node shutdown)."""
        self.pool.close()

    def study_waiting(self, instances: int) -> None:
        """A study of ``instances`` waits for its confirmation (in its quiet period, or
        just ``received``): when that is enough for the worker pool, start the workers
        now (they take about half a second to load), so the confirmation does not wait
        for them."""
        if self.pool.workers and instances >= self.pool_min_instances:
            try:
                self.pool.warm()
            except YigongError as exc:  # the confirmation will say it again
                log.warning("de-identification workers not started: %s", exc)

    # -- per patient and destination -----------------------------------------------------
    def deidentifier_for(self, recipient: Recipient) -> Deidentifier:
        """The de-identifier of ``recipient`` (the node-wide one for the legacy scheme)."""
        if recipient.context is None:
            return self.deid
        digest = hashlib.sha256(recipient.context).digest()
        found = self._recipients.get(digest)
        if found is None:
            if len(self._recipients) >= MAX_CACHED_RECIPIENTS:
                self._recipients.clear()
            found = self._recipients[digest] = self.deid.for_recipient(recipient.context)
        return found

    def recipient(
        self, case_id: str, destination: str, patient: PatientIdentity | None = None
    ) -> Recipient:
        """The recipient ``case_id`` is (or will be) released to ``destination`` as.

        Recorded in the vault: that one. Released there before per-patient pseudonyms
        (a confirmation but no vault record): the legacy per-case scheme. Otherwise the
        patient's recipient at ``destination`` (``patient``, else the vault's).
        """
        known = self.vault.recipient(case_id, destination)
        if known is not None:
            return known
        if self.records.confirmations_for_case(case_id, destination):
            return Recipient(self.vault.case_pseudonym(case_id), SCHEME_CASE, None)
        who = patient if patient is not None else self.vault.lookup(case_id)
        return self.vault.recipient_for(who, destination)

    def map_uid_for(self, case_id: str, destination: str, uid: str) -> str:
        """The de-identified form of ``uid`` as ``destination`` received it for the case."""
        return self.deidentifier_for(self.recipient(case_id, destination)).map_uid(uid)

    # -- confirmation ------------------------------------------------------------------
    def confirm(
        self,
        caller: Identity,
        study_uid: str,
        case_id: str,
        destination: str,
        *,
        allow_burned_in: bool = False,
    ) -> ConfirmResult:
        """A clinician of this node confirms ``study_uid`` for ``case_id`` → ``destination``."""
        authz.authorize(caller, authz.STUDY_CONFIRM, authz.NodeSelf(self.node_id, authz.HOSPITAL))
        signer = _Signer(caller.label(), f"{caller.serial:x}", caller.fingerprint, False)
        return self._audited(signer, study_uid, case_id, destination, allow_burned_in, {})

    def auto_forward(
        self, study_uid: str, destination: str, called_ae: str, allow_burned_in: bool
    ) -> ConfirmResult:
        """Release by the node's auto-forward rule (a system confirmation, ``auto=true``)."""
        case_id = self.vault.derived_case_id(study_uid)
        rule = {"rule": f"dicom.auto_forward_called_ae={called_ae}"}
        return self._audited(
            self._node_signer, study_uid, case_id, destination, allow_burned_in, rule
        )

    def _audited(
        self,
        signer: _Signer,
        study_uid: str,
        case_id: str,
        destination: str,
        allow_burned_in: bool,
        extra: dict[str, str],
    ) -> ConfirmResult:
        """:meth:`_confirm`, with a refusal recorded as a failed ``case.confirmation``."""
        try:
            return self._confirm(signer, study_uid, case_id, destination, allow_burned_in, extra)
        except YigongError as exc:
            self.audit.record(
                "case.confirmation",
                actor=signer.label,
                outcome="failure",
                peer=destination if destination in self.outbox.settings.known_peers else None,
                case_id=case_id if _valid_case(case_id) else None,  # may hold anything typed
                details={
                    "study_uid": study_uid[:64],
                    "auto": signer.auto,
                    "error": type(exc).__name__,
                },
            )
            raise

    def _confirm(
        self,
        signer: _Signer,
        study_uid: str,
        case_id: str,
        destination: str,
        allow_burned_in: bool,
        extra: dict[str, str],
    ) -> ConfirmResult:
        check_case_id(case_id)
        peers = self.outbox.settings.known_peers
        if destination not in peers:
            raise ValidationError(
                f"destination {destination!r} is not a configured peer of node {self.node_id} "
                f"(known: {', '.join(sorted(peers)) or 'none'})"
            )
        with self._lock:
            studies = self._studies()
            summary = studies.get_study(study_uid)
            if summary.status != "received":
                raise StudyNotReady(
                    f"study {study_uid} is still {summary.status!r} ({summary.instance_count} "
                    f"instance(s) so far, last at {summary.last_received_at}); it can be "
                    "confirmed once it is 'received', i.e. no instance arrived for the quiet "
                    "period (dicom.quiet_period_seconds)"
                )
            existing = self.records.find_confirmation(study_uid, case_id, destination)
            if existing is not None:
                raise StudyNotReady(
                    f"study {study_uid} is already confirmed for case {case_id} to "
                    f"{destination} (by {existing.actor} at {existing.created_at}, "
                    f"confirmation {existing.confirmation_id[:16]}); nothing was sent again"
                )
            instances = [i for i in studies.instances(study_uid) if not i.duplicate]
            if not instances:
                raise StudyNotReady(f"study {study_uid} has no instances to send")
            found = None  # before anything leaves: every instance is of one patient
            if self.pool.workers and len(instances) >= self.pool_min_instances:
                fs = self.store if isinstance(self.store, FilesystemStore) else None
                if fs is None:
                    self.pool.warm()  # the workers start while the study is checked
                else:  # the workers read the heads
                    found = self.pool.patients([str(fs.path_for(i.object_id)) for i in instances])
            patient = study_patient(self.store, study_uid, instances, found)
            if self.vault.has_case(case_id):
                self.vault.store(case_id, patient)  # refuses another patient early
            recipient = self.recipient(case_id, destination, patient)
            self.vault.store(case_id, patient)
            self.vault.bind(case_id, destination, recipient)
            record = {
                "type": RECORD_TYPE,
                "study_uid": study_uid,
                "deid_study_uid": self.deidentifier_for(recipient).map_uid(study_uid),
                "case_id": case_id,
                "destination": destination,
                "clinician": {"label": signer.label, "serial": signer.serial},
                "node": self.node_id,
                "time": utcnow(),
                "report_sha256": summary.report_sha256,
                "instance_count": summary.instance_count,
                "allow_burned_in": allow_burned_in,
                "auto": signer.auto,
                **extra,
            }
            body = canonical(record)
            confirmation = Confirmation(
                confirmation_id=hashlib.sha256(body).hexdigest(),
                study_uid=study_uid,
                case_id=case_id,
                destination=destination,
                actor=signer.label,
                cert_serial=signer.serial,
                cert_fingerprint=signer.fingerprint,
                auto=signer.auto,
                allow_burned_in=allow_burned_in,
                record=body.decode("utf-8"),
                signature=self._sign(body),
                created_at=str(record["time"]),
            )
            pending = [
                InstanceRelease(
                    source_object_id=inst.object_id,
                    sop_instance_uid=inst.sop_instance_uid,
                    series_uid=inst.series_uid,
                    instance_number=inst.instance_number,
                    status=PENDING,
                )
                for inst in instances
            ]
            self.records.add(confirmation, pending, releasing=True)
            transfer_ids = self._release(confirmation)
        rows = self.records.releases(confirmation.confirmation_id)
        log.info(
            "study %s confirmed by %s for case %s to %s: %d of %d instance(s) released",
            study_uid,
            signer.label,
            case_id,
            destination,
            sum(r.status == "released" for r in rows),
            len(rows),
        )
        return ConfirmResult(confirmation, rows, transfer_ids)

    # -- the release: de-identify, store, queue (pipelined) ---------------------------
    def _release(self, c: Confirmation) -> list[str]:
        """Bring ``c`` to done from wherever it stands; returns the transfers queued now."""
        cid = c.confirmation_id
        state, batch_id = self.records.progress(cid)
        rows = self.records.releases(cid)
        pending = [r for r in rows if r.status == PENDING]
        unqueued = [r for r in rows if r.status == "released" and not r.transfer_id]
        batched = len(rows) >= BATCH_MIN_INSTANCES
        if state == "releasing" and batched and not batch_id and (pending or unqueued):
            with self.catalog.transaction():  # the batch exists iff the confirmation names it
                batch_id = self._open_batch(c)
                self.records.set_progress(cid, batch_id=batch_id)
        if state != "releasing":
            batch_id = ""  # its batch is sealed: a late instance goes on its own
        queued: list[str] = []
        if pending:
            queued += self._deidentify_all(c, pending, batch_id)
        queued += self._queue(c, batch_id)
        if state == "releasing":
            if batch_id:
                done = sum(1 for r in self.records.releases(cid) if r.transfer_id)
                self._seal_batch(batch_id, done)
            self.records.set_progress(cid, state="sealed")
            state = "sealed"
        if state == "sealed":
            self._audit_confirmation(c, self.records.releases(cid))
            self.records.set_progress(cid, state="done")
            self.records.release_owner(cid)
        return queued

    def _deidentify_all(
        self, c: Confirmation, pending: list[InstanceRelease], batch_id: str
    ) -> list[str]:
        """De-identify ``pending`` (on the pool when there are enough of them), committing
        and queueing each group as soon as it is done."""
        recipient = self.recipient(c.case_id, c.destination)
        deid = self.deidentifier_for(recipient)
        pseudonym = recipient.pseudonym
        patient = self.vault.lookup(c.case_id)
        salt = os.urandom(16)
        expected = patient_key(patient.patient_id, patient.issuer_of_patient_id, salt)
        self.scratch.mkdir(parents=True, exist_ok=True)
        clear_scratch(self.scratch)  # one release at a time: anything here is left over
        allow = c.allow_burned_in
        groups: Iterable[list[tuple[InstanceRelease, Outcome]]]
        if self.pool.workers and len(pending) >= self.pool_min_instances:
            # a filesystem store: the workers read and write its files themselves
            fs = self.store if isinstance(self.store, FilesystemStore) else None
            jobs = [(r, self._source(r.source_object_id, fs)) for r in pending]
            root = str(fs.root) if fs is not None else ""
            groups = self.pool.run(deid, pseudonym, allow, jobs, salt, root)
        else:
            jobs = [(r, self._source(r.source_object_id, None)) for r in pending]
            groups = _inline(deid, pseudonym, allow, jobs, self.scratch, salt)
        queued: list[str] = []
        try:
            for group in groups:
                queued += self._commit(c, group, expected, pseudonym, batch_id)
        finally:
            close = getattr(groups, "close", None)
            if close is not None:
                close()  # frees the pool now, also when a group could not be committed
        return queued

    def _source(self, object_id: str, fs: FilesystemStore | None) -> Source:
        if fs is not None:
            return str(fs.path_for(object_id))
        return functools.partial(read_object, self.store, object_id)

    def _commit(
        self,
        c: Confirmation,
        group: list[tuple[InstanceRelease, Outcome]],
        expected_patient: str,
        pseudonym: str,
        batch_id: str,
    ) -> list[str]:
        """Make a group's objects durable together, then record, audit and queue them in
        one catalog transaction (and one audit commit)."""
        outcomes: list[tuple[InstanceRelease, Outcome]] = []
        links: list[tuple[str, Path]] = []
        for row, out in group:
            if out.status == ERROR:  # left pending: finished at the next start
                for _, other in group:
                    _unlink(other.path)
                raise StorageError(
                    f"release of confirmation {c.confirmation_id[:16]} stopped: {out.reason}; "
                    "it is finished when the node starts again"
                )
            if out.status == RELEASED and out.patient_key != expected_patient:
                _unlink(out.path)
                out = Outcome(
                    "failed",
                    reason="this instance names another patient than the study's (Patient "
                    "ID / Issuer) although the study was checked as one patient's; not "
                    "released",
                )
                log.error("release %s: object %s changed patient", c.confirmation_id[:16],
                          row.source_object_id)  # fmt: skip
            if out.status == RELEASED and not out.stored:
                if self.store.size(out.object_id) != out.size:
                    links.append((out.object_id, Path(out.path)))
            outcomes.append((row, out))
        try:
            if links:
                self.store.link_files(links)
        finally:
            for _, out in outcomes:
                _unlink(out.path)
        queued: list[str] = []
        with self.catalog.transaction(), self.audit.batch():
            for row, out in outcomes:
                done = row.replace(status=out.status, reason=out.reason)
                if out.status == RELEASED:
                    done = done.replace(
                        deid_object_id=out.object_id,
                        deid_sop_instance_uid=out.new_sop_uid,
                        geometry_sha256=out.geometry_hash,
                        pixel_sha256=out.pixel_hash,
                    )
                    self.catalog.add_object(
                        object_id=out.object_id,
                        size=out.size,
                        name=f"{out.new_sop_uid}.dcm",
                        media_type=DICOM_MEDIA_TYPE,
                        case_id=c.case_id,
                        origin_node=self.node_id,
                        labels={"deid": DEID_LABEL},
                    )
                self.records.update_release(c.confirmation_id, done)
                if out.status != RELEASED:
                    continue
                self.audit.record(
                    "deid.applied",
                    actor=f"node:{self.node_id}",
                    object_id=out.object_id,
                    case_id=c.case_id,
                    details={"source_object_id": row.source_object_id, "profile": DEID_LABEL},
                )
                if out.findings:
                    listed = "; ".join(out.findings[:MAX_LISTED])
                    self._refuse(c, done, IdentifiableData(
                        f"object {out.object_id} still carries patient-identifying attributes "
                        f"and is not sent to {c.destination}: {listed}"
                    ))  # fmt: skip
                    continue
                if self._vouch is not None:
                    self._vouch(out.object_id, pseudonym)
                transfer = self._queue_one(c, done, batch_id)
                if transfer is not None:
                    queued.append(transfer.transfer_id)
        return queued

    def _audit_confirmation(self, c: Confirmation, rows: list[InstanceRelease]) -> None:
        self.audit.record(
            "case.confirmation",
            actor=c.actor,
            peer=c.destination,
            case_id=c.case_id,
            details={
                "confirmation_id": c.confirmation_id,
                "study_uid": c.study_uid,
                "auto": c.auto,
                "allow_burned_in": c.allow_burned_in,
                "cert_serial": c.cert_serial,
                "cert_fingerprint": c.cert_fingerprint,
                # as the de-identifier left them (a later refusal by the outgoing
                # scan has its own security.alert)
                "released": sum(r.status == "released" or _guard_refusal(r) for r in rows),
                "held": sum(r.status == "held" for r in rows),
                "refused": sum(
                    r.status == "failed" or (r.status == "refused" and not _guard_refusal(r))
                    for r in rows
                ),
            },
        )
        refused = sum(r.status == "refused" and not _guard_refusal(r) for r in rows)
        if refused:  # the de-identifier would have changed geometry or pixels
            self.audit.record(
                "security.alert",
                actor=f"node:{self.node_id}",
                outcome="failure",
                case_id=c.case_id,
                details={
                    "reason": "IntegrityError",
                    "action": "instances not released",
                    "count": refused,
                    "confirmation_id": c.confirmation_id,
                },
            )

    # -- queueing ----------------------------------------------------------------------
    def _queue(self, c: Confirmation, batch_id: str = "") -> list[str]:
        """Queue every released, not yet queued instance of ``c``; returns transfer ids."""
        queued: list[str] = []
        for r in self.records.releases(c.confirmation_id):
            if r.status != "released" or r.transfer_id:
                continue
            with self.catalog.transaction():
                transfer = self._queue_one(c, r, batch_id)
            if transfer is not None:
                queued.append(transfer.transfer_id)
        return queued

    def _queue_one(
        self, c: Confirmation, r: InstanceRelease, batch_id: str
    ) -> TransferRecord | None:
        """Guard and queue one released instance and record its transfer (the caller's
        catalog transaction makes the two one); None when the guard refuses it."""
        try:
            obj = self.catalog.get_object(r.deid_object_id)
            self._check_outgoing(obj, self.store, c.destination)
        except IdentifiableData as exc:
            self._refuse(c, r, exc)
            return None
        transfer = self.outbox.queue(obj, c.destination, actor=c.actor, batch_id=batch_id or None)
        self.records.set_transfer(c.confirmation_id, r.source_object_id, transfer.transfer_id)
        return transfer

    def _refuse(self, c: Confirmation, r: InstanceRelease, exc: IdentifiableData) -> None:
        self.records.set_status(c.confirmation_id, r.source_object_id, "refused", str(exc))
        self.audit.record(
            "security.alert",
            actor=f"node:{self.node_id}",
            outcome="failure",
            object_id=r.deid_object_id,
            case_id=c.case_id,
            details={"reason": "IdentifiableData", "action": "release refused"},
        )
        log.error("release of object %s refused: %s", r.deid_object_id, exc)

    def _open_batch(self, c: Confirmation) -> str:
        """The outbox batch of ``c``'s instances (one exchange to the destination)."""
        return self.outbox.open_batch(
            c.destination, case_id=c.case_id, actor=c.actor, ref=c.confirmation_id
        )

    def _seal_batch(self, batch_id: str, expected: int) -> None:
        self.outbox.seal_batch(batch_id, expected=expected)

    def resume(self, *, orphans_only: bool = False) -> int:
        """At start-up: finish every release cut short (de-identify what is pending,
        queue what was released, seal, audit); returns the transfers queued.

        With replicas on a shared catalog only releases no live replica owns are taken
        (each by one replica); ``orphans_only``: the periodic pass of a running replica,
        which keeps its scratch files (its own releases may be running)."""
        count = 0
        with self._lock:
            if not orphans_only:
                clear_scratch(self.scratch)
            for c in self.records.unfinished():
                if not self.records.claim(c.confirmation_id):
                    continue  # a live replica is working on it
                try:
                    count += len(self._release(c))
                except YigongError:
                    log.exception(
                        "could not resume the release of confirmation %s", c.confirmation_id
                    )
        if count:
            log.info("release: %d interrupted instance send(s) queued", count)
        return count


def _inline(
    deid: Deidentifier,
    pseudonym: str,
    allow: bool,
    jobs: list[tuple[InstanceRelease, Source]],
    scratch: Path,
    salt: bytes,
) -> Iterator[list[tuple[InstanceRelease, Outcome]]]:
    """De-identify in the node process, one instance per group (a small release)."""
    for row, source in jobs:
        yield [(row, run_one(deid, source, pseudonym, allow, scratch, salt))]


def _unlink(path: str) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _guard_refusal(r: InstanceRelease) -> bool:
    """A row the de-identifier produced and the outgoing scan refused."""
    return r.status == "refused" and bool(r.deid_object_id)


def _valid_case(case_id: str) -> bool:
    try:
        check_case_id(case_id)
    except ValidationError:
        return False
    return True


def canonical(record: dict[str, Any]) -> bytes:
    """Canonical JSON bytes of a record: sorted keys, compact separators, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
