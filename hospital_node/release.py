"""Clinician confirmation and de-identified release of a received study (§4.5).

Flow of :meth:`Releaser.confirm` (a verified clinician, or an auto-forward rule):

1. the study must be ``received`` (complete), the case id valid, the destination a
   configured peer, and the study not yet confirmed for that case and destination;
2. every instance is read from the store; all must belong to one patient, who is
   bound to the case in the pseudonym vault (:mod:`hospital_node.vault`);
3. each instance is de-identified for its recipient, i.e. the patient (Patient ID +
   Issuer) at this destination: one pseudonym, one date offset and one UID mapping
   per patient and destination (:meth:`PseudonymVault.recipient_for`,
   :meth:`Deidentifier.for_recipient`), so a patient's cases to one manufacturer are
   consistent with each other and nothing links them to what another manufacturer
   receives (a case released to a destination before this scheme keeps its per-case
   pseudonym and the node-wide key there). Geometry and pixel hashes are checked by
   the de-identifier; an instance that may show patient data in its pixels is held
   back unless burned-in annotation was allowed; an instance the de-identifier
   refuses (e.g. a Structured Report whose content would be emptied) is recorded as
   failed with the reason; the de-identified bytes become a new object;
4. the signed confirmation record and one release row per instance are stored in one
   transaction and audited (``case.confirmation``);
5. each released object passes the outgoing guard and is queued to the destination.
   A confirmation whose queueing was cut short (stop, crash) is finished at start-up.

The confirmation record is canonical JSON (sorted keys, compact) signed with the
node key on behalf of the clinician whose certificate the gatekeeper verified.
Original SOP Instance UIDs stay in the local tables; nothing that leaves names them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydicom import dcmread

from gateway import authz
from gateway.catalog import ObjectRecord, utcnow
from gateway.errors import (
    IdentifiableData,
    IntegrityError,
    StudyNotReady,
    ValidationError,
    YigongError,
)
from gateway.identity import Identity
from gateway.storage import ObjectStore
from hospital_node.deid import TABLE_EDITION, BurnedInAnnotationHeld, Deidentifier
from hospital_node.deid.engine import burned_in_reason
from hospital_node.guard import DICOM_MEDIA_TYPE, read_object
from hospital_node.release_store import (
    Confirmation,
    InstanceRelease,
    ReleaseStore,
)
from hospital_node.studies import InstanceRecord, StudyCatalog
from hospital_node.vault import (
    SCHEME_CASE,
    PatientIdentity,
    PseudonymVault,
    Recipient,
    check_case_id,
    patient_of,
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
        self._lock = threading.Lock()
        self._recipients: dict[bytes, Deidentifier] = {}  # context digest -> de-identifier

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
            patient, recipient, rows = self._prepare(
                study_uid, instances, case_id, destination, allow_burned_in
            )
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
            self.records.add(confirmation, rows)
            self._audit_confirmation(confirmation, rows)
            transfer_ids = self._queue(confirmation)
        log.info(
            "study %s confirmed by %s for case %s to %s: %d of %d instance(s) released",
            study_uid,
            signer.label,
            case_id,
            destination,
            sum(r.status == "released" for r in rows),
            len(rows),
        )
        released = self.records.releases(confirmation.confirmation_id)
        return ConfirmResult(confirmation, released, transfer_ids)

    def _prepare(
        self,
        study_uid: str,
        instances: Sequence[InstanceRecord],
        case_id: str,
        destination: str,
        allow: bool,
    ) -> tuple[PatientIdentity, Recipient, list[InstanceRelease]]:
        """De-identify every instance; all must belong to the case's one patient."""
        patient: PatientIdentity | None = None
        recipient: Recipient | None = None
        deid = self.deid
        rows: list[InstanceRelease] = []
        for inst in instances:
            data = read_object(self.store, inst.object_id)
            who = patient_of(data)
            if patient is None:
                patient = who
                if self.vault.has_case(case_id):
                    self.vault.store(case_id, patient)  # refuses another patient early
                recipient = self.recipient(case_id, destination, patient)
                deid = self.deidentifier_for(recipient)
            elif not patient.same_patient(who):
                raise StudyNotReady(
                    f"the instances of study {study_uid} belong to more than one patient "
                    "(different Patient ID / Issuer); nothing was sent. Have the study "
                    "corrected in the PACS and sent again"
                )
            assert recipient is not None
            rows.append(self._deidentify(deid, inst, data, case_id, recipient.pseudonym, allow))
        assert patient is not None and recipient is not None
        return patient, recipient, rows

    def _deidentify(
        self,
        deid: Deidentifier,
        inst: InstanceRecord,
        data: bytes,
        case_id: str,
        pseudonym: str,
        allow: bool,
    ) -> InstanceRelease:
        """One instance → a stored, catalogued de-identified object (or why not)."""
        row = InstanceRelease(
            source_object_id=inst.object_id,
            sop_instance_uid=inst.sop_instance_uid,
            series_uid=inst.series_uid,
            instance_number=inst.instance_number,
            status="released",
        )
        try:
            out, result = deid.deidentify_part10(data, pseudonym, allow_burned_in=allow)
        except BurnedInAnnotationHeld:
            return row.replace(status="held", reason=_burned_in_reason(data))
        except IntegrityError as exc:
            return row.replace(status="refused", reason=str(exc))
        except ValidationError as exc:
            return row.replace(status="failed", reason=str(exc))
        digest = hashlib.sha256(out).hexdigest()
        if self.store.size(digest) != len(out):
            self.store.put_stream(digest, [out])
        self.catalog.add_object(
            object_id=digest,
            size=len(out),
            name=f"{result.new_sop_uid}.dcm",
            media_type=DICOM_MEDIA_TYPE,
            case_id=case_id,
            origin_node=self.node_id,
            labels={"deid": DEID_LABEL},
        )
        return row.replace(
            deid_object_id=digest,
            deid_sop_instance_uid=result.new_sop_uid,
            geometry_sha256=result.geometry_hash,
            pixel_sha256=result.pixel_hash,
        )

    def _audit_confirmation(self, c: Confirmation, rows: list[InstanceRelease]) -> None:
        for r in rows:
            if r.status == "released":
                self.audit.record(
                    "deid.applied",
                    actor=f"node:{self.node_id}",
                    object_id=r.deid_object_id,
                    case_id=c.case_id,
                    details={"source_object_id": r.source_object_id, "profile": DEID_LABEL},
                )
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
                "released": sum(r.status == "released" for r in rows),
                "held": sum(r.status == "held" for r in rows),
                "refused": sum(r.status in ("refused", "failed") for r in rows),
            },
        )
        refused = sum(r.status == "refused" for r in rows)
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
    def _queue(self, c: Confirmation) -> list[str]:
        """Queue every released, not yet queued instance of ``c``; returns transfer ids."""
        queued: list[str] = []
        for r in self.records.releases(c.confirmation_id):
            if r.status != "released" or r.transfer_id:
                continue
            try:
                obj = self.catalog.get_object(r.deid_object_id)
                self._check_outgoing(obj, self.store, c.destination)
                transfer = self.outbox.queue(obj, c.destination, actor=c.actor)
            except IdentifiableData as exc:
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
                continue
            self.records.set_transfer(c.confirmation_id, r.source_object_id, transfer.transfer_id)
            queued.append(transfer.transfer_id)
        return queued

    def resume(self) -> int:
        """At start-up: queue released instances whose queueing was cut short."""
        count = 0
        for c in self.records.unfinished():
            try:
                count += len(self._queue(c))
            except YigongError:
                log.exception("could not resume the release of confirmation %s", c.confirmation_id)
        if count:
            log.info("release: %d interrupted instance send(s) queued", count)
        return count


def _valid_case(case_id: str) -> bool:
    try:
        check_case_id(case_id)
    except ValidationError:
        return False
    return True


def canonical(record: dict[str, Any]) -> bytes:
    """Canonical JSON bytes of a record: sorted keys, compact separators, UTF-8."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _burned_in_reason(data: bytes) -> str:
    try:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:
        return "may show patient data in its pixels"
    return (burned_in_reason(ds) or "may show patient data in its pixels") + (
        "; held until a clinician allows burned-in annotation (--allow-burned-in)"
    )
