"""Thin gRPC servicer of ``yigong.v1.Factory``: wire → :class:`FactoryRole` → wire.

Authentication and authorization already happened in the interceptor
(``gateway.authz``: the node itself, engineers and officers of this node); the
servicer asks the gatekeeper for the caller's identity, calls the domain (which
audits the query) and converts the answer or error.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import grpc

from factory_node.studies import StudySummary, SuitabilityRecord
from factory_node.suitability import SeriesVerdict
from gateway.rpc.auth import Gatekeeper, wire_errors
from yigong.v1 import factory_pb2, factory_pb2_grpc

if TYPE_CHECKING:
    from factory_node.role import FactoryRole, StudyDetail


class FactoryServicer(factory_pb2_grpc.FactoryServicer):
    def __init__(self, gate: Gatekeeper, role: FactoryRole) -> None:
        self.gate = gate
        self.role = role

    def ListStudies(
        self, request: factory_pb2.ListFactoryStudiesRequest, context: grpc.ServicerContext
    ) -> factory_pb2.ListFactoryStudiesResponse:
        with wire_errors(context, "Factory.ListStudies"):
            found = self.role.list_studies(
                self.gate.identity(context), request.case_id, request.limit
            )
            return factory_pb2.ListFactoryStudiesResponse(
                studies=[study_to_pb(s, self.role.is_current(s)) for s in found]
            )
        raise AssertionError("unreachable")

    def GetStudy(
        self, request: factory_pb2.GetFactoryStudyRequest, context: grpc.ServicerContext
    ) -> factory_pb2.FactoryStudy:
        with wire_errors(context, "Factory.GetStudy"):
            detail = self.role.get_study(
                self.gate.identity(context), request.study_uid, request.case_id
            )
            return detail_to_pb(detail)
        raise AssertionError("unreachable")


def thresholds_to_pb(t: dict[str, Any]) -> factory_pb2.SuitabilityThresholds:
    fields = factory_pb2.SuitabilityThresholds.DESCRIPTOR.fields_by_name
    return factory_pb2.SuitabilityThresholds(**{k: v for k, v in t.items() if k in fields})


def result_to_pb(r: SuitabilityRecord, current: bool) -> factory_pb2.SuitabilityResult:
    return factory_pb2.SuitabilityResult(
        passed=r.passed,
        findings=list(r.findings),
        thresholds=thresholds_to_pb(r.thresholds),
        checked_at=r.checked_at,
        instance_count=r.instance_count,
        current=current,
        thresholds_json=json.dumps(r.thresholds, sort_keys=True),
    )


def study_to_pb(s: StudySummary, current: bool) -> factory_pb2.FactoryStudy:
    msg = factory_pb2.FactoryStudy(
        case_id=s.case_id,
        study_uid=s.study_uid,
        instance_count=s.instance_count,
        series_count=s.series_count,
        first_received_at=s.first_received_at,
        last_received_at=s.last_received_at,
    )
    if s.latest is not None:
        msg.suitability.CopyFrom(result_to_pb(s.latest, current))
    return msg


def series_to_pb(v: SeriesVerdict) -> factory_pb2.SeriesAnalysis:
    r = v.report
    msg = factory_pb2.SeriesAnalysis(
        series_uid=r.series_uid,
        instance_count=r.instance_count,
        orientation_consistent=r.orientation_consistent,
        slice_thickness_mm=list(r.slice_thickness_mm),
        spacing_uniform=r.spacing_uniform,
        missing_slices_estimate=r.missing_slices_estimate,
        duplicate_positions=r.duplicate_positions,
        gantry_tilt_deg=r.gantry_tilt_deg,
        passed=v.passed,
        findings=list(v.findings),
        report=json.dumps(r.to_dict()),
    )
    for name in ("spacing_min_mm", "spacing_max_mm", "spacing_median_mm"):
        value = getattr(r, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def detail_to_pb(d: StudyDetail) -> factory_pb2.FactoryStudy:
    # GetStudy checked the study first if its latest result was not current.
    msg = study_to_pb(d.summary, True)
    if d.latest is not None:
        msg.suitability.CopyFrom(result_to_pb(d.latest, True))
    msg.series.extend(series_to_pb(v) for v in d.series)
    msg.instances.extend(
        factory_pb2.FactoryInstance(
            object_id=i.object_id, series_uid=i.series_uid, sop_instance_uid=i.sop_instance_uid
        )
        for i in d.instances
    )
    return msg
