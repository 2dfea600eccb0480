"""``yigong serve``, ``yigong send`` and ``yigong query``: run a node and talk to one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.download import add_download_options, run_download
from gateway.cli.progress import add_progress_options
from gateway.cli.send import add_send_options, run_send
from gateway.cli.send import message_dict as _dict
from gateway.config import load_config
from gateway.rpc.client import NodeClient
from yigong.v1 import common_pb2

if TYPE_CHECKING:
    from gateway.config import NodeConfig
    from gateway.server import Node

log = logging.getLogger(__name__)


def add_connection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "connection",
        "either --config NODE.toml (act as that node, on its host) or --address with "
        "--cert/--key/--ca (a person's or tool's certificate); YIGONG_ADDRESS, YIGONG_CERT, "
        "YIGONG_KEY, YIGONG_CA and YIGONG_NODE_ID are read when the options are absent and "
        "ignored with --config. The node that answers is named on stderr.",
    )
    g.add_argument("--config", type=Path, help="node configuration file (wins over YIGONG_*)")
    g.add_argument("--address", help="HOST:PORT of the node's gRPC port")
    g.add_argument("--cert", type=Path, help="client certificate (PEM)")
    g.add_argument("--key", type=Path, help="client private key (PEM), of --cert")
    g.add_argument("--ca", type=Path, help="federation CA certificate (PEM)")
    g.add_argument(
        "--node-id",
        help="node id the server must prove with its certificate (needed when the "
        "certificate does not name the host of --address)",
    )


def connect(args: argparse.Namespace) -> NodeClient:
    """A client from --config or --address/--cert/--key/--ca (or YIGONG_* variables);
    see :mod:`gateway.cli.connect`."""
    from gateway.cli.connect import connect as resolve_and_connect

    return resolve_and_connect(args)


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    build_node: Callable[[NodeConfig], Node],
) -> None:
    """The node commands; ``yigong serve`` runs the node ``build_node`` builds (the
    composition root's, :func:`yigong_node.compose.build_node`)."""
    p = sub.add_parser("serve", help="run a node from its configuration file")
    p.add_argument("config", type=Path, help="node configuration (TOML)")
    p.add_argument(
        "--ready-file",
        type=Path,
        help="write {port, pid, node} as JSON here once listening (for supervisors/tests)",
    )
    p.set_defaults(func=cmd_serve, build_node=build_node)

    p = sub.add_parser("send", help="upload a file to a node and queue it for peers")
    p.add_argument("file", type=Path, help="the file to send")
    p.add_argument("--to", action="append", required=True, metavar="PEER", help="peer node id")
    p.add_argument("--case", default="", help="case id")
    p.add_argument("--media-type", default="application/octet-stream", help="MIME type of the file")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_send_options(p)
    add_progress_options(p)
    add_connection_options(p)
    p.set_defaults(func=cmd_send)

    q = sub.add_parser("query", help="list and fetch what a node holds")
    qs = q.add_subparsers(dest="what", metavar="WHAT")
    qs.required = True
    for name, helptext in (
        ("objects", "list objects"),
        ("transfers", "list transfers"),
        ("batches", "list batches (study exchanges) with their objects' statuses"),
    ):
        p = qs.add_parser(name, help=helptext)
        p.add_argument("--case", default="", help="only this case")
        p.add_argument("--peer", default="", help="only objects/transfers of this peer node")
        p.add_argument("--since", default="", help="ISO-8601 date/time (UTC if no zone)")
        p.add_argument("--until", default="", help="ISO-8601 date/time, exclusive")
        p.add_argument("--limit", type=int, default=0, help="at most this many (0: default)")
        if name in ("transfers", "batches"):
            p.add_argument(
                "--status", default="", help="only this status (queued, sending, done, failed)"
            )
            p.add_argument(
                "--direction", choices=["inbound", "outbound"], help="only this direction"
            )
        if name == "transfers":
            p.add_argument("--object", default="", help="object id")
        p.add_argument("--json", action="store_true", help="print JSON")
        add_connection_options(p)
        p.set_defaults(func=cmd_query)
    p = qs.add_parser("object", help="one object: metadata, hashes, transfers, receipts")
    p.add_argument("object_id", help="the object's SHA-256 (hex)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_connection_options(p)
    p.set_defaults(func=cmd_query)
    p = qs.add_parser(
        "download",
        help="stream an object (or every object of a case or study) to files, verified",
    )
    add_download_options(p)
    add_progress_options(p)
    add_connection_options(p)
    p.set_defaults(func=cmd_query)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.allocator import keep_freed_memory
    from gateway.server import write_ready_file

    keep_freed_memory()  # before the node's threads allocate (see gateway/allocator.py)
    cfg = load_config(args.config)
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        done.set()

    # Handlers first: a SIGTERM during start-up still ends in a clean stop.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node = args.build_node(cfg)
    try:
        port = node.start()
    except BaseException:
        node.stop(grace=0)
        raise
    host = cfg.server.listen.rpartition(":")[0]
    ready: dict[str, Any] = {"node": cfg.node.id, "port": port, "pid": os.getpid()}
    dicom_port = int(getattr(node.hooks, "dicom_port", 0) or 0)
    if dicom_port:
        ready["dicom_port"] = dicom_port
    if node.console_port:
        ready["console_port"] = node.console_port
    print(
        f"node {cfg.node.id} ({cfg.node.role}, region {cfg.node.region}) listening on "
        f"{host}:{port}"
        + (f", DICOM on {cfg.dicom.listen.rpartition(':')[0]}:{dicom_port}" if dicom_port else ""),
        flush=True,
    )
    if args.ready_file:
        write_ready_file(args.ready_file, json.dumps(ready))
    done.wait()
    node.stop()
    print(f"node {cfg.node.id} stopped", flush=True)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    with connect(args) as client:
        return run_send(args, client)


def cmd_query(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.what == "objects":
            objects = client.list_objects(
                case_id=args.case,
                peer=args.peer,
                since=args.since,
                until=args.until,
                limit=args.limit,
            )
            if args.json:
                print(json.dumps([_dict(o) for o in objects], indent=2))
            else:
                _table(
                    ["OBJECT (SHA-256)", "SIZE", "NAME", "CASE", "ORIGIN", "CREATED"],
                    [
                        [
                            o.object_id,
                            str(o.size),
                            o.name,
                            o.case_id,
                            o.origin_node,
                            _t(o.created_at),
                        ]
                        for o in objects
                    ],
                )
        elif args.what == "transfers":
            transfers = client.list_transfers(
                case_id=args.case,
                peer=args.peer,
                status=args.status,
                direction=args.direction or "",
                object_id=args.object,
                since=args.since,
                until=args.until,
                limit=args.limit,
            )
            if args.json:
                print(json.dumps([_transfer_dict(t) for t in transfers], indent=2))
            else:
                _table(
                    [
                        "TRANSFER",
                        "DIR",
                        "PEER",
                        "STATUS",
                        "TRIES",
                        "OBJECT",
                        "SIZE",
                        "UPDATED",
                        "LAST ERROR",
                    ],
                    [
                        [
                            t.transfer_id,
                            t.direction[:3],
                            t.peer_node,
                            t.status,
                            str(t.attempts),
                            t.object_id[:16] + "…",
                            str(t.size),
                            _t(t.updated_at),
                            _short(t.last_error),
                        ]
                        for t in transfers
                    ],
                )
        elif args.what == "batches":
            batches = client.list_batches(
                case_id=args.case,
                peer=args.peer,
                status=args.status,
                direction=args.direction or "",
                since=args.since,
                until=args.until,
                limit=args.limit,
            )
            if args.json:
                print(json.dumps([_dict(b) for b in batches], indent=2))
            else:
                _table(
                    ["BATCH", "DIR", "PEER", "CASE", "STATUS", "OBJECTS", "MERKLE ROOT", "UPDATED"],
                    [
                        [
                            b.batch_id,
                            b.direction[:3],
                            b.peer_node,
                            b.case_id,
                            b.status + ("" if b.sealed else " (open)"),
                            " ".join(f"{k}:{v}" for k, v in sorted(b.objects_by_status.items())),
                            (b.merkle_root[:16] + "…") if b.merkle_root else "",
                            _t(b.updated_at),
                        ]
                        for b in batches
                    ],
                )
        elif args.what == "object":
            detail = client.get_object(args.object_id)
            if args.json:
                out = _dict(detail.object)
                out["transfers"] = [_transfer_dict(t) for t in detail.transfers]
                print(json.dumps(out, indent=2))
            else:
                o = detail.object
                for label, value in (
                    ("object id", o.object_id),
                    ("sha-256", o.object_id),
                    ("size", o.size),
                    ("name", o.name),
                    ("media type", o.media_type),
                    ("case", o.case_id),
                    ("origin", o.origin_node),
                    ("created", _t(o.created_at)),
                ):
                    print(f"{label:>12}: {value}")
                for key, value in sorted(o.labels.items()):
                    print(f"{'label':>12}: {key} = {value}")
                for t in detail.transfers:
                    print(
                        f"\n  transfer {t.transfer_id} {t.direction} {t.peer_node}: "
                        f"{t.status} (attempts {t.attempts})"
                    )
                    if t.batch_id:
                        print(f"    in batch {t.batch_id} (one signed manifest receipt)")
                    if t.HasField("receipt"):
                        body = common_pb2.ReceiptBody.FromString(t.receipt.body)
                        print(
                            f"    receipt signed by {body.receiver_node}: sha256 {body.sha256}, "
                            f"{body.size} bytes, completed {_t(body.completed_at)}"
                        )
                        for line in _fact_lines(dict(body.facts)):
                            print(f"      {line}")
                    if t.last_error:
                        print(f"    last error: {t.last_error}")
        else:
            return run_download(args, client)
    return 0


_FACT_NAMES = {
    "mesh.format": "format",
    "mesh.unit": "unit",
    "mesh.triangles": "triangles",
    "mesh.vertices": "vertices",
    "mesh.area_mm2": "area (mm²)",
    "mesh.volume_mm3": "volume (mm³)",
    "mesh.bbox_min_mm": "bounding box min (mm)",
    "mesh.bbox_max_mm": "bounding box max (mm)",
    "mesh.watertight": "watertight",
}


def _fact_lines(facts: dict[str, str]) -> list[str]:
    """The receiver's format facts of a receipt (mesh figures, DICOM hashes), readable:
    the figures both nodes computed and agreed on, shown without --json too."""
    if not facts:
        return []
    width = max(len(_FACT_NAMES.get(k, k)) for k in facts)
    lines = ["facts both nodes computed:"]
    for key in sorted(facts, key=lambda k: (k not in _FACT_NAMES, k)):
        lines.append(f"  {_FACT_NAMES.get(key, key):<{width}}  {facts[key]}")
    return lines


def _short(text: str, width: int = 80) -> str:
    """One line of at most ``width`` characters (the whole text is in --json)."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _t(iso: str) -> str:
    """Readable UTC time: 2026-11-22 06:13:33Z."""
    return iso[:19].replace("T", " ") + "Z" if iso else ""


def _transfer_dict(t: common_pb2.TransferInfo) -> dict[str, Any]:
    out = _dict(t)
    out.pop("receipt", None)
    if t.HasField("receipt"):
        body = common_pb2.ReceiptBody.FromString(t.receipt.body)
        out["receipt"] = _dict(body)
        out["receipt"]["signature_hex"] = t.receipt.signature.hex()
    return out


def _table(headers: list[str], rows: list[list[str]]) -> None:
    if not rows:
        print("(none)")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()
