"""The hospital node's additions to the core (see :mod:`gateway.roles`).

Sections (each owned by one feature; keep them separate):

- ingest (SCP): the DICOM SCP, study assembly and the quiet-period ticker.
- release: the de-identification and vault keys, clinician confirmation and
  de-identified release (:mod:`hospital_node.release`), the outgoing guard and the
  receipt check (:mod:`hospital_node.guard`), the ``yigong.v1.Hospital`` service
  (:mod:`hospital_node.service`) and the auto-forward rule.
- design export: approved designs into the hospital's own PACS as Encapsulated STL
  (:mod:`hospital_node.design_export`), served as ``Hospital.ExportDesign``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway import authz
from gateway.audit import QUERY
from gateway.errors import ConfigError, ValidationError, YigongError
from gateway.roles import RoleHooks
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
from hospital_node.scp import DicomServer
from hospital_node.spool import DicomSpool
from hospital_node.studies import StudyCatalog
from hospital_node.study_identity import StudyIdentities
from hospital_node.vault import PseudonymVault, load_or_create_key

if TYPE_CHECKING:
    from gateway.cases.facts import RecordFacts
    from gateway.catalog import ObjectRecord
    from gateway.identity import Identity
    from gateway.server import Node
    from gateway.storage import ObjectStore

log = logging.getLogger(__name__)

AUTO_FORWARD_INTERVAL_SECONDS = 1.0


class HospitalRole(RoleHooks):
    def __init__(self, node: Node) -> None:
        self.node = node
        self._init_ingest()
        self._init_release()
        self._init_design_export()

    def start(self) -> None:
        self._start_ingest()
        self._start_release()

    def stop(self) -> None:
        self._stop_ingest()
        self._stop_release()

    # --- ingest (SCP): DICOM listener, study assembly, quiet-period ticker ----------
    def _init_ingest(self) -> None:
        self.studies = StudyCatalog(self.node.catalog)
        self.dicom_port = 0
        self.spool: DicomSpool | None = None
        self._dicom: DicomServer | None = None
        self._tick_stop = threading.Event()
        self._tick_thread: threading.Thread | None = None

    def _start_ingest(self) -> None:
        node, cfg = self.node, self.node.cfg.dicom
        if not cfg.enabled:
            return
        ingest = Ingest(
            node.store, node.catalog, self.studies, node.audit, node.cfg.node.id,
            self.identities,
        )  # fmt: skip
        self.spool = DicomSpool(ingest, cfg.spool_path, max_waiting=cfg.spool_max_waiting)
        self.spool.start()
        self._dicom = DicomServer(
            cfg, self.spool, node.audit, node.cfg.node.id, telemetry=node.telemetry
        )
        self.dicom_port = self._dicom.start()
        self._tick_stop.clear()
        self._tick_thread = threading.Thread(
            target=self._tick_loop, name="study-quiet", daemon=True
        )
        self._tick_thread.start()

    def _tick_loop(self) -> None:
        quiet = self.node.cfg.dicom.quiet_period_seconds
        while not self._tick_stop.wait(min(1.0, max(0.05, quiet / 4))):
            if self.spool is not None and self.spool.waiting:
                continue  # a study is not quiet while its instances may still be filed
            try:
                done = self.studies.tick(datetime.now(UTC), quiet)
                self.releaser.studies_received(self.studies, done)  # large: start workers
            except Exception:  # keep ticking; the next round retries
                log.exception("study quiet-period check failed")

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

    # --- release: confirmation, vault, de-identified sending ------------------------
    def _init_release(self) -> None:
        from yigong.v1 import hospital_pb2

        node, cfg = self.node, self.node.cfg
        self.service_names = (hospital_pb2.DESCRIPTOR.services_by_name["Hospital"].full_name,)
        assert cfg.deid.key_file is not None and cfg.deid.vault_key_file is not None
        deid_key = load_or_create_key(cfg.deid.key_file, "de-identification key")
        vault_key = load_or_create_key(cfg.deid.vault_key_file, "pseudonym vault key")
        if deid_key == vault_key:
            raise ConfigError(
                f"{cfg.source}: deid.key_file and deid.vault_key_file hold the same key; "
                "they must be two different secrets"
            )
        self.vault = PseudonymVault(node.catalog, vault_key)
        self.identities = StudyIdentities(node.catalog, vault_key)
        self.release_records = ReleaseStore(node.catalog)
        self.outbound = OutboundGate(
            identifiers=self._case_identifiers,
            is_case_record=lambda oid: node.cases.cases.find_record(oid) is not None,
            scratch_dir=cfg.node.data_dir / "spool" / "outbound",
            limits=OutboundLimits(
                max_expanded_bytes=cfg.outbound.max_expanded_bytes,
                max_archive_members=cfg.outbound.max_archive_members,
                max_archive_depth=cfg.outbound.max_archive_depth,
            ),
            format_check=node.check_design_file,
        )
        self.guard = OutgoingGuard(self.vault, self.release_records, self.outbound)
        node.exchange.alert_on_type_refusal = True  # a mis-declared upload: security alert
        self.record_facts = HospitalRecordFacts(self.vault, self.release_records)
        self.releaser = Releaser(
            node,
            self.vault,
            Deidentifier(deid_key),
            self.release_records,
            self._study_source,
            self.check_outgoing,
            vouch=self.guard.vouch,
        )
        self._auto_stop = threading.Event()
        d = cfg.dicom
        if d.auto_forward_to and d.auto_forward_to not in node.outbox.settings.known_peers:
            raise ConfigError(
                f"{cfg.source}: dicom.auto_forward_to {d.auto_forward_to!r} is not a configured "
                "peer; add it under [[peers]]"
            )
        if d.auto_forward_called_ae and d.auto_forward_to:  # rule first seen: before any tick
            self.release_records.auto_forward_since(d.auto_forward_called_ae, d.auto_forward_to)
        self._auto_thread: threading.Thread | None = None

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
            self.node.store,
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

    def add_services(self, server: Any, gate: Any) -> None:
        from hospital_node.service import HospitalServicer
        from yigong.v1 import hospital_pb2_grpc

        hospital_pb2_grpc.add_HospitalServicer_to_server(HospitalServicer(gate, self), server)

    def _study_source(self) -> StudyCatalog:
        """The study tables (built by the ingest section), once every instance
        acknowledged so far is filed in them."""
        self.settle()
        return self.studies

    def _start_release(self) -> None:
        self.releaser.resume()
        d = self.node.cfg.dicom
        if not (d.auto_forward_called_ae and d.auto_forward_to):
            return
        allow = self.node.cfg.deid.allow_burned_in
        self.node.audit.record(
            "config.loaded",
            actor=f"node:{self.node.cfg.node.id}",
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

    def _stop_release(self) -> None:
        self._auto_stop.set()
        if self._auto_thread is not None:
            self._auto_thread.join(10.0)
            self._auto_thread = None
        self.releaser.close()  # the de-identification workers

    # --- design export: approved designs into the hospital's PACS (Encapsulated STL) -----
    def _init_design_export(self) -> None:
        from hospital_node.pacs_scu import send_to_pacs  # the only pynetdicom SCU

        node = self.node
        self.design_exporter = DesignExporter(
            node_id=node.cfg.node.id,
            pacs=lambda: node.cfg.pacs,
            calling_ae=node.cfg.dicom.ae_title,
            catalog=node.catalog,
            store=node.store,
            audit=node.audit,
            vault=self.vault,
            releases=self.release_records,
            cases=lambda: node.cases,  # built by the Node after its role hooks
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
        self, caller: Identity, status: str = "", limit: int = 0
    ) -> list[StudyListing]:
        if status not in ("", "receiving", "received"):
            raise ValidationError("status must be 'receiving', 'received' or empty (any)")
        if not 0 <= limit <= 1000:
            raise ValidationError("limit must be between 1 and 1000 (0 = 100)")
        found = list(self._study_source().list_studies(status=status, limit=limit or 100))
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
                    t = self.node.catalog.find_transfer(r.transfer_id, "outbound")
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
        node = authz.NodeSelf(self.node.cfg.node.id, self.node.cfg.node.role)
        visible = authz.may_see_identity(caller, node)
        uids = [s.study_uid for s in summaries]
        identities = self.identities.many(uids) if visible else {}
        if identities:
            with self.node.audit.batch():
                for uid in uids:
                    if uid in identities:
                        self.node.audit.record(
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
        self.node.audit.record("query", actor=caller.label(), details={"query": what, **details})
