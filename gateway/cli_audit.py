"""``yigong audit``: the security officer's commands.

``list``, ``verify``, ``checkpoint`` and ``check`` read the node's audit log
file read-only (run them on the node host with its configuration; safe while
the node runs). ``reconcile`` also asks each peer node, over its query
endpoint, for its records of the transfers the two share.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import pki
from gateway.atna import is_exported, to_atna_xml
from gateway.audit import (
    EVENT_TYPES,
    AuditEvent,
    Checkpoint,
    latest_checkpoint,
    read_events,
    verify_log,
)
from gateway.catalog import Catalog
from gateway.cli_node import _table
from gateway.client import NodeClient
from gateway.config import NodeConfig, load_config
from gateway.errors import ValidationError
from gateway.reconcile import Finding, SharedTransfer, reconcile
from gateway.rpc.channel import ClientCredentials


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("audit", help="audit log: list, follow, verify, checkpoints, reconcile")
    cmds = a.add_subparsers(dest="audit_cmd", metavar="SUBCOMMAND")
    cmds.required = True

    p = cmds.add_parser("list", help="list audit events (oldest first)")
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument("--event", choices=sorted(EVENT_TYPES), help="only this event type")
    p.add_argument("--actor", help="e.g. engineer:alice@factory-1 or node:hospital-1")
    p.add_argument("--object", help="object id (SHA-256)")
    p.add_argument("--transfer", help="transfer id")
    p.add_argument("--peer", help="peer node id")
    p.add_argument("--since", help="ISO-8601 (UTC if no zone)")
    p.add_argument("--until", help="ISO-8601 (UTC if no zone)")
    p.add_argument("--after", type=int, help="only entries after this sequence number")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("verify", help="check the hash chain and the signed checkpoints")
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_verify)

    p = cmds.add_parser("checkpoint", help="export the newest signed checkpoint as JSON")
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument("-o", "--output", type=Path, help="write to a file instead of stdout")
    p.set_defaults(func=cmd_checkpoint)

    p = cmds.add_parser("check", help="check an exported checkpoint against the grown log")
    p.add_argument("checkpoint", type=Path, help="JSON from 'yigong audit checkpoint'")
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.set_defaults(func=cmd_check)

    p = cmds.add_parser(
        "export", help="export events as IHE ATNA (PS3.15 A.5) XML files or as JSON lines"
    )
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument(
        "--format",
        choices=["atna", "json"],
        default="atna",
        help="atna: DICOM PS3.15 A.5 XML; json: one file per event (default atna)",
    )
    p.add_argument("--since", help="ISO-8601 (UTC if no zone)")
    p.add_argument("--until", help="ISO-8601 (UTC if no zone)")
    p.add_argument("--after", type=int, help="only entries after this sequence number")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="atna: a directory (one SEQ-EVENT.xml per message); json: a file",
    )
    p.set_defaults(func=cmd_export)

    p = cmds.add_parser(
        "reconcile", help="compare shared transfers with each peer's records (over mTLS)"
    )
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument("--peer", action="append", help="only this peer (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_reconcile)


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValidationError(f"{value!r} is not an ISO-8601 date/time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _verifier(cfg: NodeConfig) -> Any:
    cert = pki.load_certificate(cfg.tls.cert)
    return lambda data, sig: pki.verify_signature(cert, data, sig)


def _event_row(e: AuditEvent) -> list[str]:
    detail = " ".join(f"{k}={v}" for k, v in sorted(e.details.items()))
    return [
        str(e.seq),
        e.time[:19].replace("T", " ") + "Z",
        e.event,
        e.outcome,
        e.actor or "",
        e.peer or "",
        (e.object_id or "")[:16],
        (e.transfer_id or "")[:16],
        e.case_id or "",
        detail,
    ]


def _event_json(e: AuditEvent) -> str:
    d = {
        k: getattr(e, k)
        for k in (
            "seq",
            "time",
            "event",
            "outcome",
            "actor",
            "peer",
            "object_id",
            "transfer_id",
            "case_id",
            "details",
            "entry_hash",
        )
    }
    return json.dumps(d, sort_keys=True)


HEADERS = [
    "SEQ",
    "TIME",
    "EVENT",
    "OUTCOME",
    "ACTOR",
    "PEER",
    "OBJECT",
    "TRANSFER",
    "CASE",
    "DETAILS",
]


def cmd_list(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    filters: dict[str, Any] = dict(
        event=args.event,
        actor=args.actor,
        object_id=args.object,
        transfer_id=args.transfer,
        peer=args.peer,
        since=_when(args.since),
        until=_when(args.until),
        limit=args.limit,
    )
    after = args.after
    events = read_events(cfg.audit.path, after_seq=after, **filters)
    if args.json:
        for e in events:
            print(_event_json(e))
    else:
        _table(HEADERS, [_event_row(e) for e in events])
    if not args.follow:
        return 0
    after = events[-1].seq if events else after
    try:
        while True:
            time.sleep(1.0)
            new = read_events(cfg.audit.path, after_seq=after, **filters)
            for e in new:
                print(
                    _event_json(e) if args.json else "  ".join(_event_row(e)).rstrip(), flush=True
                )
            if new:
                after = new[-1].seq
    except KeyboardInterrupt:
        return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    report = verify_log(cfg.audit.path, cfg.node.id, verify_signature=_verifier(cfg))
    if args.json:
        print(json.dumps(report.__dict__, sort_keys=True))
    else:
        state = "OK" if report.ok else "FAILED"
        print(f"audit log {cfg.audit.path}: {state}")
        print(f"  {report.entries} entries, {report.checkpoints} signed checkpoints")
        print(f"  {report.reason}")
        if report.first_bad_seq is not None:
            print(f"  first bad entry: {report.first_bad_seq}")
    return 0 if report.ok else 1


def cmd_checkpoint(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    cp = latest_checkpoint(cfg.audit.path)
    if cp is None:
        print(
            "error: the audit log has no signed checkpoint yet (one is made every "
            "audit.checkpoint_every events and at every stop)",
            file=sys.stderr,
        )
        return 1
    text = json.dumps(cp.to_dict(), indent=2, sort_keys=True)
    if args.output:
        args.output.write_text(text + "\n")
        print(f"wrote checkpoint at entry {cp.seq} to {args.output}")
    else:
        print(text)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    try:
        exported = Checkpoint.from_dict(json.loads(args.checkpoint.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"{args.checkpoint} is not an exported checkpoint: {exc}") from exc
    report = verify_log(
        cfg.audit.path,
        cfg.node.id,
        verify_signature=_verifier(cfg),
        extra_checkpoints=[exported],
    )
    print(("OK: " if report.ok else "FAILED: ") + report.reason)
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    after, count = args.after, 0
    if args.format == "json":
        out = args.output.open("w")
    else:
        args.output.mkdir(parents=True, exist_ok=True)
    federation = pki.TrustStore(cfg.tls.ca).federation_name
    peers = {p.id: p.address for p in cfg.peers}
    try:
        while True:
            page = read_events(
                cfg.audit.path,
                after_seq=after,
                since=_when(args.since),
                until=_when(args.until),
                limit=10_000,
            )
            for event in page:
                if args.format == "json":
                    out.write(_event_json(event) + "\n")
                    count += 1
                elif is_exported(event):
                    xml = to_atna_xml(
                        event, node_id=cfg.node.id, federation=federation, peer_addresses=peers
                    )
                    (args.output / f"{event.seq:08d}-{event.event}.xml").write_bytes(xml)
                    count += 1
            if len(page) < 10_000:
                break
            after = page[-1].seq
    finally:
        if args.format == "json":
            out.close()
    print(f"exported {count} event(s) as {args.format} to {args.output}")
    return 0


def _remote_transfers(cfg: NodeConfig, peer_id: str) -> list[SharedTransfer]:
    creds = ClientCredentials.from_files(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    found: dict[str, SharedTransfer] = {}
    until = ""
    with NodeClient(cfg.peer(peer_id).address, creds, node_id=peer_id) as client:
        while True:
            page = client.list_transfers(until=until, limit=1000)
            for t in page:
                found[t.transfer_id] = SharedTransfer(
                    t.transfer_id,
                    t.direction,
                    t.peer_node,
                    t.object_id,
                    t.size,
                    t.status,
                    t.receipt.SerializeToString() if t.HasField("receipt") else None,
                )
            if len(page) < 1000:
                return list(found.values())
            until = min(t.created_at for t in page)


def _local_transfers(cfg: NodeConfig, peer_id: str) -> list[SharedTransfer]:
    catalog = Catalog(cfg.catalog.path)
    try:
        out: list[SharedTransfer] = []
        until = ""
        while True:
            page = catalog.list_transfers(peer=peer_id, until=until, limit=1000)
            out += [
                SharedTransfer(
                    t.transfer_id,
                    t.direction,
                    t.peer_node,
                    t.object_id,
                    t.size,
                    t.status,
                    t.receipt,
                )
                for t in page
            ]
            if len(page) < 1000:
                return out
            until = min(t.created_at for t in page)
    finally:
        catalog.close()


def cmd_reconcile(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    trust = pki.TrustStore(cfg.tls.ca, cfg.tls.crl)
    peers = args.peer or [p.id for p in cfg.peers]
    results: dict[str, list[Finding]] = {}
    for peer in peers:
        results[peer] = reconcile(
            cfg.node.id, peer, _local_transfers(cfg, peer), _remote_transfers(cfg, peer), trust
        )
    bad = sum(f.is_discrepancy for fs in results.values() for f in fs)
    if args.json:
        print(
            json.dumps(
                {
                    peer: [f.__dict__ | {"discrepancy": f.is_discrepancy} for f in fs]
                    for peer, fs in results.items()
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        for peer, fs in results.items():
            issues = [f for f in fs if f.is_discrepancy]
            pending = len(fs) - len(issues)
            if not issues:
                print(
                    f"{cfg.node.id} <-> {peer}: records agree"
                    + (f" ({pending} transfer(s) still in progress)" if pending else "")
                )
                continue
            print(f"{cfg.node.id} <-> {peer}: {len(issues)} discrepancy(ies)")
            _table(
                ["KIND", "TRANSFER", "DETAIL"], [[f.kind, f.transfer_id, f.detail] for f in issues]
            )
    return 1 if bad else 0
