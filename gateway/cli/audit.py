"""``yigong audit``: the security officer's commands.

``list``, ``verify``, ``checkpoint`` and ``check`` read the node's audit log
file read-only (run them on the node host with its configuration; safe while
the node runs). ``verify --with-peers`` also asks each peer for the checkpoints
of this node it witnessed; ``reconcile`` asks each peer, over its query endpoint,
for its records of the transfers the two share, and checks the log against
what the peer witnessed. Every verdict is one line starting ``OK:``,
``FAILED:`` or ``INCOMPLETE:``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gateway import pki
from gateway.atna import is_exported, to_atna_xml
from gateway.audit import (
    EVENT_TYPES,
    AuditEvent,
    Checkpoint,
    VerifyReport,
    latest_checkpoint,
    parse_when,
    read_events,
    verify_log,
)
from gateway.audit import (
    describe as describe_audit,
)
from gateway.audit_witness import Witnessed
from gateway.cli.node import _table
from gateway.cli.progress import Reporter, add_progress_options
from gateway.config import NodeConfig, load_config
from gateway.errors import ValidationError
from gateway.rpc.peer_records import node_verifier, reconcile_peers, witnessed_by_peers


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
    p.add_argument(
        "--limit", type=int, help="at most N events (default 1000; with --follow the last 10)"
    )
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="print the last 10 (--limit N) matching events, then new ones as they come",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_list)

    p = cmds.add_parser("verify", help="check the hash chain and the signed checkpoints")
    p.add_argument("--config", type=Path, required=True, help="the node's configuration")
    p.add_argument(
        "--with-peers",
        action="store_true",
        help="also check against the checkpoints each peer witnessed (over mTLS)",
    )
    p.add_argument("--peer", action="append", help="with --with-peers: only this peer")
    add_progress_options(p)
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


MIN_WIDTHS = [6, 20, 26, 7, 36, 12, 16, 16, 12, 0]
"""Column widths ``list --follow`` starts from, so that rows arriving later line up."""


def _row_text(row: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()


def cmd_list(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    filters: dict[str, Any] = dict(
        event=args.event,
        actor=args.actor,
        object_id=args.object,
        transfer_id=args.transfer,
        peer=args.peer,
        since=parse_when(args.since, "--since"),
        until=parse_when(args.until, "--until"),
    )
    after = args.after
    if not args.follow:
        events = read_events(cfg, after_seq=after, limit=args.limit or 1000, **filters)
        if args.json:
            for e in events:
                print(_event_json(e))
        else:
            _table(HEADERS, [_event_row(e) for e in events])
        return 0
    # --follow: the last N matching events, then every new one, in fixed columns
    events = read_events(
        cfg, after_seq=after, limit=args.limit or 10, newest=True, **filters
    )
    rows = [_event_row(e) for e in events]
    widths = [
        max(m, len(h), *(len(r[i]) for r in rows))
        for i, (m, h) in enumerate(zip(MIN_WIDTHS, HEADERS, strict=True))
    ]
    widths[-1] = 0
    if not args.json:
        print(_row_text(HEADERS, widths))
    for e, row in zip(events, rows, strict=True):
        print(_event_json(e) if args.json else _row_text(row, widths))
    sys.stdout.flush()
    after = events[-1].seq if events else after
    if after is None:  # nothing matched yet: follow from the current end of the log
        newest = read_events(cfg, limit=1, newest=True)
        after = newest[-1].seq if newest else 0
    try:
        while True:
            time.sleep(1.0)
            while new := read_events(cfg, after_seq=after, limit=1000, **filters):
                for e in new:
                    print(_event_json(e) if args.json else _row_text(_event_row(e), widths))
                sys.stdout.flush()
                after = new[-1].seq
    except KeyboardInterrupt:
        return 0


def _verdict(cfg: NodeConfig, report: VerifyReport, proven: str = "") -> str:
    """One line: ``OK: …`` / ``FAILED: …`` naming the log, what was checked, what is not."""
    where = describe_audit(cfg)
    if not report.ok:
        bad = f" (first bad entry: {report.first_bad_seq})" if report.first_bad_seq else ""
        return f"FAILED: {where}: {report.reason}{bad}"
    text = f"OK: {where}: {report.entries} entries, {report.checkpoints} checkpoint(s) verified"
    if proven:
        text += f"; {proven}"
    if report.entries > report.last_checkpoint:
        first = report.last_checkpoint + 1
        span = f"entry {first}" if first == report.entries else f"entries {first}-{report.entries}"
        text += f"; {span} not yet covered by any checkpoint"
    return text


def _witness_summary(cfg: NodeConfig, peer: str, held: list[Witnessed]) -> str:
    if not held:
        return f"{peer} has witnessed no checkpoint of {cfg.node.id} yet"
    newest = held[-1]
    return (
        f"{peer} witnessed {len(held)} checkpoint(s) of {cfg.node.id}, newest at entry "
        f"{newest.checkpoint.seq} (received {newest.received_at[:19].replace('T', ' ')}Z)"
    )


def _verify_showing_progress(
    args: argparse.Namespace, cfg: NodeConfig, extra: list[Checkpoint]
) -> VerifyReport:
    """verify_log with a progress bar (or plain lines) on stderr; --quiet: none."""
    with Reporter.for_args(args) as reporter:
        task = reporter.task("verify audit log", unit="entries")
        report = verify_log(
            cfg,
            cfg.node.id,
            verify_signature=node_verifier(cfg),
            extra_checkpoints=extra,
            progress=lambda done, total: task.update(done, total),
        )
        task.update(report.entries, report.entries)
        task.done("ok" if report.ok else "FAILED")
    return report


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not args.with_peers:
        report = _verify_showing_progress(args, cfg, [])
        if args.json:
            print(json.dumps(report.__dict__, sort_keys=True))
        else:
            print(_verdict(cfg, report))
        return 0 if report.ok else 1
    peers = args.peer or [p.id for p in cfg.peers]
    found, failed = witnessed_by_peers(cfg, peers)
    extra = [w.checkpoint for held in found.values() for w in held]
    report = _verify_showing_progress(args, cfg, extra)
    newest = max((c.seq for c in extra), default=0)
    incomplete = [f"{peer}: {why}" for peer, why in failed.items()]
    if not peers:
        incomplete.append(f"{cfg.node.id} has no peers configured ([[peers]] in {args.config})")
    if args.json:
        witnessed = {
            p: {"count": len(h), "newest_seq": h[-1].checkpoint.seq if h else 0}
            for p, h in found.items()
        }
        out = report.__dict__ | {
            "witnessed": witnessed,
            "unreachable": failed,
            "newest_witnessed": newest,
        }
        print(json.dumps(out, sort_keys=True))
    else:
        for peer, held in found.items():
            print(_witness_summary(cfg, peer, held))
        proven = f"{len(extra)} witnessed by {len(found)} peer(s)"
        if report.ok and report.entries > newest:
            first = newest + 1
            proven += f", entries from {first} on witnessed by no peer yet"
        print(_verdict(cfg, report, proven))
        if report.ok and incomplete:
            print("INCOMPLETE: could not ask " + "; ".join(incomplete))
    return 0 if report.ok and not incomplete else 1


def cmd_checkpoint(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    cp = latest_checkpoint(cfg)
    if cp is None:
        print(
            "error: the audit log has no signed checkpoint yet (one is made at start-up, "
            "every audit.checkpoint_seconds, every audit.checkpoint_every events and at stop)",
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
        cfg,
        cfg.node.id,
        verify_signature=node_verifier(cfg),
        extra_checkpoints=[exported],
    )
    print(
        _verdict(
            cfg,
            report,
            f"still contains exactly what {args.checkpoint} signed (entry {exported.seq})",
        )
    )
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
                cfg,
                after_seq=after,
                since=parse_when(args.since, "--since"),
                until=parse_when(args.until, "--until"),
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


def cmd_reconcile(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    peers = args.peer or [p.id for p in cfg.peers]
    if not peers:
        print(
            f"{cfg.node.id} has no peers configured ([[peers]] in {args.config}): "
            "nothing to reconcile"
        )
        return 0
    results, logs = reconcile_peers(cfg, peers)
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
            issues = [f for f in fs if f.is_discrepancy and f.kind != "audit_log"]
            pending = sum(f.kind == "in_progress" for f in fs)
            if not issues:
                print(
                    f"{cfg.node.id} <-> {peer}: records agree"
                    + (f" ({pending} transfer(s) still in progress)" if pending else "")
                )
            else:
                print(f"{cfg.node.id} <-> {peer}: {len(issues)} discrepancy(ies)")
                _table(
                    ["KIND", "TRANSFER", "DETAIL"],
                    [[f.kind, f.transfer_id, f.detail] for f in issues],
                )
            print(logs[peer])
    return 1 if bad else 0
