"""Study delivery to a factory of 1 and of 3 replicas (PostgreSQL + S3 behind HAProxy),
against the embedded single node in the same run (issue #13). On 2 cores: indicative.

``python -m bench.replica_bench run [--instances 100] [--reps 3]``

One hospital (``yigong`` in process: DICOM, SQLite, filesystem store) holds a CT study of
``--instances`` slices (256 x 256, pushed once by dcmtk's ``storescu``). Each repetition a
clinician confirms it for a fresh case; the time measured is **confirm → every instance's
transfer done** (de-identified, sent as one exchange, stored and catalogued at the
factory, the batch's manifest receipt verified). The factory is, in turn:

* **reference** — one ``yigong serve``, SQLite and filesystem store (the embedded default);
* **1 replica** — one ``yigong serve`` on PostgreSQL (durable: fsync on) and a moto S3
  bucket, behind HAProxy (TCP mode, PROXY v2);
* **3 replicas** — three such processes behind the same HAProxy.

A study is one batch, i.e. one stream to one replica: more replicas do not speed a single
study up, and on 2 cores three factory processes, HAProxy, PostgreSQL, moto and the
hospital compete for the same CPU. What the figures show is the price of the shared
database and object store per study, and that replicas do not add to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import BenchOptions, Metric, add_report_options

FULL = {"instances": 100}
QUICK = {"instances": 12}


def log(msg: str) -> None:
    print(f"[replica_bench] {msg}", file=sys.stderr, flush=True)


def measure(instances: int, reps: int, work: Path) -> list[Metric]:
    from gateway.catalog import Catalog
    from tests.cluster import Federation, InProcessNode, NodeProcess, wait_for, write_config
    from tests.pg import start_pg, stop_pg
    from tests.replicas import ReplicaSet, haproxy_bin
    from tests.s3server import S3Server, _start, _stop, _wait_ready, new_bucket_name
    from tests.study_harness import storescu, write_study
    from yigong.v1 import hospital_pb2, hospital_pb2_grpc

    if haproxy_bin() is None or not Path("/usr/bin/storescu").exists():
        note = "needs haproxy and dcmtk (apt-get install haproxy dcmtk)"
        return [Metric("replicas.skipped", "replica bench", None, "s", note=note)]
    fed = Federation(work / "federation")
    pg = start_pg(work / "pg", durable=True)
    s3_proc, s3_port = _start(work / "moto.log")
    s3 = S3Server(f"127.0.0.1:{s3_port}")
    _wait_ready(s3)
    # one study per repetition (another patient each): a study confirmed twice to the same
    # factory would be the same de-identified bytes, already held there
    studies_written = [
        write_study(work / f"study-{i}", instances, rows=256, cols=256) for i in range(reps + 1)
    ]
    results: dict[str, list[float]] = {}
    try:
        for label, count in (("reference", 0), ("1 replica", 1), ("3 replicas", 3)):
            wd = work / label.replace(" ", "-")
            factory: ReplicaSet | NodeProcess
            if count == 0:
                fconf = write_config(fed, wd, "factory-1", "factory")
                factory = NodeProcess(fconf, wd / "factory.log")
                factory.start()
                address = factory.address
            else:
                factory = ReplicaSet(
                    fed, wd, "factory-1", "factory", database_url=pg.create_database(),
                    s3=s3, bucket=new_bucket_name(), count=count,
                ).start()  # fmt: skip
                address = factory.address
            hospital = InProcessNode(
                write_config(
                    fed, wd / "hospital", "hospital-1", "hospital",
                    peers={"factory-1": address}, dicom={"quiet_period_seconds": 0.3},
                )
            )  # fmt: skip
            try:
                for study in studies_written:
                    storescu(hospital.node.hooks._dicom.port, study)  # type: ignore[attr-defined]
                studies = hospital.node.hooks.studies  # type: ignore[attr-defined]

                def received(h: InProcessNode = hospital, st: object = studies) -> bool:
                    h.settle()
                    got = st.list_studies(status="received", limit=100)  # type: ignore[attr-defined]
                    return len(got) == len(studies_written)

                wait_for(received, 120, what="study received")
                clinician = fed.person("dr-bench", "clinician", "hospital-1")
                for rep, study in enumerate(studies_written):  # one untimed round first
                    case = f"case-{label.replace(' ', '-')}-{rep}"
                    request = hospital_pb2.ConfirmStudyRequest(
                        study_uid=study.study_uid, case_id=case, destination="factory-1"
                    )
                    began = time.perf_counter()
                    with hospital.client(fed.creds(clinician)) as dr:
                        hospital_pb2_grpc.HospitalStub(dr.channel).ConfirmStudy(
                            request, timeout=600
                        )
                    cat = hospital.node.catalog

                    def done(case: str = case, cat: Catalog = cat) -> bool:
                        # every instance's transfer done (sent in one batch from 8 on,
                        # whose manifest receipt is verified before they count as done)
                        got = cat.list_transfers(case_id=case, direction="outbound",
                                                 limit=instances + 10)  # fmt: skip
                        return len(got) >= instances and all(t.status == "done" for t in got)

                    wait_for(done, 600, interval=0.02, what=f"{case} delivered")
                    seconds = time.perf_counter() - began
                    if rep:
                        results.setdefault(label, []).append(seconds)
                    log(f"{label}, rep {rep}: {seconds:.2f} s{' (untimed)' if not rep else ''}")
            finally:
                hospital.stop()
                factory.stop()
    finally:
        _stop(s3_proc)
        stop_pg(pg)
    ref = statistics.median(results["reference"])
    metrics = [
        Metric("replicas.reference.s", "study delivered, single node (SQLite, files)", ref, "s",
               note=f"reference; {instances} instances, confirm → all delivered",
               samples=results["reference"]),
    ]  # fmt: skip
    for label in ("1 replica", "3 replicas"):
        key = label.split()[0]
        value = statistics.median(results[label])
        metrics.append(Metric(
            f"replicas.{key}.s", f"study delivered, {label} (PostgreSQL, S3, HAProxy)",
            value, "s", samples=results[label],
        ))  # fmt: skip
        metrics.append(Metric(
            f"replicas.{key}.ratio", f"{label}: single node time / this time", ref / value, "x",
            note="indicative on 2 cores",
        ))  # fmt: skip
    return metrics


def run(options: BenchOptions) -> list[Metric]:
    sizes = QUICK if options.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="replica-bench-", dir=options.workdir))
    try:
        return measure(sizes["instances"], min(options.reps, 3), work)
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replica_bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="measure and print")
    p.add_argument("--instances", type=int, default=FULL["instances"])
    p.add_argument("--reps", type=int, default=3)
    add_report_options(p)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="replica-bench-", dir=args.workdir))
    try:
        metrics = measure(args.instances, args.reps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for m in metrics:
        shown = "skipped" if m.value is None else f"{m.value:8.2f}"
        print(f"{m.label:55} {shown} {m.unit} {m.note}")
    if args.json:
        args.json.write_text(json.dumps(
            {"options": {"instances": args.instances, "reps": args.reps},
             "metrics": {m.key: m.to_json() for m in metrics}}, indent=2,
        ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
