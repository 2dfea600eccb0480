"""The web console's list pages at scale: server time per page against a trivial page.

Requirement (issue): lists paginate on the server; each page answers in < 300 ms of
server time with 10,000 studies and 100,000 audit entries in the catalog.

``python -m bench.console_bench run [--studies 10000] [--audit 100000] [--reps 5]``

1. A hospital node is configured (tests/cluster.py) and started once as ``yigong serve``
   so that its catalog, audit log and keys exist; with the node stopped, its catalog is
   filled through the domain's own APIs: ``StudyCatalog.add_instance`` (3 instances in
   one series per study) and ``tick`` (every study ``received``, with its report),
   ``StudyIdentities.record`` (the identity a clinician's list shows),
   ``Catalog.add_transfer``, each run inside one ``Catalog.transaction()`` per 1,000
   rows (one commit, not one per row), and the audit log through ``AuditLog.record``
   in ``AuditLog.batch()`` blocks of 1,000 (the node's key signs a checkpoint after
   each, as ``checkpoint_every`` does in production).
2. The node is started again with its console, and every list page is fetched over
   real TLS with a person certificate (one keep-alive connection per person): first
   page and a page deep in the data (a cursor 90 % of the way back).
3. Server time is the page's ``Server-Timing: app;dur=`` header (admission, page
   function, template; :mod:`gateway.web.app`); client wall time is reported too. The
   **reference**, measured in the same rounds on the same connection, is the home
   page ``/``: TLS + admission + template with no query — the floor of any page.

One untimed round, then ``--reps`` rounds, each fetching every page in rotating order;
medians. Target per page: server time < 300 ms.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench import BenchOptions, Metric, Started, Target, add_report_options
from gateway.audit import (
    CASE_CONFIRMATION,
    DICOM_INSTANCE_RECEIVED,
    OBJECT_STORED,
    QUERY,
    TRANSFER_BEGUN,
    TRANSFER_COMPLETED,
    TRANSFER_QUEUED,
    AuditLog,
)
from gateway.catalog import Catalog, iso_utc
from gateway.config import load_config
from gateway.fidelity.series import SliceGeometry
from gateway.node_setup import load_node_keys
from hospital_node.studies import InstanceRecord, StudyCatalog
from hospital_node.study_identity import StudyIdentities, StudyIdentity
from hospital_node.vault import load_or_create_key
from tests.cluster import Federation, NodeProcess, write_config
from tests.console_client import ConsoleClient, enable_console

HOSPITAL = "hospital-1"
FACTORY = "factory-1"
PAGE_TARGET = Target("<", 300)
INSTANCES_PER_STUDY = 3
ROWS_PER_COMMIT = 1000
CASES = 1000  # audit entries carry one of this many case ids (≈ audit/1000 per case)
FULL = {"studies": 10_000, "audit": 100_000, "transfers": 5_000}
QUICK = {"studies": 50, "audit": 500, "transfers": 50}
EVENT_FILTER = TRANSFER_COMPLETED  # ≈ 1 in 7 entries
_TIMING = re.compile(r"app;dur=([0-9.]+)")


def log(msg: str) -> None:
    print(f"[console_bench] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sizes:
    studies: int
    audit: int
    transfers: int


@dataclass(frozen=True)
class Page:
    key: str  # metric key part, e.g. "audit.event.deep"
    label: str
    who: str  # "clinician" | "officer"
    path: str


@dataclass
class Cursors:
    """Where the deep pages start (found in the data after it is written)."""

    study: tuple[str, str]
    audit_seq: int
    audit_head: int
    transfer_at: str
    case_id: str


# --- filling the catalog (node stopped) -----------------------------------------------------
def _uid(kind: int, n: int, m: int = 0) -> str:
    return f"1.2.826.0.1.3680043.10.543.{kind}.{n}.{m}"


def fill(cfg_path: Path, sizes: Sizes, base: datetime) -> dict[str, float]:
    """Write the studies, identities, transfers and audit entries; seconds per part."""
    cfg = load_config(cfg_path)
    took: dict[str, float] = {}
    catalog = Catalog.for_config(cfg)
    try:
        studies = StudyCatalog(catalog)
        assert cfg.deid.vault_key_file is not None
        identities = StudyIdentities(
            catalog, load_or_create_key(cfg.deid.vault_key_file, "pseudonym vault key")
        )
        t0 = time.perf_counter()
        geometry_of = _geometry
        for start in range(0, sizes.studies, ROWS_PER_COMMIT):
            with catalog.transaction():
                for n in range(start, min(start + ROWS_PER_COMMIT, sizes.studies)):
                    study = _uid(1, n)
                    series = _uid(2, n)
                    at = base + timedelta(seconds=30 * n)
                    for i in range(INSTANCES_PER_STUDY):
                        sop = _uid(3, n, i)
                        rec = InstanceRecord(
                            sop_instance_uid=sop,
                            study_uid=study,
                            series_uid=series,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax="1.2.840.10008.1.2.1",
                            modality="CT",
                            object_id=f"{n:032x}{i:032x}",
                            size=525_000,
                            calling_ae="PACS",
                            called_ae="YIGONG",
                            received_at=iso_utc(at + timedelta(seconds=i)),
                            instance_number=i + 1,
                            geometry_sha256="0" * 64,
                            pixel_sha256="1" * 64,
                            burned_in="NO",
                            duplicate=False,
                        )
                        studies.add_instance(rec, geometry_of(sop, series, i))
                    identities.record(
                        study,
                        StudyIdentity(
                            patient_name=f"Bench^Patient{n}",
                            patient_id=f"P{n:07d}",
                            birth_date="19700101",
                            sex="F",
                            study_date=at.strftime("%Y%m%d"),
                            study_description="CT mandible",
                        ),
                    )
        took["studies_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with catalog.transaction():
            studies.tick(datetime.now(UTC) + timedelta(days=3650), 0)
        took["tick_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start in range(0, sizes.transfers, ROWS_PER_COMMIT):
            with catalog.transaction():
                for n in range(start, min(start + ROWS_PER_COMMIT, sizes.transfers)):
                    catalog.add_transfer(
                        transfer_id=f"bench-{n:08d}",
                        direction="outbound",
                        object_id=f"{n:064x}",
                        peer_node=FACTORY,
                        status="done",
                        size=525_000,
                        name=f"case-{n % CASES:04d}.dcm",
                        case_id=f"CASE-{n % CASES:04d}",
                    )
        took["transfers_s"] = time.perf_counter() - t0
    finally:
        catalog.close()
    t0 = time.perf_counter()
    keys = load_node_keys(cfg)
    audit = AuditLog(
        cfg.audit.path, cfg.node.id, signer=keys.sign, checkpoint_every=cfg.audit.checkpoint_every
    )
    events = (
        DICOM_INSTANCE_RECEIVED,
        OBJECT_STORED,
        QUERY,
        TRANSFER_QUEUED,
        TRANSFER_BEGUN,
        TRANSFER_COMPLETED,
        CASE_CONFIRMATION,
    )
    try:
        for start in range(0, sizes.audit, ROWS_PER_COMMIT):
            with audit.batch():
                for n in range(start, min(start + ROWS_PER_COMMIT, sizes.audit)):
                    audit.record(
                        events[n % len(events)],
                        actor=f"node:{HOSPITAL}",
                        object_id=f"{n:064x}",
                        transfer_id=f"bench-{n % max(sizes.transfers, 1):08d}",
                        peer=FACTORY,
                        case_id=f"CASE-{n % CASES:04d}",
                        details={"bench": n},
                    )
    finally:
        audit.close()
    took["audit_s"] = time.perf_counter() - t0
    return took


def _geometry(sop: str, series: str, i: int) -> SliceGeometry:
    return SliceGeometry(
        sop_instance_uid=sop,
        series_uid=series,
        position=(0.0, 0.0, float(i)),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        pixel_spacing=(0.5, 0.5),
        slice_thickness=1.0,
        rows=512,
        columns=512,
        gantry_tilt=0.0,
        instance_number=i + 1,
    )


def cursors(cfg_path: Path, sizes: Sizes) -> Cursors:
    """Cursors 90 % of the way back in each list (read from the data, as the pages'
    "Older" links would be after paging there)."""
    cfg = load_config(cfg_path)
    catalog = Catalog.for_config(cfg)
    try:
        deep = max(0, sizes.studies * 9 // 10)
        row = catalog.query(
            "SELECT last_received_at, study_uid FROM dicom_studies"
            " ORDER BY last_received_at DESC, study_uid DESC LIMIT 1 OFFSET ?",
            (deep,),
        )[0]
        t = catalog.query(
            "SELECT created_at FROM transfers ORDER BY created_at DESC LIMIT 1 OFFSET ?",
            (max(0, sizes.transfers * 9 // 10),),
        )[0]
    finally:
        catalog.close()
    audit = AuditLog(cfg.audit.path, cfg.node.id)
    try:
        head = audit.events(limit=1, newest=True)[0].seq
    finally:
        audit.close()
    return Cursors((row[0], row[1]), max(2, head // 10), head, t[0], f"CASE-{CASES // 2:04d}")


def pages(c: Cursors) -> list[Page]:
    s_at, s_uid = c.study
    ev, case = EVENT_FILTER, c.case_id
    return [
        Page(
            "studies.first",
            "/studies, first page (clinician, identity shown)",
            "clinician",
            "/studies",
        ),
        Page(
            "studies.deep",
            "/studies, page 90 % back (before= cursor)",
            "clinician",
            f"/studies?before={s_at}&before_uid={s_uid}",
        ),
        Page("audit.first", "/audit, first page (officer)", "officer", "/audit"),
        Page(
            "audit.deep",
            "/audit, page 90 % back (before=seq)",
            "officer",
            f"/audit?before={c.audit_seq}",
        ),
        Page(
            "audit_event.first", f"/audit?event={ev}, first page", "officer", f"/audit?event={ev}"
        ),
        Page(
            "audit_event.deep",
            f"/audit?event={ev}, page 90 % back",
            "officer",
            f"/audit?event={ev}&before={c.audit_seq}",
        ),
        Page("audit_case.first", "/audit?case=, first page", "officer", f"/audit?case={case}"),
        Page(
            "audit_case.deep",
            "/audit?case=, page 90 % back",
            "officer",
            f"/audit?case={case}&before={c.audit_seq}",
        ),
        Page(
            "audit_tail.first",
            "/audit/tail, after the newest 25",
            "officer",
            f"/audit/tail?after={max(0, c.audit_head - 25)}",
        ),
        Page(
            "audit_tail.deep",
            "/audit/tail, after an entry 90 % back",
            "officer",
            f"/audit/tail?after={c.audit_seq}",
        ),
        Page("transfers.first", "/transfers, first page (officer)", "officer", "/transfers"),
        Page(
            "transfers.deep",
            "/transfers, page 90 % back (until= cursor)",
            "officer",
            f"/transfers?until={c.transfer_at}",
        ),
    ]


REFERENCE = {
    who: Page(f"reference.{who}", f"/ home page ({who}): TLS + admission + template", who, "/")
    for who in ("clinician", "officer")
}


# --- the node and the measurement -----------------------------------------------------------
class ConsoleNode(Started):
    def __init__(self, workdir: Path, sizes: Sizes) -> None:
        self.workdir = workdir
        self.sizes = sizes
        self.fed: Federation | None = None
        self.proc: NodeProcess | None = None
        self.console_port = 0
        self.fill_s: dict[str, float] = {}
        self.cursors: Cursors | None = None

    def start(self) -> None:
        self.fed = Federation(self.workdir / "fed")
        cfg = write_config(
            self.fed, self.workdir, HOSPITAL, "hospital", peers={FACTORY: "127.0.0.1:9"}
        )
        enable_console(cfg)
        first = NodeProcess(cfg, self.workdir / "hospital-first.log")
        first.start()  # creates the catalog, the audit log, the keys
        first.stop()
        log(f"filling: {self.sizes}")
        self.fill_s = fill(cfg, self.sizes, datetime(2026, 1, 1, tzinfo=UTC))
        log("filled in " + ", ".join(f"{k} {v:.1f}" for k, v in self.fill_s.items()))
        self.cursors = cursors(cfg, self.sizes)
        self.proc = NodeProcess(cfg, self.workdir / "hospital.log")
        t0 = time.perf_counter()
        self.proc.start(timeout=300)
        self.fill_s["node_start_s"] = time.perf_counter() - t0
        ready = json.loads(cfg.with_suffix(".ready").read_text())
        self.console_port = int(ready["console_port"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def _get(client: ConsoleClient, path: str) -> tuple[float, float, int]:
    """(server ms, client ms, rows) of one GET; raises unless it is a 200 page."""
    t0 = time.perf_counter()
    status, headers, body = client.request("GET", path)
    wall = (time.perf_counter() - t0) * 1000
    if status != 200:
        raise RuntimeError(f"GET {path}: HTTP {status}: {body[:400]!r}")
    found = _TIMING.search(headers.get("server-timing", ""))
    if not found:
        raise RuntimeError(f"GET {path}: no Server-Timing header")
    return float(found.group(1)), wall, body.count(b"<tr")


@dataclass
class Samples:
    server: list[float]
    client: list[float]
    rows: int = 0


def measure(node: ConsoleNode, reps: int) -> dict[str, Samples]:
    assert node.fed is not None and node.cursors is not None
    people = {
        "clinician": node.fed.person("cbench-cora", "clinician", HOSPITAL),
        "officer": node.fed.person("cbench-olga", "officer", HOSPITAL),
    }
    todo = [*REFERENCE.values(), *pages(node.cursors)]
    out = {p.key: Samples([], []) for p in todo}
    clients = {
        who: ConsoleClient(node.console_port, node.fed.ca, cert) for who, cert in people.items()
    }
    try:
        for rnd in range(reps + 1):  # round 0: untimed warm-up
            shift = rnd % len(todo)
            for p in todo[shift:] + todo[:shift]:
                server, wall, rows = _get(clients[p.who], p.path)
                if rnd:
                    out[p.key].server.append(server)
                    out[p.key].client.append(wall)
                    out[p.key].rows = rows
    finally:
        for c in clients.values():
            c.close()
    return out


def metrics(
    samples: dict[str, Samples], c: Cursors, fill_s: dict[str, float], sizes: Sizes
) -> list[Metric]:
    med = {k: statistics.median(s.server) for k, s in samples.items()}
    out: list[Metric] = []
    for ref in REFERENCE.values():
        s = samples[ref.key]
        out.append(
            Metric(
                f"console.{ref.key}.server_ms",
                f"{ref.label} (reference)",
                med[ref.key],
                "ms",
                note=f"client {statistics.median(s.client):.1f} ms",
                samples=s.server,
            )
        )
    for p in pages(c):
        s = samples[p.key]
        ref = med[REFERENCE[p.who].key]
        rng = f"{min(s.server):.1f}-{max(s.server):.1f}"
        out.append(
            Metric(
                f"console.{p.key}.server_ms",
                p.label,
                med[p.key],
                "ms",
                PAGE_TARGET,
                note=f"range {rng}; client {statistics.median(s.client):.1f} ms; {s.rows} rows",
                samples=s.server,
            )
        )
        out.append(
            Metric(
                f"console.{p.key}.ratio",
                f"{p.label} / reference",
                med[p.key] / ref if ref else None,
                "x",
                note=f"reference: / as {p.who}",
                samples=[],
            )
        )
        out.append(
            Metric(
                f"console.{p.key}.client_ms",
                f"{p.label}, client wall time",
                statistics.median(s.client),
                "ms",
                samples=s.client,
            )
        )
    note = (
        f"{sizes.studies} studies x {INSTANCES_PER_STUDY} instances, {sizes.audit} audit "
        f"entries, {sizes.transfers} transfers"
    )
    for k, v in fill_s.items():
        out.append(
            Metric(
                f"console.setup.{k}",
                f"set-up: {k.removesuffix('_s')}",
                v,
                "s",
                note=note if k == "studies_s" else "",
            )
        )
    return out


def run_sizes(sizes: Sizes, reps: int, workdir: Path | None, keep: bool) -> list[Metric]:
    work = Path(tempfile.mkdtemp(prefix="console-bench-", dir=workdir))
    try:
        with ConsoleNode(work, sizes) as node:
            samples = measure(node, reps)
            assert node.cursors is not None
            return metrics(samples, node.cursors, node.fill_s, sizes)
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(opts: BenchOptions) -> list[Metric]:
    """For ``python -m bench.run``: the full sizes (tiny ones with --quick)."""
    sizes = Sizes(**(QUICK if opts.quick else FULL))
    return run_sizes(sizes, opts.reps, opts.workdir, opts.keep)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.run import QUICK_NOTE, run_and_report

    parser = argparse.ArgumentParser(prog="python -m bench.console_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="this benchmark alone (python -m bench.run runs all)")
    p.add_argument("--studies", type=int, default=FULL["studies"], help="studies (10000)")
    p.add_argument("--audit", type=int, default=FULL["audit"], help="audit entries (100000)")
    p.add_argument("--transfers", type=int, default=FULL["transfers"], help="transfers (5000)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds over every page (5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a harness check only")
    add_report_options(p)
    args = parser.parse_args(argv)
    sizes = Sizes(**QUICK) if args.quick else Sizes(args.studies, args.audit, args.transfers)
    if min(sizes.studies, sizes.audit, sizes.transfers, args.reps) < 1:
        parser.error("--studies, --audit, --transfers and --reps must be positive")
    return run_and_report(
        "yigong-gateway console benchmark",
        f"{sizes.studies} studies, {sizes.audit} audit entries, {sizes.transfers} transfers, "
        f"{args.reps} reps{QUICK_NOTE if args.quick else ''}",
        {
            "studies": sizes.studies,
            "audit": sizes.audit,
            "transfers": sizes.transfers,
            "reps": args.reps,
            "quick": bool(args.quick),
        },
        lambda: run_sizes(sizes, args.reps, args.workdir, args.keep),
        args.json,
        args.strict,
    )


if __name__ == "__main__":
    sys.exit(main())
