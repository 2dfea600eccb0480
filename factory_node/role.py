"""The factory node's additions to the core (see :mod:`gateway.roles`).

Registered with the composition root by :mod:`factory_node.registration`: the hooks
(:class:`FactoryRole`) are built from the node's infrastructure only; the node starts,
stops and serves through :class:`FactoryNodeRole`, the same hooks plus the core's
exchange and query service for the engineer's console pages (:mod:`factory_node.wire.console`).

- On receipt (:meth:`FactoryRole.receipt_facts`) every ``application/dicom`` object
  is re-parsed from the store; its SOP Instance UID, pixel-data hash and geometry
  hash (:mod:`gateway.fidelity.dicom`) and Study/Series Instance UIDs go into the
  signed receipt, so the hospital can compare them with its own. The instance is
  recorded per case and study (:mod:`factory_node.studies`) and the study's
  suitability check is scheduled (:mod:`factory_node.suitability`).
- The query side (:meth:`FactoryRole.list_studies`, :meth:`FactoryRole.get_study`)
  backs the ``yigong.v1.Factory`` service (:mod:`factory_node.wire.service`); every call
  is audited as ``query``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from factory_node.record_facts import FactoryRecordFacts
from factory_node.studies import (
    ReceivedInstance,
    StudyStore,
    StudySummary,
    SuitabilityRecord,
)
from factory_node.suitability import SeriesVerdict, SuitabilityMonitor
from gateway.audit import FIDELITY_RESULT, QUERY
from gateway.errors import ValidationError
from gateway.fidelity.dicom import (
    FACT_GEOMETRY_SHA256,
    FACT_PARSE_ERROR,
    FACT_PIXEL_SHA256,
    FACT_SERIES_UID,
    FACT_SOP_INSTANCE_UID,
    FACT_STUDY_UID,
    PIXEL_DATA_TAGS,
    geometry_hash,
    pixel_hash,
)
from gateway.fidelity.series import SliceGeometry, slice_geometry
from gateway.roles import CoreServices, RoleContext, RoleHooks

if TYPE_CHECKING:
    from collections.abc import Sequence

    from gateway.cases.facts import RecordFacts
    from gateway.identity import Identity
    from gateway.storage import ObjectStore
    from gateway.transfer.model import Announce
    from gateway.web.app import Console, ConsolePages

log = logging.getLogger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
UNDEFINED_LENGTH = 0xFFFFFFFF
SPOOL_IN_MEMORY_BYTES = 64 * 1024 * 1024
"""Objects up to this size are re-parsed from memory; larger ones from a temporary file."""
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def is_dicom(media_type: str) -> bool:
    return media_type.split(";", 1)[0].strip().lower() == DICOM_MEDIA_TYPE


@dataclass(frozen=True)
class StudyDetail:
    """A study, its latest suitability result and the per-series analysis now."""

    summary: StudySummary
    latest: SuitabilityRecord | None
    series: tuple[SeriesVerdict, ...]
    instances: tuple[ReceivedInstance, ...] = ()
    """The parsed instances received, one per SOP Instance UID (the latest object)."""


class FactoryRole(RoleHooks):
    def __init__(self, ctx: RoleContext) -> None:
        from yigong.v1 import factory_pb2

        self.ctx = ctx
        self.service_names = (factory_pb2.DESCRIPTOR.services_by_name["Factory"].full_name,)
        self.studies = StudyStore(ctx.catalog)
        self.record_facts = FactoryRecordFacts(self.studies, ctx.store)
        self.monitor = SuitabilityMonitor(
            self.studies, ctx.audit, ctx.cfg.suitability, ctx.cfg.node.id
        )

    # -- hooks ------------------------------------------------------------
    def receipt_facts(self, announce: Announce, store: ObjectStore) -> Mapping[str, str]:
        """Re-parse a received DICOM instance; its UIDs and hashes go into the receipt.

        The bytes were already verified against their SHA-256, so an object that does
        not parse is still received: the receipt says why (``dicom.parse_error``) and
        the hospital's receipt check refuses the mismatch.
        """
        if not is_dicom(announce.media_type):
            return {}
        try:
            facts, geometry = _parse(announce, store)
        except _Unparseable as exc:
            reason = str(exc)
            added = self.studies.record_instance(
                object_id=announce.object_id, case_id=announce.case_id, parse_error=reason
            )
            if not added:  # a receipt re-issued for an object already recorded
                return {FACT_PARSE_ERROR: reason}
            self.ctx.audit.record(
                FIDELITY_RESULT,
                actor=f"node:{self.ctx.cfg.node.id}",
                outcome="failure",
                object_id=announce.object_id,
                case_id=announce.case_id or None,
                details={"check": "dicom.parse", "reason": reason},
            )
            log.warning(
                "object %s is not a readable DICOM instance: %s", announce.object_id, reason
            )
            return {FACT_PARSE_ERROR: reason}
        added = self.studies.record_instance(
            object_id=announce.object_id,
            case_id=announce.case_id,
            study_uid=facts[FACT_STUDY_UID],
            series_uid=facts[FACT_SERIES_UID],
            sop_instance_uid=facts[FACT_SOP_INSTANCE_UID],
            geometry=geometry,
        )
        if added:  # not for a receipt re-issued for an object already recorded
            self.monitor.touch(announce.case_id, facts[FACT_STUDY_UID])
        return facts

    def check_case_record(self, ctx: RecordFacts) -> None:
        self.record_facts(ctx)

    def add_services(self, server: Any, gate: Any) -> None:
        from factory_node.wire.service import FactoryServicer
        from yigong.v1 import factory_pb2_grpc

        factory_pb2_grpc.add_FactoryServicer_to_server(FactoryServicer(gate, self), server)

    def start(self) -> None:
        # Studies left unchecked by a stop, or checked under other thresholds.
        for summary in self.studies.list_studies(limit=MAX_LIMIT):
            if not self.monitor.is_current(summary):
                self.monitor.touch(summary.case_id, summary.study_uid)
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.stop(flush=True)

    # -- query (domain side of yigong.v1.Factory) ---------------------------
    def list_studies(
        self, caller: Identity, case_id: str = "", limit: int = 0, *, offset: int = 0
    ) -> list[StudySummary]:
        if offset < 0:
            raise ValidationError("offset must be 0 or more")
        found = self.studies.list_studies(case_id, _limit(limit), offset)
        details: dict[str, str | int] = {"count": len(found)}
        if offset:
            details["offset"] = offset
        self._audit(caller, "factory.list_studies", case_id, **details)
        return found

    def get_study(self, caller: Identity, study_uid: str, case_id: str = "") -> StudyDetail:
        """The study; its suitability is checked (and recorded) first if not current."""
        summary = self.studies.study(study_uid, case_id)
        if self.monitor.is_current(summary):
            _, verdict = self.monitor.evaluate(summary.case_id, summary.study_uid)
            latest = summary.latest
        else:
            latest, verdict = self.monitor.check(summary.case_id, summary.study_uid)
        self._audit(caller, "factory.get_study", summary.case_id, study_uid=study_uid)
        instances = tuple(self.studies.instances(summary.case_id, summary.study_uid))
        return StudyDetail(summary, latest, verdict.series, instances)

    def is_current(self, summary: StudySummary) -> bool:
        """Whether the study's latest result covers every instance, under today's thresholds."""
        return self.monitor.is_current(summary)

    def _audit(self, caller: Identity, what: str, case_id: str, **details: str | int) -> None:
        self.ctx.audit.record(
            QUERY,
            actor=caller.label(),
            case_id=case_id or None,
            details={"query": what, **details},
        )


class FactoryNodeRole(FactoryRole):
    """The factory role on top of the core (step 2): the hooks of step 1 (their study
    store, record facts and suitability monitor, shared, not copied) plus the core
    services the engineer's console pages use: the exchange (a design file uploaded goes
    the way of Exchange.Submit) and the query service (a download is the Query
    service's ReadObject). The node starts, stops and serves through this object."""

    def __init__(self, hooks: FactoryRole, ctx: RoleContext, core: CoreServices) -> None:
        self.ctx = ctx
        self.service_names = hooks.service_names
        self.studies = hooks.studies
        self.record_facts = hooks.record_facts
        self.monitor = hooks.monitor
        self.exchange = core.exchange
        self.query = core.query

    def console_pages(self, console: Console) -> Sequence[ConsolePages]:
        from factory_node.wire.console import factory_pages

        return (factory_pages(console, self),)


def _limit(value: int) -> int:
    if value < 0 or value > MAX_LIMIT:
        raise ValidationError(f"limit must be between 1 and {MAX_LIMIT} (0 = {DEFAULT_LIMIT})")
    return value or DEFAULT_LIMIT


class _Unparseable(Exception):
    pass


def _incomplete(ds: Dataset) -> str | None:
    """Why a parsed instance is evidently cut short (pydicom reads truncated files)."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.length != UNDEFINED_LENGTH
            and isinstance(raw.value, bytes)
            and len(raw.value) < raw.length
        ):
            return f"element {tag} is truncated"
    sop_class = UID(str(ds.get("SOPClassUID", "") or ""))
    if "Image Storage" in sop_class.name and not any(t in ds for t in PIXEL_DATA_TAGS):
        return "image without pixel data"
    return None


def _parse(announce: Announce, store: ObjectStore) -> tuple[dict[str, str], SliceGeometry]:
    """Facts and slice geometry of the stored object, or raise _Unparseable."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY_BYTES) as fh:
        with store.open_read(announce.object_id) as chunks:
            for chunk in chunks:
                fh.write(chunk)
        fh.seek(0)
        try:
            ds = dcmread(fh)
            problem = _incomplete(ds)
            if problem:
                raise _Unparseable(f"not a complete DICOM Part-10 instance: {problem}")
            facts = {
                FACT_SOP_INSTANCE_UID: str(ds.get("SOPInstanceUID", "") or "").strip(),
                FACT_STUDY_UID: str(ds.get("StudyInstanceUID", "") or "").strip(),
                FACT_SERIES_UID: str(ds.get("SeriesInstanceUID", "") or "").strip(),
                FACT_PIXEL_SHA256: pixel_hash(ds),
                FACT_GEOMETRY_SHA256: geometry_hash(ds),
            }
            geometry = slice_geometry(ds)
        except _Unparseable:
            raise
        except Exception as exc:  # any parser failure: say what kind, never the content
            raise _Unparseable(
                f"not a readable DICOM Part-10 instance ({type(exc).__name__})"
            ) from exc
    if not facts[FACT_SOP_INSTANCE_UID]:
        raise _Unparseable("DICOM instance without SOP Instance UID")
    return facts, geometry
