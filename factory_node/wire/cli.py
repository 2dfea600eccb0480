"""``yigong factory studies`` and ``yigong factory study``: the factory's received
studies and their suitability check (``yigong.v1.Factory``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.cli.node import _dict, _t, _table, add_connection_options, connect
from gateway.rpc.call import rpc_call
from gateway.rpc.client import NodeClient
from yigong.v1 import factory_pb2, factory_pb2_grpc

R = TypeVar("R")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    f = sub.add_parser("factory", help="received studies and their suitability (factory node)")
    fs = f.add_subparsers(dest="what", metavar="WHAT")
    fs.required = True
    p = fs.add_parser("studies", help="list received studies, grouped per case")
    p.add_argument("--case", default="", help="only this case")
    p.add_argument("--limit", type=int, default=0, help="at most this many (0: default)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p)
    p.set_defaults(func=cmd_studies)
    p = fs.add_parser("study", help="one study: per-series analysis and suitability findings")
    p.add_argument("study_uid", help="Study Instance UID (as received)")
    p.add_argument("--case", default="", help="needed when the study is in several cases")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p)
    p.set_defaults(func=cmd_study)


def _call(client: NodeClient, fn: Callable[..., R], request: Any) -> R:
    return rpc_call(fn, request, target=client.target, timeout=client.timeout)


def _verdict(study: factory_pb2.FactoryStudy) -> str:
    if not study.HasField("suitability"):
        return "not checked"
    s = study.suitability
    return ("passed" if s.passed else "FAILED") + ("" if s.current else " (stale)")


def _study_json(study: factory_pb2.FactoryStudy) -> dict[str, Any]:
    out = _dict(study)
    for series in out.get("series", []):
        series["report"] = json.loads(series["report"]) if series.get("report") else None
    if "suitability" in out:
        out["suitability"].pop("thresholds_json", None)
    return out


def cmd_studies(args: argparse.Namespace) -> int:
    with connect(args) as client:
        stub = factory_pb2_grpc.FactoryStub(client.channel)
        reply = _call(
            client,
            stub.ListStudies,
            factory_pb2.ListFactoryStudiesRequest(case_id=args.case, limit=args.limit),
        )
    if args.json:
        print(json.dumps([_study_json(s) for s in reply.studies], indent=2))
        return 0
    _table(
        ["CASE", "STUDY", "INSTANCES", "SERIES", "SUITABILITY", "CHECKED", "LAST RECEIVED"],
        [
            [
                s.case_id,
                s.study_uid,
                str(s.instance_count),
                str(s.series_count),
                _verdict(s),
                _t(s.suitability.checked_at) if s.HasField("suitability") else "",
                _t(s.last_received_at),
            ]
            for s in reply.studies
        ],
    )
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    with connect(args) as client:
        stub = factory_pb2_grpc.FactoryStub(client.channel)
        study = _call(
            client,
            stub.GetStudy,
            factory_pb2.GetFactoryStudyRequest(study_uid=args.study_uid, case_id=args.case),
        )
    if args.json:
        print(json.dumps(_study_json(study), indent=2))
        return 0
    s = study.suitability
    for label, value in (
        ("study", study.study_uid),
        ("case", study.case_id),
        ("instances", study.instance_count),
        ("series", study.series_count),
        ("received", f"{_t(study.first_received_at)} .. {_t(study.last_received_at)}"),
        ("suitability", _verdict(study)),
        ("checked", _t(s.checked_at)),
        ("thresholds", s.thresholds_json),
    ):
        print(f"{label:>12}: {value}")
    print()
    _table(
        ["SERIES", "SLICES", "THICKNESS mm", "SPACING mm", "UNIFORM", "MISSING", "TILT", "OK"],
        [
            [
                v.series_uid,
                str(v.instance_count),
                ",".join(f"{t:g}" for t in v.slice_thickness_mm) or "?",
                f"{v.spacing_median_mm:g}" if v.HasField("spacing_median_mm") else "?",
                "yes" if v.spacing_uniform else "no",
                str(v.missing_slices_estimate),
                f"{v.gantry_tilt_deg:.2f}",
                "yes" if v.passed else "no",
            ]
            for v in study.series
        ],
    )
    if s.findings:
        print("\nfindings:")
        for finding in s.findings:
            print(f"  - {finding}")
    return 0
