"""``yigong send``: upload a file, queue it for peers, optionally wait for the receipts.

``--wait`` polls the node (``Query.ListTransfers``) until every transfer queued
for the object is ``done`` with a signed receipt that this command verifies
itself (signature against the federation CA, receiver, SHA-256 and size), or one
of them failed, or ``--timeout`` passed. Progress shows the ``bytes_done`` the
node reports for each transfer.

Exit status: 0 sent (and, with ``--wait``, every receipt verified);
:data:`EXIT_FAILED` a transfer failed or its receipt does not verify;
:data:`EXIT_TIMEOUT` ``--timeout`` passed first; 2 any other error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from gateway.cli.progress import Reporter, Task
from gateway.config import load_config
from gateway.errors import ConfigError, ReceiptError, YigongError
from gateway.pki import TrustStore
from gateway.rpc.client import NodeClient
from gateway.transfer.receipts import verify_receipt
from yigong.v1 import common_pb2, exchange_pb2

EXIT_FAILED = 3
EXIT_TIMEOUT = 4
POLL_SECONDS = 0.5


def message_dict(msg: Any) -> dict[str, Any]:
    """A reply as JSON-ready data (field names as in the .proto, defaults included)."""
    return MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def add_send_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        action="store_true",
        help=f"return when every receipt is verified (exit {EXIT_FAILED}: a transfer failed, "
        f"{EXIT_TIMEOUT}: --timeout passed)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --wait: give up after this many seconds (default: wait as long as it takes)",
    )


def run_send(args: argparse.Namespace, client: NodeClient) -> int:
    """The body of ``yigong send`` on an open client."""
    path: Path = args.file
    if args.timeout < 0:
        raise ConfigError("--timeout must be 0 (no limit) or a number of seconds")
    size = path.stat().st_size if path.is_file() else 0
    with Reporter.for_args(args) as progress:
        task = progress.task(f"upload {path.name}", total=size)
        reply = client.submit(
            path, args.to, case_id=args.case, media_type=args.media_type, progress=task.advance
        )
        task.done(f"stored as {reply.object.object_id[:16]}…")
        if args.json:
            out = message_dict(reply)
        else:
            print(f"stored object {reply.object.object_id} ({reply.object.size} bytes)")
            for t in reply.queued:
                print(f"queued transfer {t.transfer_id} to {t.peer_node}", flush=True)
        if not args.wait:
            if args.json:
                print(json.dumps(out, indent=2))
            return 0
        trust = TrustStore(_ca_path(args))
        status, results = wait_for_receipts(client, trust, reply, args.timeout, progress)
    if args.json:
        out["wait"] = {"status": status, "transfers": results}
        print(json.dumps(out, indent=2))
    else:
        for r in results:
            print(f"transfer {r['transfer_id']} to {r['peer']}: {r['outcome']}")
    if status == "done":
        return 0
    if status == "timeout":
        print(
            f"error: timed out after {args.timeout:g} s waiting for receipts; the transfers "
            "continue on the node (yigong query transfers --object "
            f"{reply.object.object_id[:16]}…)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    print(
        "error: " + "; ".join(r["outcome"] for r in results if r["state"] != "done"),
        file=sys.stderr,
    )
    return EXIT_FAILED


def wait_for_receipts(
    client: NodeClient,
    trust: TrustStore,
    reply: exchange_pb2.SubmitResponse,
    timeout: float,
    progress: Reporter,
) -> tuple[str, list[dict[str, str]]]:
    """Poll until every queued transfer ended; ``("done"|"failed"|"timeout", per transfer)``."""
    obj = reply.object
    pending = {t.transfer_id: t.peer_node for t in reply.queued}
    tasks: dict[str, Task] = {
        tid: progress.task(f"transfer to {peer}", total=obj.size) for tid, peer in pending.items()
    }
    results: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + timeout if timeout else None
    while pending:
        seen = {
            t.transfer_id: t
            for t in client.list_transfers(
                object_id=obj.object_id, direction="outbound", limit=1000
            )
        }
        for tid in list(pending):
            t = seen.get(tid)
            if t is None:
                continue
            tasks[tid].update(int(t.bytes_done), int(t.size) or None)
            if t.status == "done":
                results[tid] = _check_receipt(t, trust, obj)
            elif t.status == "failed":
                results[tid] = _result(t, "failed", f"failed: {t.last_error or 'no reason given'}")
            else:
                continue
            tasks[tid].done("receipt verified" if results[tid]["state"] == "done" else "FAILED")
            del pending[tid]
        if not pending:
            break
        if deadline is not None and time.monotonic() >= deadline:
            for tid in pending:
                t = seen.get(tid)
                why = f", last error: {t.last_error}" if t is not None and t.last_error else ""
                status = t.status if t is not None else "unknown"
                results[tid] = {
                    "transfer_id": tid,
                    "peer": pending[tid],
                    "state": "timeout",
                    "outcome": f"still {status} after the timeout{why}",
                }
                tasks[tid].done("timed out")
            break
        time.sleep(POLL_SECONDS)
    ordered = [results[t.transfer_id] for t in reply.queued]
    states = {r["state"] for r in ordered}
    status = "failed" if "failed" in states else "timeout" if "timeout" in states else "done"
    return status, ordered


def _result(t: common_pb2.TransferInfo, state: str, outcome: str) -> dict[str, str]:
    return {"transfer_id": t.transfer_id, "peer": t.peer_node, "state": state, "outcome": outcome}


def _check_receipt(
    t: common_pb2.TransferInfo, trust: TrustStore, obj: common_pb2.ObjectInfo
) -> dict[str, str]:
    if not t.HasField("receipt"):
        return _result(t, "failed", "done, but the node shows no receipt")
    try:
        receipt = verify_receipt(
            t.receipt.SerializeToString(),
            trust,
            expect_receiver=t.peer_node,
            expect_sha256=obj.object_id,
            expect_size=int(obj.size),
            expect_transfer_id=t.transfer_id,
        )
    except (ReceiptError, YigongError) as exc:
        return _result(t, "failed", f"receipt does not verify: {exc}")
    return _result(
        t,
        "done",
        f"delivered, receipt signed by {receipt.body.receiver_node} verified "
        f"(sha256 {receipt.body.sha256[:16]}…, {receipt.body.size} bytes)",
    )


def _ca_path(args: argparse.Namespace) -> Path:
    """The federation CA the connection uses (to verify receipts with)."""
    if getattr(args, "config", None):
        return load_config(args.config).tls.ca
    ca = args.ca or (Path(os.environ["YIGONG_CA"]) if os.environ.get("YIGONG_CA") else None)
    if ca is None:
        raise ConfigError("--wait verifies receipts against the federation CA: pass --ca")
    return Path(ca)
