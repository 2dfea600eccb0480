"""Thin gRPC servicer of ``yigong.v1.Hospital``: wire → :class:`HospitalRole` → wire.

Authentication and authorization already happened in the interceptor
(``gateway.authz``: listings for the node itself, clinicians and officers of this node;
ConfirmStudy and ExportDesign for its clinicians only). The servicer asks the gatekeeper for the
caller's identity, calls the domain (which audits) and converts the answer or error.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import grpc

from gateway.rpc.auth import Gatekeeper, wire_errors
from hospital_node.release_store import Confirmation, ReleaseView, StudyCase, StudyListing
from yigong.v1 import hospital_pb2, hospital_pb2_grpc

if TYPE_CHECKING:
    from hospital_node.role import HospitalRole
    from hospital_node.studies import InstanceRecord, StudySummary


class HospitalServicer(hospital_pb2_grpc.HospitalServicer):
    def __init__(self, gate: Gatekeeper, role: HospitalRole) -> None:
        self.gate = gate
        self.role = role

    def ListStudies(
        self, request: hospital_pb2.ListHospitalStudiesRequest, context: grpc.ServicerContext
    ) -> hospital_pb2.ListHospitalStudiesResponse:
        with wire_errors(context, "Hospital.ListStudies"):
            found = self.role.list_studies(
                self.gate.identity(context), request.status, request.limit
            )
            return hospital_pb2.ListHospitalStudiesResponse(
                studies=[listing_to_pb(s) for s in found]
            )
        raise AssertionError("unreachable")

    def GetStudy(
        self, request: hospital_pb2.GetHospitalStudyRequest, context: grpc.ServicerContext
    ) -> hospital_pb2.HospitalStudy:
        with wire_errors(context, "Hospital.GetStudy"):
            view = self.role.get_study(self.gate.identity(context), request.study_uid)
            cert = self.role.cert_pem
            listing = view.listing
            cases = {c.confirmation_id: c for c in listing.cases} if listing else {}
            return hospital_pb2.HospitalStudy(
                study=listing_to_pb(listing) if listing else summary_to_pb(view.summary),
                confirmations=[
                    confirmation_to_pb(c, cert, cases.get(c.confirmation_id))
                    for c in view.confirmations
                ],
                instances=[
                    instance_to_pb(i, view.releases.get(i.object_id, [])) for i in view.instances
                ],
            )
        raise AssertionError("unreachable")

    def ConfirmStudy(
        self, request: hospital_pb2.ConfirmStudyRequest, context: grpc.ServicerContext
    ) -> hospital_pb2.ConfirmStudyResponse:
        with wire_errors(context, "Hospital.ConfirmStudy"):
            result = self.role.confirm_study(
                self.gate.identity(context),
                request.study_uid,
                request.case_id,
                request.destination,
                request.allow_burned_in,
            )
            c = result.confirmation
            releases = [
                ReleaseView(r, c.destination, "queued" if r.transfer_id else "", "")
                for r in result.instances
            ]
            return hospital_pb2.ConfirmStudyResponse(
                confirmation=confirmation_to_pb(
                    c, self.role.cert_pem, self.role.study_case(c)
                ),
                transfer_ids=result.transfer_ids,
                instances=[release_instance_to_pb(v) for v in releases],
            )
        raise AssertionError("unreachable")

    def ExportDesign(
        self, request: hospital_pb2.ExportDesignRequest, context: grpc.ServicerContext
    ) -> hospital_pb2.ExportDesignResponse:
        with wire_errors(context, "Hospital.ExportDesign"):
            r = self.role.export_design(
                self.gate.identity(context),
                request.case_id,
                request.object_id,
                again=request.again,
                dry_run=request.dry_run,
            )
            return hospital_pb2.ExportDesignResponse(
                sop_instance_uid=r.sop_instance_uid,
                study_instance_uid=r.study_uid,
                series_instance_uid=r.series_uid,
                pacs=r.pacs,
                status=r.status,
                source_series_uid=r.source_series_uid,
            )
        raise AssertionError("unreachable")


def summary_to_pb(s: StudySummary) -> hospital_pb2.HospitalStudySummary:
    return hospital_pb2.HospitalStudySummary(
        study_uid=s.study_uid,
        status=s.status,
        first_received_at=s.first_received_at,
        last_received_at=s.last_received_at,
        received_at=s.received_at or "",
        instance_count=s.instance_count,
        series_count=s.series_count,
        report_json=json.dumps(s.report, sort_keys=True),
        report_sha256=s.report_sha256,
    )


def listing_to_pb(listing: StudyListing) -> hospital_pb2.HospitalStudySummary:
    """A study summary with its cases, and whom it is of when the caller may see it."""
    pb = summary_to_pb(listing.summary)
    pb.identity_withheld = listing.withheld
    i = listing.identity
    if i is not None:
        pb.identity.CopyFrom(
            hospital_pb2.StudyIdentity(
                patient_name=i.patient_name,
                patient_id=i.patient_id,
                birth_date=i.birth_date,
                sex=i.sex,
                age=i.age,
                accession_number=i.accession_number,
                study_date=i.study_date,
                study_time=i.study_time,
                study_description=i.study_description,
                modalities=list(listing.modalities),
                referring_physician=i.referring_physician,
                recorded=True,
            )
        )
    elif not listing.withheld:
        pb.identity.CopyFrom(
            hospital_pb2.StudyIdentity(modalities=list(listing.modalities), recorded=False)
        )
    pb.cases.extend(
        hospital_pb2.StudyCase(
            case_id=c.case_id,
            pseudonym=c.pseudonym,
            destination=c.destination,
            confirmation_id=c.confirmation_id,
            deid_study_uid=c.deid_study_uid,
        )
        for c in listing.cases
    )
    return pb


def confirmation_to_pb(
    c: Confirmation, cert_pem: bytes, case: StudyCase | None = None
) -> hospital_pb2.DataConfirmation:
    return hospital_pb2.DataConfirmation(
        pseudonym=case.pseudonym if case else "",
        deid_study_uid=case.deid_study_uid if case else "",
        confirmation_id=c.confirmation_id,
        record_json=c.record,
        signature=c.signature,
        signer_certificate=cert_pem,
        study_uid=c.study_uid,
        case_id=c.case_id,
        destination=c.destination,
        confirmed_by=c.actor,
        certificate_serial=c.cert_serial,
        certificate_fingerprint=c.cert_fingerprint,
        auto=c.auto,
        allow_burned_in=c.allow_burned_in,
        created_at=c.created_at,
    )


def release_to_pb(v: ReleaseView) -> hospital_pb2.InstanceRelease:
    r = v.release
    return hospital_pb2.InstanceRelease(
        confirmation_id=r.confirmation_id,
        destination=v.destination,
        status=r.status,
        reason=r.reason,
        deid_object_id=r.deid_object_id,
        deid_sop_instance_uid=r.deid_sop_instance_uid,
        transfer_id=r.transfer_id,
        transfer_status=v.transfer_status,
        transfer_error=v.transfer_error,
    )


def instance_to_pb(
    i: InstanceRecord, releases: list[ReleaseView]
) -> hospital_pb2.HospitalStudyInstance:
    return hospital_pb2.HospitalStudyInstance(
        sop_instance_uid=i.sop_instance_uid,
        series_uid=i.series_uid,
        instance_number=i.instance_number or 0,
        modality=i.modality or "",
        object_id=i.object_id,
        burned_in=i.burned_in,
        releases=[release_to_pb(v) for v in releases],
    )


def release_instance_to_pb(v: ReleaseView) -> hospital_pb2.HospitalStudyInstance:
    """An instance as the confirmation saw it (from its release row)."""
    r = v.release
    return hospital_pb2.HospitalStudyInstance(
        sop_instance_uid=r.sop_instance_uid,
        series_uid=r.series_uid,
        instance_number=r.instance_number or 0,
        object_id=r.source_object_id,
        releases=[release_to_pb(v)],
    )
