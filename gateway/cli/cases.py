"""``yigong case``: open a case, sign its records, show the verified chain.

::

    yigong case create --case C-1 --manufacturer factory-1
    yigong case sign order --case C-1 --data order.json [--set key=value] [--set key:=JSON] [--yes]
    yigong case show C-1 [--json]
    yigong case list [--json]
    yigong case types [TYPE]
    yigong case template TYPE [-o FILE] [--optional]

``sign`` uses the person's own certificate and key (``--cert``/``--key`` or
``YIGONG_CERT``/``YIGONG_KEY``) both to connect and to sign. Signing is
irreversible: without ``--yes`` it prints the record that would be signed (readable;
with ``--json`` the canonical bytes) and exits with status 1. Where a field holds a
SHA-256 (``design_hash``, ``files[].object_id``), a unique prefix of at least 4 hex
digits of a record or object of the case is accepted and expanded. ``show`` prints
full record hashes and exits with status 1 when the chain does not verify.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway.cases.describe import (
    describe_type,
    expand_hashes,
    preview,
    signers_text,
    template,
    todo_fields,
)
from gateway.cases.schema import TYPES, describe_fields
from gateway.cases.signing import PersonSigner
from gateway.cli.node import _dict, _t, _table, add_connection_options, connect
from gateway.errors import ConfigError, ValidationError
from gateway.rpc.cases_client import CaseClient
from yigong.v1 import case_pb2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("case", help="case records of the standard: open, sign, show")
    cs = c.add_subparsers(dest="case_command", metavar="ACTION")
    cs.required = True

    p = cs.add_parser("create", help="open a case with a manufacturer node (clinicians)")
    p.add_argument("--case", required=True, dest="case_id", help="case id (no patient data)")
    p.add_argument("--manufacturer", required=True, help="node id of the factory")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p)
    p.set_defaults(func=cmd_create)

    p = cs.add_parser("sign", help="sign the case's next record with your key and submit it")
    p.add_argument("type", choices=list(TYPES), metavar="TYPE", help="record type (see 'types')")
    p.add_argument("--case", required=True, dest="case_id", help="case id")
    p.add_argument("--data", type=Path, help="JSON file with the record's fields")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a field (dotted path for nested fields); KEY:=JSON for numbers, lists, ...",
    )
    p.add_argument("--yes", action="store_true", help="really sign (otherwise show the record)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p)
    p.set_defaults(func=cmd_sign)

    p = cs.add_parser("show", help="the whole chain, verified; stage; who acts next")
    p.add_argument("case_id", help="case id")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p)
    p.set_defaults(func=cmd_show)

    p = cs.add_parser("list", help="cases of the node")
    p.add_argument("--limit", type=int, default=0, help="at most this many (0: no limit)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p)
    p.set_defaults(func=cmd_list)

    p = cs.add_parser("types", help="record types: section of the standard, signer, fields")
    p.add_argument(
        "type", nargs="?", choices=list(TYPES), metavar="TYPE", help="the full schema of one type"
    )
    p.set_defaults(func=cmd_types)

    p = cs.add_parser("template", help="write an example record (JSON) of a type, to fill in")
    p.add_argument("type", choices=list(TYPES), metavar="TYPE", help="record type (see 'types')")
    p.add_argument("-o", "--output", type=Path, help="write to this file (default: stdout)")
    p.add_argument("--optional", action="store_true", help="include the optional fields too")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_template)


def cmd_create(args: argparse.Namespace) -> int:
    with connect(args) as node:
        view = CaseClient(node).create(args.case_id, args.manufacturer)
    if args.json:
        print(json.dumps(view_dict(view), indent=2, ensure_ascii=False))
    else:
        print(
            f"case {view.case_id} opened: hospital {view.hospital}, "
            f"manufacturer {view.manufacturer}"
        )
        _print_next(view)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    data = parse_fields(args.data, args.set)
    cert = args.cert or _env_path("YIGONG_CERT")
    key = args.key or _env_path("YIGONG_KEY")
    if not (cert and key):
        raise ConfigError("signing needs your own certificate and key: pass --cert and --key")
    signer = PersonSigner.from_files(cert, key)
    with connect(args) as node:
        client = CaseClient(node)
        view = client.get(args.case_id)

        def known() -> list[str]:
            objects = node.list_objects(case_id=args.case_id, limit=1000)
            return [r.record_hash for r in view.records] + [o.object_id for o in objects]

        for path, full in expand_hashes(args.type, data, known, f"case {args.case_id}"):
            print(f"{path}: {full}", file=sys.stderr)
        record = signer.record(args.case_id, view.next_seq, view.head_hash, args.type, data)
        if not args.yes:
            if args.json:
                print(record.decode("utf-8"))
            else:
                print(preview(json.loads(record)))
            todo = todo_fields(data)
            if todo:
                print(
                    f"{len(todo)} field(s) still hold the template's TODO: {', '.join(todo[:8])}",
                    file=sys.stderr,
                )
            print(
                f"this is the record {signer.identity.label()} would sign; signing is "
                "irreversible: run again with --yes to sign and submit it",
                file=sys.stderr,
            )
            return 1
        view = client.submit(record, signer.sign(record))
    if args.json:
        print(json.dumps(view_dict(view), indent=2, ensure_ascii=False))
        return 0
    last = view.records[-1]
    print(f"case {view.case_id}: record {last.seq} ({last.type}) signed and countersigned")
    print(f"record hash {last.record_hash}")
    print(f"stage: {view.stage}")
    _print_next(view)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with connect(args) as node:
        view = CaseClient(node).get(args.case_id)
    if args.json:
        print(json.dumps(view_dict(view), indent=2, ensure_ascii=False))
        return 0 if view.verified else 1
    print(
        f"case {view.case_id}: hospital {view.hospital}, manufacturer {view.manufacturer} "
        f"(opened {_t(view.created_at)} by {view.created_by})"
    )
    n = len(view.records)
    if view.verified:
        print(f"chain: {n} records, every signature, link and stage gate verified")
    else:
        print(f"chain: {n} records, VERIFICATION FAILED: {view.problem}")
    print(f"stage: {view.stage}")
    _print_next(view)
    print()
    _table(
        ["SEQ", "TYPE", "AUTHOR", "NODE", "SIGNED", "VERIFIED", "RECORD HASH", "EXCHANGE"],
        [
            [
                str(r.seq),
                r.type,
                r.author,
                r.node_id,
                _t(r.time),
                "OK" if r.verified else "FAILED",
                r.record_hash,
                r.exchange,
            ]
            for r in view.records
        ],
    )
    for r in view.records:
        if not r.verified:
            print(f"  {r.problem}")
    if view.pending:
        print(f"\n{view.pending} record(s) from the other node wait for an earlier one")
    for rej in view.rejected:
        print(
            f"\nnot in the chain: record {rej.seq} {rej.record_hash} {rej.kind}: {rej.reason}"
        )
    return 0 if view.verified else 1


def cmd_list(args: argparse.Namespace) -> int:
    with connect(args) as node:
        views = CaseClient(node).list(args.limit)
    if args.json:
        print(json.dumps([view_dict(v) for v in views], indent=2, ensure_ascii=False))
        return 0
    _table(
        ["CASE", "HOSPITAL", "MANUFACTURER", "STAGE", "RECORDS", "VERIFIED", "NEXT"],
        [
            [
                v.case_id,
                v.hospital,
                v.manufacturer,
                v.stage,
                str(v.next_seq),
                "OK" if v.verified else "FAILED",
                "; ".join(a.description for a in v.next),
            ]
            for v in views
        ],
    )
    return 0


def cmd_types(args: argparse.Namespace) -> int:
    if args.type:
        print("\n".join(describe_type(args.type)))
        print(f"\nan example to fill in: yigong case template {args.type} -o {args.type}.json")
        return 0
    for name, spec in TYPES.items():
        print(f"{name} ({spec.section}, {spec.title}) — signed by {signers_text(name)}")
        fields = describe_fields(name)
        print("  required: " + ", ".join(f for f, req in fields if req))
        optional = [f for f, req in fields if not req]
        if optional:
            print("  optional: " + ", ".join(optional))
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    data = template(args.type, optional=args.optional)
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    if args.output.exists() and not args.force:
        raise ValidationError(f"{args.output} exists; pass --force to overwrite it")
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot write {args.output}: {exc}") from exc
    print(
        f"wrote {args.output}: an example {args.type} record; replace every TODO and example "
        f"value (hashes of 0s, EXAMPLE-1, dates), then: yigong case sign {args.type} "
        f"--case CASE --data {args.output}",
        file=sys.stderr,
    )
    return 0


def _print_next(view: case_pb2.CaseView) -> None:
    for a in view.next:
        print(f"next: {a.description} ({', '.join(a.record_types)})")


def view_dict(view: case_pb2.CaseView) -> dict[str, Any]:
    out = _dict(view)
    for rec, msg in zip(out.get("records", []), view.records, strict=True):
        rec["record"] = json.loads(msg.record_json) if msg.record_json else None
        rec.pop("record_json", None)
    return out


def parse_fields(path: Path | None, settings: list[str]) -> dict[str, Any]:
    """A record's data from a JSON file and ``KEY=VALUE`` / ``KEY:=JSON`` settings."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValidationError(f"cannot read the record fields from {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValidationError(f"{path} must hold a JSON object of the record's fields")
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.rstrip(":"):
            raise ValidationError(f"--set {item[:60]!r}: use KEY=VALUE or KEY:=JSON")
        parsed: Any = value
        if key.endswith(":"):
            key = key[:-1]
            try:
                parsed = json.loads(value)
            except ValueError as exc:
                raise ValidationError(f"--set {key}:= is not JSON: {exc}") from exc
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValidationError(f"--set {key}: {part} is not an object")
        target[leaf] = parsed
    return data


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None
