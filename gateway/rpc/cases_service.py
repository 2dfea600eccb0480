"""The thin ``yigong.v1.Case`` servicer: wire → :class:`CaseService` → wire.

Authentication and authorization happened in the interceptor
(``gateway/authz.py``: CreateCase clinicians; SubmitRecord clinicians and
engineers; GetCase/ListCases the node itself, clinicians, engineers, officers).
"""

from __future__ import annotations

import grpc

from gateway.cases.service import CaseService
from gateway.cases.views import CaseView
from gateway.errors import AuthenticationError
from gateway.rpc.auth import Gatekeeper, wire_errors
from yigong.v1 import case_pb2, case_pb2_grpc

SERVICE_NAME = case_pb2.DESCRIPTOR.services_by_name["Case"].full_name


def add_case_service(server: grpc.Server, gate: Gatekeeper, cases: CaseService) -> None:
    """Register the Case service on ``server`` (call before ``server.start()``)."""
    case_pb2_grpc.add_CaseServicer_to_server(CaseServicer(gate, cases), server)


class CaseServicer(case_pb2_grpc.CaseServicer):
    def __init__(self, gate: Gatekeeper, cases: CaseService) -> None:
        self.gate = gate
        self.cases = cases

    def CreateCase(
        self, request: case_pb2.CreateCaseRequest, context: grpc.ServicerContext
    ) -> case_pb2.CaseView:
        with wire_errors(context, "Case.CreateCase"):
            caller = self.gate.identity(context)
            return view_to_pb(self.cases.create(caller, request.case_id, request.manufacturer))
        raise AssertionError("unreachable")

    def SubmitRecord(
        self, request: case_pb2.SubmitRecordRequest, context: grpc.ServicerContext
    ) -> case_pb2.CaseView:
        with wire_errors(context, "Case.SubmitRecord"):
            caller = self.gate.identity(context)
            pem = self.gate.client_pem(context)
            if pem is None:
                raise AuthenticationError("no client certificate on this call")
            view = self.cases.submit(caller, pem, request.record, request.author_signature)
            return view_to_pb(view)
        raise AssertionError("unreachable")

    def GetCase(
        self, request: case_pb2.GetCaseRequest, context: grpc.ServicerContext
    ) -> case_pb2.CaseView:
        with wire_errors(context, "Case.GetCase"):
            caller = self.gate.identity(context)
            return view_to_pb(self.cases.show(caller, request.case_id))
        raise AssertionError("unreachable")

    def ListCases(
        self, request: case_pb2.ListCasesRequest, context: grpc.ServicerContext
    ) -> case_pb2.ListCasesResponse:
        with wire_errors(context, "Case.ListCases"):
            caller = self.gate.identity(context)
            views = self.cases.list_cases(caller, request.limit)
            return case_pb2.ListCasesResponse(cases=[view_to_pb(v, records=False) for v in views])
        raise AssertionError("unreachable")


def view_to_pb(view: CaseView, *, records: bool = True) -> case_pb2.CaseView:
    c = view.case
    return case_pb2.CaseView(
        case_id=c.case_id,
        hospital=c.hospital,
        manufacturer=c.manufacturer,
        created_at=c.created_at,
        created_by=c.created_by,
        stage=view.stage,
        next=[
            case_pb2.NextAction(
                role=a.role, node=a.node, record_types=a.record_types, description=a.description
            )
            for a in view.next
        ],
        verified=view.ok,
        problem=view.problem,
        head_hash=view.head_hash,
        next_seq=view.next_seq,
        records=[
            case_pb2.CaseRecord(
                seq=r.seq,
                type=r.type,
                author=r.author,
                node_id=r.node_id,
                time=r.time,
                record_hash=r.record_hash,
                prev_hash=r.prev_hash,
                verified=r.ok,
                problem=r.problem,
                origin=r.origin,
                exchange=r.exchange,
                envelope=r.envelope,
                record_json=r.record_json,
            )
            for r in (view.records if records else ())
        ],
        pending=view.pending,
        rejected=[
            case_pb2.RejectedRecord(seq=seq, record_hash=h, kind=kind, reason=reason)
            for seq, h, kind, reason in view.rejected
        ],
    )
