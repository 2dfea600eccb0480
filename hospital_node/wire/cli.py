"""``yigong study``: received studies on a hospital node, and the clinician's confirmation.

    yigong study list [--status received] [--json]
    yigong study show STUDY_UID [--json]

``list``, ``show`` and the preview of ``confirm`` show whom a study is of (patient name,
ID, birth date, sex, age, accession number, study date and time, description, modality,
referring physician) to this hospital's clinicians and the node itself only; officers
see UIDs. Each study shown with its identity is audited by its UID.
    yigong study confirm STUDY_UID --case ID --to FACTORY_NODE [--allow-burned-in] [--yes]
    yigong study export-design --case ID --object SHA256 [--again] [--yes]

Sending data out of the hospital is irreversible: without ``--yes``, ``confirm`` only
shows what would be sent and exits with status 1. Writing into the hospital's PACS is a
deliberate act too: without ``--yes``, ``export-design`` runs every check on the node
and shows what would be exported where, and exits with status 1.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.cli.node import _dict, _t, _table, add_connection_options, connect
from gateway.rpc.call import rpc_call
from gateway.rpc.client import NodeClient
from yigong.v1 import hospital_pb2, hospital_pb2_grpc

CONFIRM_TIMEOUT_SECONDS = 900.0
"""De-identifying a large study takes a while: ConfirmStudy gets this long."""
EXPORT_TIMEOUT_SECONDS = 300.0
"""ExportDesign reads the design and an original instance and waits for the PACS."""

R = TypeVar("R")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("study", help="received DICOM studies; confirm one for sending (hospital)")
    ss = p.add_subparsers(dest="study_command", metavar="ACTION")
    ss.required = True
    s = ss.add_parser("list", help="studies received from the PACS, newest first")
    s.add_argument("--status", choices=["receiving", "received"], help="only this status")
    s.add_argument("--limit", type=int, default=0, help="at most this many (default 100)")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(s)
    s.set_defaults(func=cmd_list)
    s = ss.add_parser("show", help="completeness report, confirmations and release status")
    s.add_argument("study_uid", help="Study Instance UID (as received from the PACS)")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(s)
    s.set_defaults(func=cmd_show)
    s = ss.add_parser(
        "confirm",
        help="confirm a received study for a case and send it, de-identified (irreversible)",
    )
    s.add_argument("study_uid", help="Study Instance UID (as received from the PACS)")
    s.add_argument("--case", required=True, help="case id (no patient data in it)")
    s.add_argument("--to", required=True, metavar="FACTORY_NODE", help="destination node id")
    s.add_argument(
        "--allow-burned-in",
        action="store_true",
        help="also send instances that may show patient data in their pixels (US, secondary "
        "capture, Burned In Annotation YES); only after looking at them",
    )
    s.add_argument("--yes", action="store_true", help="really send (otherwise only show what)")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(s)
    s.set_defaults(func=cmd_confirm)
    s = ss.add_parser(
        "export-design",
        help="export a file of a case's approved design into this hospital's PACS "
        "(DICOM Encapsulated STL in the patient's original study)",
    )
    s.add_argument("--case", required=True, help="case id")
    s.add_argument("--object", required=True, metavar="SHA256", help="the design file (model/stl)")
    s.add_argument("--again", action="store_true", help="export a design exported before again")
    s.add_argument("--yes", action="store_true", help="really export (otherwise only show what)")
    s.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(s)
    s.set_defaults(func=cmd_export_design)


def _rpc(client: NodeClient, call: Callable[..., R], request: Any, timeout: float = 0) -> R:
    return rpc_call(call, request, target=client.target, timeout=timeout or client.timeout)


def _stub(client: NodeClient) -> hospital_pb2_grpc.HospitalStub:
    return hospital_pb2_grpc.HospitalStub(client.channel)


def cmd_list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        req = hospital_pb2.ListHospitalStudiesRequest(status=args.status or "", limit=args.limit)
        studies = _rpc(client, _stub(client).ListStudies, req).studies
    if args.json:
        print(json.dumps([_summary_dict(s) for s in studies], indent=2))
        return 0
    if any(s.HasField("identity") for s in studies):  # a clinician (or the node) of this hospital
        _table(
            ["STUDY UID", "PATIENT", "PATIENT ID", "BORN", "SEX/AGE", "ACCESSION",
             "STUDY DATE", "MODALITY", "DESCRIPTION", "REFERRING", "STATUS", "INSTANCES",
             "CASES (PSEUDONYM)"],
            [
                [
                    s.study_uid, *_identity_cells(s.identity), s.status,
                    f"{s.instance_count} in {s.series_count} series", _cases_cell(s),
                ]
                for s in studies
            ],
        )  # fmt: skip
        return 0
    _table(
        ["STUDY UID", "STATUS", "INSTANCES", "SERIES", "LAST RECEIVED", "RECEIVED", "CASES"],
        [
            [
                s.study_uid,
                s.status,
                str(s.instance_count),
                str(s.series_count),
                _t(s.last_received_at),
                _t(s.received_at),
                _cases_cell(s),
            ]
            for s in studies
        ],
    )
    if studies and studies[0].identity_withheld:
        print("(patient identity is shown to this hospital's clinicians only)")
    return 0


def _da(value: str) -> str:
    """A DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    return f"{value[:4]}-{value[4:6]}-{value[6:]}" if len(value) == 8 and value.isdigit() else value


def _tm(value: str) -> str:
    digits = value.split(".")[0]
    return f"{digits[:2]}:{digits[2:4]}" if len(digits) >= 4 and digits.isdigit() else value


def _identity_cells(i: hospital_pb2.StudyIdentity) -> list[str]:
    if not i.recorded:
        return ["(not recorded)", "", "", "", "", "", ",".join(i.modalities), "", ""]
    when = " ".join(x for x in (_da(i.study_date), _tm(i.study_time)) if x)
    return [
        i.patient_name or "-",
        i.patient_id or "-",
        _da(i.birth_date) or "-",
        f"{i.sex or '-'}/{i.age or '-'}",
        i.accession_number or "-",
        when or "-",
        ",".join(i.modalities) or "-",
        i.study_description or "-",
        i.referring_physician or "-",
    ]


def _cases_cell(s: hospital_pb2.HospitalStudySummary) -> str:
    return (
        ", ".join(
            f"{c.case_id} ({c.pseudonym or '-'})"
            + ("" if len(s.cases) < 2 else f" -> {c.destination}")
            for c in s.cases
        )
        or "-"
    )


def _get(client: NodeClient, study_uid: str) -> hospital_pb2.HospitalStudy:
    req = hospital_pb2.GetHospitalStudyRequest(study_uid=study_uid)
    return _rpc(client, _stub(client).GetStudy, req)


def cmd_show(args: argparse.Namespace) -> int:
    with connect(args) as client:
        study = _get(client, args.study_uid)
    if args.json:
        out = _dict(study)
        out["study"] = _summary_dict(study.study)
        for c in out["confirmations"]:
            c["record"] = json.loads(c.pop("record_json"))
            c["signature_hex"] = base64.b64decode(c.pop("signature")).hex()
            c.pop("signer_certificate", None)
        print(json.dumps(out, indent=2))
        return 0
    _print_summary(study.study)
    report = json.loads(study.study.report_json or "{}")
    for series in report.get("series", []):
        _print_series(series)
    duplicates = report.get("duplicates", [])
    if duplicates:
        print(
            f"\n{len(duplicates)} SOP Instance UID(s) received more than once with "
            "different content (the first one received is the one sent):"
        )
        for d in duplicates:
            print(f"  {d.get('sop_instance_uid')} (series {d.get('series_uid')})")
    _print_confirmations(study)
    return 0


def _summary_dict(s: hospital_pb2.HospitalStudySummary) -> dict[str, Any]:
    out = _dict(s)
    out["report"] = json.loads(out.pop("report_json") or "{}")
    return out


def _print_identity(s: hospital_pb2.HospitalStudySummary) -> None:
    if s.identity_withheld:
        print(f"{'patient':>15}: (shown to this hospital's clinicians only)")
        return
    i = s.identity
    if not i.recorded:
        print(f"{'patient':>15}: (not recorded: received before identities were kept)")
        return
    when = " ".join(x for x in (_da(i.study_date), _tm(i.study_time)) if x)
    for label, value in (
        ("patient", i.patient_name),
        ("patient id", i.patient_id),
        ("born", _da(i.birth_date)),
        ("sex / age", f"{i.sex or '-'} / {i.age or '-'}"),
        ("accession", i.accession_number),
        ("study date", when),
        ("modality", ",".join(i.modalities)),
        ("description", i.study_description),
        ("referring", i.referring_physician),
    ):
        print(f"{label:>15}: {value or '-'}")


def _print_summary(s: hospital_pb2.HospitalStudySummary) -> None:
    _print_identity(s)
    for label, value in (
        ("study", s.study_uid),
        ("status", s.status + (f" (since {_t(s.received_at)})" if s.received_at else "")),
        ("instances", f"{s.instance_count} in {s.series_count} series"),
        ("first received", _t(s.first_received_at)),
        ("last received", _t(s.last_received_at)),
        ("report sha256", s.report_sha256 or "(computed once the study is received)"),
    ):
        print(f"{label:>15}: {value}")


def _mm(value: Any) -> str:
    return "?" if value is None else f"{float(value):g} mm"


def _print_series(r: dict[str, Any]) -> None:
    print(f"\nseries {r.get('series_uid', '?')}: {r.get('instance_count', 0)} instance(s)")
    thickness = ", ".join(_mm(t) for t in r.get("slice_thickness_mm", [])) or "?"
    spacing = ", ".join(f"{a:g} x {b:g} mm" for a, b in r.get("pixel_spacing_mm", [])) or "?"
    matrix = ", ".join(f"{a}x{b}" for a, b in r.get("rows_columns", [])) or "?"
    uniform = "uniform" if r.get("spacing_uniform") else "NOT uniform"
    gaps = r.get("gaps", [])
    gap_text = "none"
    if gaps:
        where = ", ".join(f"{a:g}..{b:g} mm" for a, b in gaps[:5])
        missing = r.get("missing_slices_estimate", 0)
        gap_text = f"{len(gaps)} gap(s), about {missing} slice(s) missing: {where}"
    steps = (
        f"min {_mm(r.get('spacing_min_mm'))}, median {_mm(r.get('spacing_median_mm'))}, "
        f"max {_mm(r.get('spacing_max_mm'))} ({uniform})"
    )
    for label, value in (
        ("slice thickness", thickness),
        ("slice spacing", steps),
        ("gaps", gap_text),
        ("duplicate pos.", str(r.get("duplicate_positions", 0))),
        ("pixel spacing", spacing),
        ("gantry tilt", f"{float(r.get('gantry_tilt_deg') or 0):g} deg"),
        ("orientation", "consistent" if r.get("orientation_consistent") else "MIXED"),
        ("matrix", matrix),
    ):
        print(f"  {label:>15}: {value}")


def _print_confirmations(study: hospital_pb2.HospitalStudy) -> None:
    if not study.confirmations:
        print("\nnot confirmed for any case yet ('yigong study confirm')")
        return
    for c in study.confirmations:
        flags = (" [auto-forward]" if c.auto else "") + (
            " [burned-in allowed]" if c.allow_burned_in else ""
        )
        who = f"{c.confirmed_by} (certificate {c.certificate_serial})"
        print(f"\nconfirmed {_t(c.created_at)} by {who}{flags}")
        print(f"  case {c.case_id} -> {c.destination}, confirmation {c.confirmation_id}")
        if c.pseudonym:
            print(f"  pseudonym {c.pseudonym} (what the case's order names)")
        if c.deid_study_uid:
            print(f"  de-identified study {c.deid_study_uid} (what the data confirmation names)")
        rows = [
            (i, r)
            for i in study.instances
            for r in i.releases
            if r.confirmation_id == c.confirmation_id
        ]
        counts = Counter(r.status for _, r in rows)
        transfers = Counter(r.transfer_status or "-" for _, r in rows if r.status == "released")
        print("  instances: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        if transfers:
            print("  transfers: " + ", ".join(f"{n} {s}" for s, n in sorted(transfers.items())))
        for i, r in rows:
            if r.status != "released" or r.transfer_status == "failed":
                why = r.reason or r.transfer_error
                print(f"    {r.status:>8} #{i.instance_number} {i.sop_instance_uid}: {why}")


def cmd_confirm(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if not args.yes:
            study = _get(client, args.study_uid)
            s = study.study
            burned = "included" if args.allow_burned_in else "held back"
            print("Sending data out of the hospital cannot be undone. This would send:")
            _print_identity(s)
            for label, value in (
                ("study", s.study_uid),
                ("status", s.status),
                ("instances", f"{s.instance_count} in {s.series_count} series, de-identified"),
                ("burned-in", f"instances that may show patient data in pixels: {burned}"),
                ("case", args.case),
                ("destination", args.to),
            ):
                print(f"  {label:>11}: {value}")
            if s.status != "received":
                print("The study is still receiving; it can be confirmed once it is received.")
            print("Re-run with --yes to confirm and send.")
            return 1
        req = hospital_pb2.ConfirmStudyRequest(
            study_uid=args.study_uid,
            case_id=args.case,
            destination=args.to,
            allow_burned_in=args.allow_burned_in,
        )
        reply = _rpc(client, _stub(client).ConfirmStudy, req, CONFIRM_TIMEOUT_SECONDS)
    if args.json:
        out = _dict(reply)
        out["confirmation"]["record"] = json.loads(reply.confirmation.record_json)
        print(json.dumps(out, indent=2))
        return 0
    c = reply.confirmation
    statuses = Counter(r.status for i in reply.instances for r in i.releases)
    print(f"confirmed: confirmation {c.confirmation_id}, signed by node for {c.confirmed_by}")
    print(f"case {c.case_id}: pseudonym {c.pseudonym}, de-identified study {c.deid_study_uid}")
    print("instances: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
    print(f"queued {len(reply.transfer_ids)} transfer(s) to {c.destination}")
    for i in reply.instances:
        for r in i.releases:
            if r.status != "released":
                print(f"  {r.status} {i.sop_instance_uid}: {r.reason}")
    return 0


def cmd_export_design(args: argparse.Namespace) -> int:
    req = hospital_pb2.ExportDesignRequest(
        case_id=args.case, object_id=args.object, again=args.again, dry_run=not args.yes
    )
    with connect(args) as client:
        reply = _rpc(client, _stub(client).ExportDesign, req, EXPORT_TIMEOUT_SECONDS)
    if args.json:
        print(json.dumps({"exported": args.yes, **_dict(reply)}, indent=2))
        return 0 if args.yes else 1
    if not args.yes:
        print("This writes the design into the patient's record in the PACS. It would export:")
        for label, value in (
            ("case", args.case),
            ("object", f"{args.object} (model/stl, as DICOM Encapsulated STL)"),
            ("study", f"{reply.study_instance_uid} (the patient's original study)"),
            ("frame from", f"series {reply.source_series_uid}"),
            ("destination", f"PACS {reply.pacs}"),
        ):
            print(f"  {label:>11}: {value}")
        print("Re-run with --yes to export.")
        return 1
    print(
        f"exported: instance {reply.sop_instance_uid} (series {reply.series_instance_uid}) "
        f"in study {reply.study_instance_uid} to PACS {reply.pacs}, status 0x{reply.status:04X}"
    )
    return 0
