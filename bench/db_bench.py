"""Catalog write rate on SQLite and on PostgreSQL, one process and four (issue #13).

``python -m bench.db_bench run [--objects 2000] [--reps 3]``

What one received object costs the catalog, written through the domain API exactly as
the receiver writes it (gateway/transfer/receiver.py): the inbound transfer row
(``add_transfer``), a progress update (``update_transfer(bytes_done=…)``), the object
row (``add_object``) and completion with the receipt (``update_transfer(status='done',
receipt=…)`` with a history entry) — four write transactions per object.

* **SQLite** (the embedded default, ``synchronous=FULL``, WAL): one process, and four
  processes on one file (what several writers of one node would see; SQLite serialises
  them on its file lock) — the **reference** of this run.
* **PostgreSQL** (a server started for the run from Debian's package, ``fsync=on``,
  ``synchronous_commit=on``: durable like SQLite's FULL): one process, and four
  processes (four replicas of one node sharing the database: each write transaction takes
  the database-wide advisory lock, so this shows what that serialisation costs).
* **Audit appends** (``AuditLog.record``, one durable transaction each, the chain head
  read under the writer lock; a checkpoint signed every 100): one process, and four
  processes appending to one chain — on SQLite one file, on PostgreSQL the replicas'
  shared schema serialised by ``pg_advisory_xact_lock``. Appends per second.
* **Outbox claims**: 2,000 queued sends drained by three replicas at once with
  ``FOR UPDATE SKIP LOCKED`` (no database-wide lock): claims per second, and the check
  that every send was claimed exactly once.

Reported: objects per second per configuration and the ratio PostgreSQL / SQLite. On a
2-core machine four processes contend for the cores with the server itself: figures are
indicative of the relation, not of a production server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import BenchOptions, Metric, add_report_options
from gateway.catalog import Catalog

FULL = {"objects": 2000, "claims": 2000, "audit_seconds": 5.0}
QUICK = {"objects": 100, "claims": 100, "audit_seconds": 0.5}


def log(msg: str) -> None:
    print(f"[db_bench] {msg}", file=sys.stderr, flush=True)


def _open(where: str) -> Catalog:
    if where.startswith("postgresql://"):
        return Catalog.open(where, Path("unused"))
    return Catalog(Path(where))


def write_objects(where: str, worker: int, count: int) -> float:
    """Receive ``count`` objects' worth of catalog writes; returns seconds."""
    cat = _open(where)
    try:
        began = time.perf_counter()
        for i in range(count):
            oid = hashlib.sha256(f"{worker}/{i}/{began}".encode()).hexdigest()
            tid = oid[:32]
            cat.add_transfer(
                transfer_id=tid, direction="inbound", object_id=oid, size=524_288,
                name=f"{i}.dcm", peer_node="hospital-1", status="receiving",
                header={"media_type": "application/dicom"},
            )  # fmt: skip
            cat.update_transfer(tid, "inbound", bytes_done=262_144)
            cat.add_object(
                object_id=oid, size=524_288, name=f"{i}.dcm", media_type="application/dicom",
                case_id="", origin_node="hospital-1",
            )  # fmt: skip
            cat.update_transfer(
                tid, "inbound", status="done", bytes_done=524_288, receipt=b"r" * 600,
                completed_at="2026-12-04T00:00:00.000000Z", history=("done", "receipt"),
            )  # fmt: skip
        return time.perf_counter() - began
    finally:
        cat.close()


def _worker(args: tuple[str, int, int]) -> float:
    return write_objects(*args)


def objects_per_second(where: str, processes: int, per_process: int) -> float:
    _open(where).close()  # migrate once, outside the timing
    if processes == 1:
        seconds = write_objects(where, 0, per_process)
        return per_process / seconds
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        began = time.perf_counter()
        pool.map(_worker, [(where, w, per_process) for w in range(processes)])
        seconds = time.perf_counter() - began
    return processes * per_process / seconds


def append_audit(where: str, worker: int, seconds: float) -> int:
    """Append audit events for ``seconds``; returns how many."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.audit import TRANSFER_QUEUED, AuditLog
    from gateway.db import PostgresDatabase
    from gateway.errors import AuditError

    key = ec.generate_private_key(ec.SECP256R1())
    database = (
        PostgresDatabase(where, AuditError, schema="audit", label="audit log", pool_size=1)
        if where.startswith("postgresql://") else None
    )  # fmt: skip
    path = Path(where) if database is None else Path("unused")
    log = AuditLog(
        path, "factory-1", database=database, checkpoint_every=100,
        signer=lambda data: key.sign(data, ec.ECDSA(hashes.SHA256())),
    )  # fmt: skip
    count, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        log.record(TRANSFER_QUEUED, actor=f"node:w{worker}", object_id=f"{count:064x}")
        count += 1
    log.close()
    return count


def _audit_worker(args: tuple[str, int, float]) -> int:
    return append_audit(*args)


def appends_per_second(where: str, processes: int, seconds: float) -> float:
    append_audit(where, 99, 0.0)  # create the schema outside the timing
    if processes == 1:
        return append_audit(where, 0, seconds) / seconds
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        counts = pool.map(_audit_worker, [(where, w, seconds) for w in range(processes)])
    return sum(counts) / seconds


def claims_per_second(url: str, count: int) -> tuple[float, bool]:
    """Three replicas drain ``count`` queued sends; (claims/s, each claimed once)."""
    replicas = [_open(url) for _ in range(3)]
    try:
        first = replicas[0]
        with first.transaction():
            for i in range(count):
                oid = hashlib.sha256(f"claim {i}".encode()).hexdigest()
                obj = first.add_object(
                    object_id=oid, size=1, name="x", media_type="application/octet-stream",
                    case_id="", origin_node="factory-1",
                )  # fmt: skip
                first.add_transfer(
                    transfer_id=oid[:32], direction="outbound", obj=obj,
                    peer_node="hospital-1", status="queued",
                )  # fmt: skip
        got: list[str] = []
        lock = threading.Lock()

        def drain(cat: Catalog) -> None:
            while claimed := cat.claim_due_outbound("9999", 1, set()):
                with lock:
                    got.extend(t.transfer_id for t in claimed)

        threads = [threading.Thread(target=drain, args=(r,)) for r in replicas]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - began
        once = len(got) == count and max(Counter(got).values()) == 1
        return count / seconds, once
    finally:
        for r in replicas:
            r.close()


def measure(
    objects: int, claims: int, reps: int, workdir: Path, audit_seconds: float = 5.0
) -> list[Metric]:
    from tests.pg import start_pg, stop_pg

    server = start_pg(workdir / "pg", durable=True)
    metrics: list[Metric] = []
    try:
        results: dict[str, list[float]] = {}
        for rep in range(reps):
            for engine in ("sqlite", "postgresql"):
                for procs in (1, 4):
                    if engine == "sqlite":
                        where = str(workdir / f"cat-{rep}-{procs}.sqlite")
                    else:
                        where = server.create_database()
                    rate = objects_per_second(where, procs, objects // procs)
                    results.setdefault(f"{engine}.{procs}", []).append(rate)
                    log(f"rep {rep + 1}: {engine}, {procs} process(es): {rate:.0f} objects/s")
        for procs in (1, 4):
            ref = statistics.median(results[f"sqlite.{procs}"])
            pg = statistics.median(results[f"postgresql.{procs}"])
            metrics.append(Metric(
                f"db.sqlite.{procs}p.objects_per_s", f"catalog, SQLite, {procs} process(es)",
                ref, "obj/s", note="reference: 4 write transactions per received object",
                samples=results[f"sqlite.{procs}"],
            ))  # fmt: skip
            metrics.append(Metric(
                f"db.postgresql.{procs}p.objects_per_s",
                f"catalog, PostgreSQL, {procs} process(es)", pg, "obj/s",
                samples=results[f"postgresql.{procs}"],
            ))  # fmt: skip
            metrics.append(Metric(
                f"db.postgresql.{procs}p.ratio", f"PostgreSQL / SQLite, {procs} process(es)",
                pg / ref, "x",
            ))  # fmt: skip
        audit: dict[str, list[float]] = {}
        for rep in range(reps):
            for engine in ("sqlite", "postgresql"):
                for procs in (1, 4):
                    if engine == "sqlite":
                        where = str(workdir / f"audit-{rep}-{procs}.sqlite")
                    else:
                        where = server.create_database()
                    rate = appends_per_second(where, procs, audit_seconds)
                    audit.setdefault(f"{engine}.{procs}", []).append(rate)
                    log(f"rep {rep + 1}: audit, {engine}, {procs} process(es): {rate:.0f}/s")
        for procs in (1, 4):
            ref = statistics.median(audit[f"sqlite.{procs}"])
            pg = statistics.median(audit[f"postgresql.{procs}"])
            metrics.append(Metric(
                f"db.audit.sqlite.{procs}p.per_s", f"audit appends, SQLite, {procs} process(es)",
                ref, "entries/s", note="reference", samples=audit[f"sqlite.{procs}"],
            ))  # fmt: skip
            metrics.append(Metric(
                f"db.audit.postgresql.{procs}p.per_s",
                f"audit appends, PostgreSQL, {procs} process(es)", pg, "entries/s",
                samples=audit[f"postgresql.{procs}"],
            ))  # fmt: skip
            metrics.append(Metric(
                f"db.audit.postgresql.{procs}p.ratio",
                f"audit PostgreSQL / SQLite, {procs} process(es)", pg / ref, "x",
            ))  # fmt: skip
        rates, every_once = [], True
        for _ in range(reps):
            rate, once = claims_per_second(server.create_database(), claims)
            rates.append(rate)
            every_once = every_once and once
        metrics.append(Metric(
            "db.postgresql.claims_per_s", "outbox claims, 3 replicas, SKIP LOCKED",
            statistics.median(rates), "claims/s", samples=rates,
            note="every send claimed exactly once" if every_once else "DOUBLE CLAIM",
        ))  # fmt: skip
    finally:
        stop_pg(server)
    return metrics


def run(options: BenchOptions) -> list[Metric]:
    sizes = QUICK if options.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="db-bench-", dir=options.workdir))
    try:
        return measure(
            int(sizes["objects"]), int(sizes["claims"]), min(options.reps, 3), work,
            sizes["audit_seconds"],
        )  # fmt: skip
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.db_bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="measure and print")
    p.add_argument("--objects", type=int, default=int(FULL["objects"]))
    p.add_argument("--claims", type=int, default=int(FULL["claims"]))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--audit-seconds", type=float, default=FULL["audit_seconds"])
    add_report_options(p)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="db-bench-", dir=args.workdir))
    try:
        metrics = measure(args.objects, args.claims, args.reps, work, args.audit_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for m in metrics:
        print(f"{m.label:45} {m.value:10.1f} {m.unit} {m.note}")
    if args.json:
        args.json.write_text(json.dumps(
            {"options": {"objects": args.objects, "claims": args.claims, "reps": args.reps},
             "metrics": {m.key: m.to_json() for m in metrics}}, indent=2,
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
