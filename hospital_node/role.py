"""The hospital node's additions to the core (see :mod:`gateway.roles`).

Built in two steps by the composition root (:mod:`yigong_node`; registered in
:mod:`hospital_node.registration`): :class:`HospitalHooks` from the node's
infrastructure — what the core calls (the outgoing guard, the receipt and case-record
checks, settle) and the DICOM ingest — then :class:`HospitalRole` from those hooks and
the core's outbox and case service: the release, auto-forward, design export and the
``yigong.v1.Hospital`` service.

Sections (each owned by one feature; keep them separate):

- ingest (SCP): the DICOM SCP, study assembly and the quiet-period ticker.
- release: the de-identification and vault keys, clinician confirmation and
  de-identified release (:mod:`hospital_node.release`), the outgoing guard and the
  receipt check (:mod:`hospital_node.guard`), the ``yigong.v1.Hospital`` service
  (:mod:`hospital_node.wire.service`) and the auto-forward rule.
- design export: approved designs into the hospital's own PACS as Encapsulated STL
  (:mod:`hospital_node.design_export`), served as ``Hospital.ExportDesign``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway import authz
from gateway.audit import QUERY
from gateway.cases.store import CaseStore
from gateway.errors import ConfigError, ValidationError, YigongError
from gateway.roles import CoreServices, RoleContext, RoleHooks
from hospital_node.deid import Deidentifier
from hospital_node.design_export import DesignExporter, ExportResult
from hospital_node.guard import OutgoingGuard
from hospital_node.ingest import Ingest
from hospital_node.outbound import (
    IdentifierMatcher,
    OutboundGate,
    OutboundLimits,
    case_identifiers,
)
from hospital_node.record_facts import HospitalRecordFacts
from hospital_node.release import ConfirmResult, Releaser
from hospital_node.release_store import (
    Confirmation,
    ReleaseStore,
    ReleaseView,
    StudyCase,
    StudyListing,
    StudyView,
)
from hospital_node.spool import DicomSpool
from hospital_node.studies import StudyCatalog
from hospital_node.study_identity import StudyIdentities
from hospital_node.vault import PseudonymVault, load_or_create_key
from hospital_node.wire.scp import DicomServer

if TYPE_CHECKING:
    from gateway.audit import AuditLog
    from gateway.cases.facts import RecordFacts
    from gateway.catalog import Catalog, ObjectRecord
    from gateway.config import NodeConfig
    from gateway.identity import Identity
    from gateway.storage import ObjectStore
    from gateway.transfer.outbox import Outbox
    from gateway.web.app import Console, ConsolePages

log = logging.getLogger(__name__)

AUTO_FORWARD_INTERVAL_SECONDS = 1.0


class HospitalHooks(RoleHooks):
    """What the core calls on a hospital node, and the DICOM ingest (step 1: built from
    the node's infrastructure, before the outbox and case service that call it)."""

    alert_on_type_refusal = True  # a mis-declared upload: security alert

    def __init__(self, ctx: RoleContext) -> None:
        from yigong.v1 import hospital_pb2

        self.ctx = ctx
        self.service_names = (hospital_pb2.DESCRIPTOR.services_by_name["Hospital"].full_name,)
        self._init_ingest()
        self._init_keys()

    def start(self) -> None:
        self._start_ingest()

    def stop(self) -> None:
        self._stop_ingest()

    # --- ingest (SCP): DICOM listener, study assembly, quiet-period ticker ----------
    def _init_ingest(self) -> None:
        self.studies = StudyCatalog(self.ctx.catalog)
        self._waiting: list[Callable[[int], None]] = []
        self.dicom_port = 0
        self.spool: DicomSpool | None = None
        self._dicom: DicomServer | None = None
        self._tick_stop = threading.Event()
        self._tick_thread: threading.Thread | None = None

    def _start_ingest(self) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg.dicom
        if not cfg.enabled:
            return
        ingest = Ingest(
            ctx.store, ctx.catalog, self.studies, ctx.audit, ctx.cfg.node.id,
            self.identities,
        )  # fmt: skip
        self.spool = DicomSpool(ingest, cfg.spool_path, max_waiting=cfg.spool_max_waiting)
        self.spool.start()
        self._dicom = DicomServer(
            cfg, self.spool, ctx.audit, ctx.cfg.node.id, telemetry=ctx.telemetry
        )
        self.dicom_port = self._dicom.start()
        self._tick_stop.clear()
        self._tick_thread = threading.Thread(
            target=self._tick_loop, name="study-quiet", daemon=True
        )
        self._tick_thread.start()

    def _tick_loop(self) -> None:
        quiet = self.ctx.cfg.dicom.quiet_period_seconds
        filed = -1  # instances of the studies being received, at the previous tick
        while not self._tick_stop.wait(min(1.0, max(0.05, quiet / 4))):
            if self.spool is not None and self.spool.waiting:
                filed = -1
                continue  # a study is not quiet while its instances may still be filed
            try:
                largest, total = self.studies.receiving_counts()
                if largest and total == filed:  # nothing filed since the last tick
                    self._study_waits(largest)
                filed = total
                done = self.studies.tick(datetime.now(UTC), quiet)
                if done:
                    self._study_waits(max(self.studies.get_study(u).instance_count for u in done))
            except Exception:  # keep ticking; the next round retries
                log.exception("study quiet-period check failed")

    def on_study_waiting(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(instances)`` from the ticker when a study of that many
        instances waits for its confirmation: its ingest paused (nothing filed since the
        previous tick; the quiet period runs) or it just became ``received``. The
        release starts its de-identification workers then for a large study — not
        during the ingest, whose CPU they would take — so a clinician confirming right
        after does not wait for them to load."""
        self._waiting.append(listener)

    def _study_waits(self, instances: int) -> None:
        for listener in self._waiting:
            listener(instances)

    def _stop_ingest(self) -> None:
        self._tick_stop.set()
        if self._tick_thread is not None:
            self._tick_thread.join(10.0)
            self._tick_thread = None
        if self._dicom is not None:
            self._dicom.stop()
            self._dicom = None
        if self.spool is not None:
            self.spool.stop()

    def settle(self) -> None:
        """Wait until every DICOM instance acknowledged so far is filed (see
        :meth:`DicomSpool.settle`); queries call this before they read."""
        if self.spool is not None:
            self.spool.settle()

    # --- keys, vault, outgoing guard, record facts -------------------------------
    def _init_keys(self) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        assert cfg.deid.key_file is not None and cfg.deid.vault_key_file is not None
        deid_key = load_or_create_key(cfg.deid.key_file, "de-identification key")
        vault_key = load_or_create_key(cfg.deid.vault_key_file, "pseudonym vault key")
        if deid_key == vault_key:
            raise ConfigError(
                f"{cfg.source}: deid.key_file and deid.vault_key_file hold the same key; "
                "they must be two different secrets"
            )
        self.deidentifier = Deidentifier(deid_key)
        self.vault = PseudonymVault(ctx.catalog, vault_key)
        self.identities = StudyIdentities(ctx.catalog, vault_key)
        self.release_records = ReleaseStore(ctx.catalog)
        case_records = CaseStore(ctx.catalog)
        self.outbound = OutboundGate(
            identifiers=self._case_identifiers,
            is_case_record=lambda oid: case_records.find_record(oid) is not None,
            scratch_dir=cfg.node.data_dir / "spool" / "outbound",
            limits=OutboundLimits(
                max_expanded_bytes=cfg.outbound.max_expanded_bytes,
                max_archive_members=cfg.outbound.max_archive_members,
                max_archive_depth=cfg.outbound.max_archive_depth,
            ),
            format_check=ctx.check_design_file,
        )
        self.guard = OutgoingGuard(self.vault, self.release_records, self.outbound)
        self.record_facts = HospitalRecordFacts(self.vault, self.release_records)

    def check_outgoing(self, obj: ObjectRecord, store: ObjectStore, peer: str) -> None:
        self.guard.check_outgoing(obj, store, peer)

    def check_case_record(self, ctx: RecordFacts) -> None:
        self.record_facts(ctx)

    def _case_identifiers(self, case_id: str) -> IdentifierMatcher:
        """What identifies the real patient of a case (for the outbound gate's scan)."""
        return case_identifiers(
            case_id,
            self.vault,
            self.release_records.study_uids_for_case(case_id) if case_id else [],
            self._first_original,
            self.ctx.store,
        )

    def _first_original(self, study_uid: str) -> str:
        for instance in self.studies.instances(study_uid):
            if not instance.duplicate:
                return instance.object_id
        return ""

    def check_receipt(
        self, obj: ObjectRecord, facts: Mapping[str, str], store: ObjectStore
    ) -> None:
        self.guard.check_receipt(obj, facts, store)


@dataclass(frozen=True)
class _ReleaseNode:
    """What the release uses of its node (:class:`hospital_node.release.NodeServices`)."""

    cfg: NodeConfig
    node_id: str
    identity: Identity
    catalog: Catalog
    store: ObjectStore
    audit: AuditLog
    outbox: Outbox
    sign: Callable[[bytes], bytes]


class HospitalRole(RoleHooks):
    """The hospital's own services on top of the core (step 2): confirmation and
    release, auto-forward, design export and the ``yigong.v1.Hospital`` service. The
    node starts, stops and serves through this object; the core's checks are
    :class:`HospitalHooks` (reached here as :attr:`hooks`)."""

    alert_on_type_refusal = True

    def __init__(self, hooks: HospitalHooks, ctx: RoleContext, core: CoreServices) -> None:
        self.hooks, self.ctx = hooks, ctx
        self.service_names = hooks.service_names
        self.cert_pem = ctx.cert_pem
        self._init_release(core)
        self._init_design_export(core)

    @property
    def cfg(self) -> NodeConfig:
        return self.ctx.cfg

    # The step-1 parts, by the names the role always had.
    @property
    def studies(self) -> StudyCatalog:
        return self.hooks.studies

    @property
    def spool(self) -> DicomSpool | None:
        return self.hooks.spool

    @property
    def dicom_port(self) -> int:
        return self.hooks.dicom_port

    @property
    def _dicom(self) -> DicomServer | None:
        return self.hooks._dicom

    @property
    def vault(self) -> PseudonymVault:
        return self.hooks.vault

    @property
    def identities(self) -> StudyIdentities:
        return self.hooks.identities

    @property
    def release_records(self) -> ReleaseStore:
        return self.hooks.release_records

    @property
    def guard(self) -> OutgoingGuard:
        return self.hooks.guard

    @property
    def outbound(self) -> OutboundGate:
        return self.hooks.outbound

    @property
    def record_facts(self) -> HospitalRecordFacts:
        return self.hooks.record_facts

    def start(self) -> None:
        self.hooks.start()
        self._start_release()

    def stop(self) -> None:
        self.hooks.stop()
        self._stop_release()

    def settle(self) -> None:
        self.hooks.settle()

    def check_outgoing(self, obj: ObjectRecord, store: ObjectStore, peer: str) -> None:
        self.hooks.check_outgoing(obj, store, peer)

    def check_case_record(self, ctx: RecordFacts) -> None:
        self.hooks.check_case_record(ctx)

    def check_receipt(
        self, obj: ObjectRecord, facts: Mapping[str, str], store: ObjectStore
    ) -> None:
        self.hooks.check_receipt(obj, facts, store)

    # --- release: confirmation, vault, de-identified sending ------------------------
    def _init_release(self, core: CoreServices) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        self.releaser = Releaser(
            _ReleaseNode(
                ctx.cfg, ctx.cfg.node.id, ctx.identity, ctx.catalog, ctx.store, ctx.audit,
                core.outbox, ctx.sign,
            ),
            self.vault,
            self.hooks.deidentifier,
            self.release_records,
            self._study_source,
            self.hooks.check_outgoing,
            vouch=self.hooks.guard.vouch,
        )  # fmt: skip
        self.hooks.on_study_waiting(self.releaser.study_waiting)  # large: warm the workers
        self._auto_stop = threading.Event()
        d = cfg.dicom
        if d.auto_forward_to and d.auto_forward_to not in core.outbox.settings.known_peers:
            raise ConfigError(
                f"{cfg.source}: dicom.auto_forward_to {d.auto_forward_to!r} is not a configured "
                "peer; add it under [[peers]]"
            )
        if d.auto_forward_called_ae and d.auto_forward_to:  # rule first seen: before any tick
            self.release_records.auto_forward_since(d.auto_forward_called_ae, d.auto_forward_to)
        self._auto_thread: threading.Thread | None = None
        self._orphan_thread: threading.Thread | None = None

    def console_pages(self, console: Console) -> Sequence[ConsolePages]:
        from hospital_node.wire.console import hospital_pages  # the console's adapter

        return [hospital_pages(console, self)]

    def add_services(self, server: Any, gate: Any) -> None:
        from hospital_node.wire.service import HospitalServicer
        from yigong.v1 import hospital_pb2_grpc

        hospital_pb2_grpc.add_HospitalServicer_to_server(HospitalServicer(gate, self), server)

    def _study_source(self) -> StudyCatalog:
        """The study tables (built by the ingest section), once every instance
        acknowledged so far is filed in them."""
        self.settle()
        return self.studies

    def _start_release(self) -> None:
        self.releaser.resume()
        if self.release_records.shared:
            # replicas on one catalog: releases whose replica went silent are finished here
            self._auto_stop.clear()
            self._orphan_thread = threading.Thread(
                target=self._orphan_loop, name="release-orphans", daemon=True
            )
            self._orphan_thread.start()
        d = self.cfg.dicom
        if not (d.auto_forward_called_ae and d.auto_forward_to):
            return
        allow = self.cfg.deid.allow_burned_in
        self.ctx.audit.record(
            "config.loaded",
            actor=f"node:{self.cfg.node.id}",
            peer=d.auto_forward_to,
            details={
                "auto_forward_called_ae": d.auto_forward_called_ae,
                "auto_forward_to": d.auto_forward_to,
                "allow_burned_in": allow,
            },
        )
        log.warning(
            "auto-forward is ON: studies received on AE title %s are released to %s "
            "without a clinician's confirmation",
            d.auto_forward_called_ae,
            d.auto_forward_to,
        )
        self._auto_stop.clear()
        self._auto_thread = threading.Thread(
            target=self._auto_forward_loop,
            args=(d.auto_forward_called_ae, d.auto_forward_to, allow),
            name="auto-forward",
            daemon=True,
        )
        self._auto_thread.start()

    def _auto_forward_loop(self, called_ae: str, destination: str, allow: bool) -> None:
        failed: set[str] = set()  # refused once (audited): not retried until restart
        while not self._auto_stop.wait(AUTO_FORWARD_INTERVAL_SECONDS):
            try:
                self.auto_forward_due(called_ae, destination, allow, failed)
            except Exception:  # keep the rule running; the next round retries
                log.exception("auto-forward round failed")

    def auto_forward_due(
        self, called_ae: str, destination: str, allow: bool, failed: set[str]
    ) -> list[ConfirmResult]:
        """Release each study that became 'received' after the rule was first seen and
        whose instances all arrived on ``called_ae`` (each use audited by the release)."""
        since = self.release_records.auto_forward_since(called_ae, destination)
        studies = self._study_source()
        done: list[ConfirmResult] = []
        for summary in studies.list_studies(status="received", limit=1000):
            uid = summary.study_uid
            if (summary.received_at or summary.last_received_at) < since or uid in failed:
                continue
            case_id = self.vault.derived_case_id(uid)
            if self.release_records.find_confirmation(uid, case_id, destination) is not None:
                continue
            instances = studies.instances(uid)
            if not instances or any(i.called_ae != called_ae for i in instances):
                continue
            try:
                done.append(self.releaser.auto_forward(uid, destination, called_ae, allow))
            except YigongError as exc:
                failed.add(uid)
                log.error("auto-forward of study %s to %s refused: %s", uid, destination, exc)
        return done

    def _orphan_loop(self) -> None:
        lease = self.cfg.database.replica_lease_seconds
        while not self._auto_stop.wait(lease):
            try:
                if queued := self.releaser.resume(orphans_only=True):
                    log.info("release: %d send(s) of a silent replica's release queued", queued)
            except Exception:  # keep looking; the next round retries
                log.exception("release: taking over a silent replica's release failed")

    def _stop_release(self) -> None:
        self._auto_stop.set()
        for thread in (self._auto_thread, self._orphan_thread):
            if thread is not None:
                thread.join(10.0)
        self._auto_thread = self._orphan_thread = None
        self.releaser.close()  # the de-identification workers

    # --- design export: approved designs into the hospital's PACS (Encapsulated STL) -----
    def _init_design_export(self, core: CoreServices) -> None:
        from hospital_node.wire.pacs_scu import send_to_pacs  # the only pynetdicom SCU

        ctx = self.ctx
        self.design_exporter = DesignExporter(
            node_id=ctx.cfg.node.id,
            pacs=lambda: ctx.cfg.pacs,  # the configuration in force at each export
            calling_ae=ctx.cfg.dicom.ae_title,
            catalog=ctx.catalog,
            store=ctx.store,
            audit=ctx.audit,
            vault=self.vault,
            releases=self.release_records,
            cases=core.cases,
            uid_map=self.releaser.map_uid_for,
            send=send_to_pacs,
        )

    def export_design(
        self, caller: Identity, case_id: str, object_id: str, *, again: bool, dry_run: bool
    ) -> ExportResult:
        return self.design_exporter.export_design(
            case_id, object_id, caller=caller, again=again, dry_run=dry_run
        )

    # Domain side of yigong.v1.Hospital (every call audited as 'query' or 'case.confirmation').
    def list_studies(
        self,
        caller: Identity,
        status: str = "",
        limit: int = 0,
        *,
        before: tuple[str, str] | None = None,
    ) -> list[StudyListing]:
        """Newest first; ``before``: the page after ``(last_received_at, study_uid)``."""
        if status not in ("", "receiving", "received"):
            raise ValidationError("status must be 'receiving', 'received' or empty (any)")
        if not 0 <= limit <= 1000:
            raise ValidationError("limit must be between 1 and 1000 (0 = 100)")
        found = list(
            self._study_source().list_studies(status=status, limit=limit or 100, before=before)
        )
        self._audit_query(caller, "hospital.list_studies", count=len(found), status=status)
        return self._listings(caller, found)

    def get_study(self, caller: Identity, study_uid: str) -> StudyView:
        studies = self._study_source()
        summary = studies.get_study(study_uid)
        confirmations = self.release_records.confirmations(study_uid)
        releases: dict[str, list[ReleaseView]] = {}
        for c in confirmations:
            for r in self.release_records.releases(c.confirmation_id):
                t = None
                if r.transfer_id:
                    t = self.ctx.catalog.find_transfer(r.transfer_id, "outbound")
                releases.setdefault(r.source_object_id, []).append(
                    ReleaseView(r, c.destination, t.status if t else "", t.last_error if t else "")
                )
        self._audit_query(caller, "hospital.get_study", study_uid=study_uid)
        (listing,) = self._listings(caller, [summary])
        instances = list(studies.instances(study_uid))
        return StudyView(summary, confirmations, instances, releases, listing)

    def _listings(self, caller: Identity, summaries: list[Any]) -> list[StudyListing]:
        """Each study with its cases (and pseudonyms) and — for the hospital's clinicians
        and the node itself only (:func:`gateway.authz.may_see_identity`) — whom it is of.
        Every study whose identity is shown is audited by its UID, never a value."""
        node = authz.NodeSelf(self.cfg.node.id, self.cfg.node.role)
        visible = authz.may_see_identity(caller, node)
        uids = [s.study_uid for s in summaries]
        identities = self.identities.many(uids) if visible else {}
        if identities:
            with self.ctx.audit.batch():
                for uid in uids:
                    if uid in identities:
                        self.ctx.audit.record(
                            QUERY,
                            actor=caller.label(),
                            details={"query": "hospital.study_identity", "study_instance_uid": uid},
                        )
        return [
            StudyListing(
                s,
                identities.get(s.study_uid),
                not visible,
                self.studies.modalities(s.study_uid),
                tuple(self._cases_of(s.study_uid)),
            )
            for s in summaries
        ]

    def _cases_of(self, study_uid: str) -> list[StudyCase]:
        return [self.study_case(c) for c in self.release_records.confirmations(study_uid)]

    def study_case(self, c: Confirmation) -> StudyCase:
        """The case of confirmation ``c`` with the vault's pseudonym (what its order names)
        and the de-identified study UID (what its data confirmation names)."""
        try:
            deid_uid = str(json.loads(c.record).get("deid_study_uid", ""))
        except ValueError:
            deid_uid = ""
        pseudonym = self.vault.issued_pseudonym(c.case_id, c.destination) or ""
        return StudyCase(c.case_id, pseudonym, c.destination, c.confirmation_id, deid_uid)

    def confirm_study(
        self,
        caller: Identity,
        study_uid: str,
        case_id: str,
        destination: str,
        allow_burned_in: bool = False,
    ) -> ConfirmResult:
        return self.releaser.confirm(
            caller, study_uid, case_id, destination, allow_burned_in=allow_burned_in
        )

    def _audit_query(self, caller: Identity, what: str, **details: str | int) -> None:
        self.ctx.audit.record("query", actor=caller.label(), details={"query": what, **details})
