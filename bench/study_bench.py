"""The study as the unit: PACS → hospital → clinician's confirmation → every instance
verified at the factory, against Orthanc on the same files, in one run.

    python -m bench.study_bench run [--quick] [--slices 300 --rows 512 --cols 512]
    python -m bench.run            # every benchmark, this one included

Measured in one run (each side once; see bench/README.md, "Study benchmark"):

1. **Gateway** (``yigong serve`` hospital + factory processes, mTLS on loopback):
   the CT series is pushed with ``/usr/bin/storescu`` (one association); *ingest* is
   storescu's start until the hospital lists the study (everything acknowledged is
   catalogued). After the quiet period (short here) the study is ``received``; a
   clinician's ``Hospital.ConfirmStudy`` is *confirm* (de-identification of every
   instance, confirmation record, transfers queued); *deliver* runs from the confirm
   reply until the hospital's audit log holds ``transfer.completed`` (the factory's
   signed receipt, verified) for every transfer; *confirm → all delivered* is their
   sum. Afterwards the factory's study must list every instance.
2. **Orthanc** (Debian package ``orthanc``, two instances ``A`` and ``B`` started
   here with their defaults on loopback, own storage in the work directory,
   ``SyncStorageArea`` on): *ingest* through the same storescu into A; then
   ``POST /studies/{id}/anonymize`` on A plus ``POST /modalities/B/store`` of the
   anonymized study (DICOM C-STORE to B); then ``POST /peers/B/store`` of the original
   study (HTTP). B's instance count is checked after each. Orthanc's DICOM layer is
   dcmtk, which as packaged leaves Nagle's algorithm on (each C-STORE then waits for a
   delayed ACK, ~40 ms); so Orthanc runs twice: with dcmtk's own ``TCP_NODELAY=1`` in
   its environment (the faster one: the reference of the targets) and as packaged.
3. **Reference ingest**: the plain pynetdicom store + fsync of bench/dicom_bench.py.
4. **WAN**: the hospital reaches the factory through :mod:`bench.wan_proxy` (20 ms each
   way, 100 Mbit/s each direction). First the proxy itself is measured with a plain
   socket stream (bytes/s at the receiver ÷ link rate); then a fresh gateway pair
   runs the same study through it; reported: study bytes ÷ (first ``transfer.begun``
   → last ``transfer.completed``) ÷ link rate, and the same from the confirm call.
5. **Peak RSS** (VmHWM) of both node processes over a whole 1,000-slice study
   (ingest, confirm, delivery); 1,000 x 256x256 by default (``--rss-rows/--rss-cols``).

Ratios are time ratios: Orthanc seconds ÷ gateway seconds (≥ 1 means the gateway is
faster). ``--quick`` proves the harness works in a minute; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import BenchOptions, Metric, MiB, NodePair, Started, Target, add_report_options
from bench.dicom_bench import (
    AE_TITLE,
    CALLING_AE,
    STORESCU,
    PynetdicomReceiver,
    Series,
    SeriesSize,
    free_port,
    ingest_once,
    stop_process,
    storescu,
    write_series,
)
from bench.transfer_bench import RssSampler, proc_status_kib, process_cpu_seconds
from bench.wan_proxy import DEFAULT_DELAY_MS, DEFAULT_MBIT, link_bytes_per_s
from gateway.audit import EVENT_TYPES, AuditLog
from gateway.rpc.client import NodeClient
from tests.cluster import Federation, NodeProcess, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]
ORTHANC = Path("/usr/sbin/Orthanc")
HOSPITAL, FACTORY = "hospital-1", "factory-1"
CLINICIAN, ENGINEER = "dr-bench", "eng-bench"
CASE_ID = "CASE-BENCH-STUDY"
QUIET_PERIOD_SECONDS = 1.0
TRANSFER_TUNING = "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n"

ANON_STORE_TARGET = Target(">=", 2.0)
PEER_TARGET = Target(">=", 1.0)
INGEST_REF_TARGET = Target(">=", 1.0)
INGEST_ORTHANC_TARGET = Target(">=", 2.0)
PROXY_TARGET = Target(">=", 0.95)
WAN_TARGET = Target(">=", 0.8)
RSS_TARGET = Target("<", 300)

FULL_SERIES = SeriesSize(300, 512, 512)
FULL_RSS_SERIES = SeriesSize(1000, 256, 256)
QUICK_SERIES = SeriesSize(10, 128, 128)
QUICK_RSS_SERIES = SeriesSize(20, 64, 64)
FULL_PROBE_BYTES = 64 * MiB
QUICK_PROBE_BYTES = 2 * MiB


def log(msg: str) -> None:
    print(f"[study_bench] {msg}", file=sys.stderr, flush=True)


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process and of every live descendant (e.g. the
    hospital's de-identification workers), plus what its waited-for children used
    (``/proc/PID/stat`` utime, stime, cutime, cstime)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        p = int(stat.parent.name)
        stats[p] = fields
        children.setdefault(int(fields[1]), []).append(p)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            f = stats[p]
            total += sum(int(x) for x in f[11:15]) / tick
        todo += children.get(p, [])
    return total


def _wait(what: str, probe: Any, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"study bench: {what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


# --- the WAN proxy ---------------------------------------------------------------------------
class ProxyProcess(Started):
    """``python -m bench.wan_proxy`` in its own process (no GIL shared with the bench)."""

    def __init__(self, target: str, workdir: Path, delay_ms: float, mbit: float) -> None:
        self.target, self.workdir, self.delay_ms, self.mbit = target, workdir, delay_ms, mbit
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready, log_path = self.workdir / "proxy.ready", self.workdir / "proxy.log"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.wan_proxy", "--target", self.target]
        cmd += ["--delay-ms", str(self.delay_ms), "--mbit", str(self.mbit)]
        cmd += ["--ready-file", str(ready)]
        with open(log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT)
        _wait("the WAN proxy start", lambda: ready.exists() or self.proc.poll() is not None, 30)
        if not ready.exists():
            raise RuntimeError(f"WAN proxy did not start:\n{log_path.read_text()[-3000:]}")
        self.port = int(json.loads(ready.read_text())["port"])

    def stop(self) -> None:
        stop_process(self.proc)


@dataclass
class ProbeResult:
    nbytes: int
    seconds: float  # first → last byte at the receiver

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds


def probe_proxy(workdir: Path, nbytes: int, delay_ms: float, mbit: float) -> ProbeResult:
    """A plain socket stream of ``nbytes`` through a proxy to a sink in this process;
    the rate is measured at the sink, first byte to last byte."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    marks: dict[str, float] = {}
    got = [0]

    def receive() -> None:
        conn, _ = sink.accept()
        with conn:
            while got[0] < nbytes:
                data = conn.recv(1024 * 1024)
                if not data:
                    break
                if got[0] == 0:
                    marks["first"] = time.perf_counter()
                got[0] += len(data)
            marks["last"] = time.perf_counter()
            conn.sendall(b"k")

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    port = sink.getsockname()[1]
    block = os.urandom(1024 * 1024)
    try:
        with ProxyProcess(f"127.0.0.1:{port}", workdir, delay_ms, mbit) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=600) as conn:
                left = nbytes
                while left > 0:
                    n = min(left, len(block))
                    conn.sendall(block[:n])
                    left -= n
                conn.recv(1)
            thread.join(60)
    finally:
        sink.close()
    if got[0] != nbytes or "first" not in marks:
        raise RuntimeError(f"WAN proxy probe: {got[0]} of {nbytes} bytes arrived")
    return ProbeResult(nbytes, marks["last"] - marks["first"])


# --- the gateway -----------------------------------------------------------------------------
@dataclass
class GatewayStudyResult:
    instances: int
    ingest_s: float
    confirm_s: float
    deliver_s: float  # confirm reply → every transfer completed at the hospital
    study_bytes: int  # what was delivered (the de-identified objects)
    first_begun: float  # epoch seconds
    last_completed: float
    confirm_started: float
    confirm_replied: float
    cpu: dict[str, float] = field(default_factory=dict)  # node CPU s, confirm → all delivered
    hwm_mib: dict[str, float] = field(default_factory=dict)  # VmHWM at the end
    phases: dict[str, float] = field(default_factory=dict)  # see study_phases()

    @property
    def confirm_to_done_s(self) -> float:
        return self.confirm_s + self.deliver_s

    @property
    def transfer_window_s(self) -> float:
        return self.last_completed - self.first_begun


class GatewayStudy(NodePair):
    """A factory and a hospital node (``yigong serve``); with ``proxy`` the hospital
    reaches the factory through :mod:`bench.wan_proxy`."""

    def __init__(
        self, fed: Federation, workdir: Path, *, proxy: tuple[float, float] | None = None
    ) -> None:
        self.fed, self.workdir, self.proxy_args = fed, workdir, proxy
        self.factory: NodeProcess | None = None
        self.hospital: NodeProcess | None = None
        self.proxy: ProxyProcess | None = None
        self.dicom_port = 0
        self.audit: AuditLog | None = None
        self.factory_audit: AuditLog | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        fcfg = write_config(self.fed, self.workdir, FACTORY, "factory", extra=TRANSFER_TUNING)
        self.factory = NodeProcess(fcfg, self.workdir / f"{FACTORY}.log")
        self.factory.start(timeout=120)
        factory_address = self.factory.address
        if self.proxy_args is not None:
            delay_ms, mbit = self.proxy_args
            self.proxy = ProxyProcess(factory_address, self.workdir / "proxy", delay_ms, mbit)
            self.proxy.start()
            factory_address = self.proxy.address
        dicom: dict[str, object] = {
            "ae_title": AE_TITLE,
            "allowed_calling_aes": [CALLING_AE],
            "allowed_addresses": ["127.0.0.1"],
            "quiet_period_seconds": QUIET_PERIOD_SECONDS,
        }
        hcfg = write_config(
            self.fed,
            self.workdir,
            HOSPITAL,
            "hospital",
            peers={FACTORY: factory_address},
            extra=TRANSFER_TUNING,
            dicom=dicom,
        )
        self.hospital = NodeProcess(hcfg, self.workdir / f"{HOSPITAL}.log")
        self.hospital.start(timeout=120)
        self.dicom_port = int(json.loads(hcfg.with_suffix(".ready").read_text())["dicom_port"])
        self.audit = AuditLog(self.workdir / f"{HOSPITAL}-data" / "audit.sqlite", HOSPITAL)
        self.factory_audit = AuditLog(self.workdir / f"{FACTORY}-data" / "audit.sqlite", FACTORY)

    def stop(self) -> None:
        for log_ in (self.audit, self.factory_audit):
            if log_ is not None:
                log_.close()
        self.audit = self.factory_audit = None
        for proc in (self.hospital, self.factory):
            if proc is not None:
                proc.stop()
        if self.proxy is not None:
            self.proxy.stop()

    def _client(self, node: NodeProcess, node_id: str, who: Any) -> NodeClient:
        return NodeClient(node.address, self.fed.creds(who), node_id=node_id)

    def run(self, series: Series, timeout: float) -> GatewayStudyResult:
        from yigong.v1 import factory_pb2, factory_pb2_grpc, hospital_pb2, hospital_pb2_grpc

        assert self.hospital is not None and self.factory is not None
        node_cert = self.fed.node(HOSPITAL, "hospital")
        clinician = self.fed.person(CLINICIAN, "clinician", HOSPITAL)
        engineer = self.fed.person(ENGINEER, "engineer", FACTORY)
        with (
            self._client(self.hospital, HOSPITAL, node_cert) as node_client,
            self._client(self.hospital, HOSPITAL, clinician) as dr,
        ):
            node_stub = hospital_pb2_grpc.HospitalStub(node_client.channel)
            dr_stub = hospital_pb2_grpc.HospitalStub(dr.channel)
            node_stub.ListStudies(hospital_pb2.ListHospitalStudiesRequest(), timeout=120)
            os.sync()
            began = time.perf_counter()
            storescu(self.dicom_port, series, timeout)
            listed = node_stub.ListStudies(hospital_pb2.ListHospitalStudiesRequest(), timeout=600)
            ingest_s = time.perf_counter() - began
            if not any(s.study_uid == series.study_uid for s in listed.studies):
                raise RuntimeError("gateway: the study is not listed after storescu finished")
            get = hospital_pb2.GetHospitalStudyRequest(study_uid=series.study_uid)

            def received() -> bool:
                study = node_stub.GetStudy(get, timeout=120).study
                return study.status == "received" and study.instance_count == series.count

            _wait("the study's quiet period", received, timeout, interval=0.2)
            pids = self.pids()
            cpu_before = {k: tree_cpu_seconds(p) for k, p in pids.items()}
            alone_before = {k: process_cpu_seconds(p) for k, p in pids.items()}
            after_seq = self._last_seq()
            factory_after_seq = self._last_seq(self.factory_audit)
            request = hospital_pb2.ConfirmStudyRequest(
                study_uid=series.study_uid, case_id=CASE_ID, destination=FACTORY
            )
            confirm_started = time.time()
            began = time.perf_counter()
            reply = dr_stub.ConfirmStudy(request, timeout=timeout)
            confirm_s = time.perf_counter() - began
            confirm_replied = time.time()
            wanted = set(reply.transfer_ids)
            if len(wanted) != series.count:
                raise RuntimeError(
                    f"gateway: the confirmation queued {len(wanted)} transfers for "
                    f"{series.count} instances"
                )
            completed, sizes = self._wait_completed(wanted, after_seq, timeout)
            deliver_s = time.perf_counter() - began - confirm_s
            cpu = {k: tree_cpu_seconds(p) - cpu_before[k] for k, p in pids.items()}
            for k, p in pids.items():  # the node process alone (without its workers)
                cpu[f"{k} process"] = process_cpu_seconds(p) - alone_before[k]
        begun_times = [
            _ts(e.time)
            for e in self._events("transfer.begun", after_seq)
            if e.transfer_id in wanted
        ]
        if not begun_times and "transfer.batch.begun" in EVENT_TYPES:
            begun_times = [_ts(e.time) for e in self._events("transfer.batch.begun", after_seq)]
        if not begun_times:  # a batch exchange without attempt events: the factory's
            # first object stored (one object's wire time after the first byte) starts it
            begun_times = [
                _ts(e.time)
                for e in self._events("transfer.received", factory_after_seq, self.factory_audit)
                if e.transfer_id in wanted
            ]
        with self._client(self.factory, FACTORY, engineer) as eng:
            studies = factory_pb2_grpc.FactoryStub(eng.channel).ListStudies(
                factory_pb2.ListFactoryStudiesRequest(case_id=CASE_ID), timeout=120
            )
        at_factory = sum(s.instance_count for s in studies.studies)
        if at_factory != series.count:
            raise RuntimeError(
                f"gateway: the factory lists {at_factory} instances for case {CASE_ID}, "
                f"expected {series.count}"
            )
        hwm = {k: proc_status_kib(p).get("VmHWM", 0) / 1024 for k, p in pids.items()}
        phases = self.study_phases(wanted, after_seq, factory_after_seq, confirm_started)
        return GatewayStudyResult(
            instances=series.count,
            ingest_s=ingest_s,
            confirm_s=confirm_s,
            deliver_s=deliver_s,
            study_bytes=sum(sizes.values()),
            first_begun=min(begun_times),
            last_completed=max(completed.values()),
            confirm_started=confirm_started,
            confirm_replied=confirm_replied,
            cpu=cpu,
            hwm_mib=hwm,
            phases=phases,
        )

    def study_phases(
        self, wanted: set[str], after_seq: int, factory_after_seq: int, confirm_started: float
    ) -> dict[str, float]:
        """Where the time went, from both nodes' audit logs (epoch seconds of the events,
        relative to the confirm call where it says so):

        - ``record``: confirm call → the signed confirmation record (``case.confirmation``:
          every instance de-identified);
        - ``first_queued`` / ``last_queued``: confirm call → first / last instance queued
          (``transfer.queued``);
        - ``first_begun``: confirm call → first send attempt (``transfer.begun``, or
          ``transfer.batch.begun``);
        - ``drain``: last queued → last ``transfer.completed`` (what the exchange needs
          after the release has queued everything);
        - ``factory_window``: first → last ``transfer.received`` at the factory (objects
          stored and receipted there);
        - ``attempts``: send attempts per instance (``transfer.begun``), or per batch
          (failed attempts + 1);
        - ``first_received``: confirm call → the factory's first object stored
          (``transfer.received``);
        - ``manifest_signed`` / ``batch_completed``: confirm call → the factory signed the
          manifest (``transfer.batch.received``) / the hospital verified it
          (``transfer.batch.completed``);
        - ``median_transfer`` / ``p90_transfer``: one transfer's last ``transfer.begun``
          → its ``transfer.completed``;
        - ``batches``: study exchanges opened (``transfer.batch.opened``; 0 where every
          instance is its own exchange)."""
        out: dict[str, float] = {}

        def times(event: str, log_: AuditLog | None = None, seq: int = after_seq) -> list[Any]:
            return [e for e in self._events(event, seq, log_) if e.transfer_id in wanted]

        confirmations = self._events("case.confirmation", after_seq)
        if confirmations:
            out["record"] = _ts(confirmations[0].time) - confirm_started
        queued = sorted(_ts(e.time) for e in times("transfer.queued"))
        begun = times("transfer.begun")
        completed = {e.transfer_id: _ts(e.time) for e in times("transfer.completed")}
        if queued:
            out["first_queued"] = queued[0] - confirm_started
            out["last_queued"] = queued[-1] - confirm_started
        if begun:
            out["first_begun"] = min(_ts(e.time) for e in begun) - confirm_started
            out["attempts"] = len(begun) / max(1, len(wanted))
        if queued and completed:
            out["drain"] = max(completed.values()) - queued[-1]
        last_begun = {e.transfer_id: _ts(e.time) for e in begun}
        durations = sorted(completed[t] - last_begun[t] for t in completed if t in last_begun)
        if durations:
            out["median_transfer"] = durations[len(durations) // 2]
            out["p90_transfer"] = durations[int(len(durations) * 0.9)]
        received = sorted(
            _ts(e.time) for e in times("transfer.received", self.factory_audit, factory_after_seq)
        )
        if received:
            out["factory_window"] = received[-1] - received[0]
            out["first_received"] = received[0] - confirm_started
        if "transfer.batch.opened" in EVENT_TYPES:  # the study as one exchange (issue #10)
            opened = self._events("transfer.batch.opened", after_seq)
            out["batches"] = float(len(opened))
            if opened:
                failed = self._events("transfer.batch.failed", after_seq)
                out["attempts"] = (len(failed) + len(opened)) / len(opened)
            if "transfer.batch.begun" in EVENT_TYPES:
                began = self._events("transfer.batch.begun", after_seq)
                if began:
                    out["first_begun"] = _ts(began[0].time) - confirm_started
                    out["attempts"] = len(began) / max(1, len(opened))
            done = self._events("transfer.batch.completed", after_seq)
            if done:  # the manifest verified → every object's completion logged
                out["batch_completed"] = _ts(done[-1].time) - confirm_started
            signed = self._events("transfer.batch.received", factory_after_seq,
                                  self.factory_audit)  # fmt: skip
            if signed:
                out["manifest_signed"] = _ts(signed[-1].time) - confirm_started
        return out

    def _events(self, event: str, after_seq: int, log_: AuditLog | None = None) -> list[Any]:
        audit = log_ or self.audit
        assert audit is not None
        out: list[Any] = []
        while True:
            page = audit.events(event=event, after_seq=after_seq, limit=5000)
            out += page
            if len(page) < 5000:
                return out
            after_seq = page[-1].seq

    def _last_seq(self, log_: AuditLog | None = None) -> int:
        audit = log_ or self.audit
        assert audit is not None
        last = audit.events(limit=1, newest=True)
        return last[-1].seq if last else 0

    def _wait_completed(
        self, wanted: set[str], after_seq: int, timeout: float
    ) -> tuple[dict[str, float], dict[str, int]]:
        """Poll the hospital's audit log (its query API would audit every poll) until
        every transfer in ``wanted`` is ``transfer.completed`` (the factory's signed
        receipt verified); their completion times and object sizes."""
        done: dict[str, float] = {}
        sizes: dict[str, int] = {}
        seq = after_seq
        deadline = time.monotonic() + timeout
        while len(done) < len(wanted):
            page = self._events("transfer.completed", seq)
            for e in page:
                if e.transfer_id in wanted:
                    done[e.transfer_id] = _ts(e.time)
                    sizes[e.transfer_id] = int(e.details.get("size") or 0)
            if page:
                seq = page[-1].seq
            if len(done) == len(wanted):
                break
            for proc in (self.hospital, self.factory):
                if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
                    raise RuntimeError(f"a node exited during the study:\n{self.logs_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(done)} of {len(wanted)} transfers completed after {timeout:.0f} s:\n"
                    f"{self.logs_tail()}"
                )
            time.sleep(0.05)
        return done, sizes


def gateway_study(
    fed: Federation, workdir: Path, series: Series, timeout: float,
    proxy: tuple[float, float] | None = None, sample_rss: bool = False,
) -> tuple[GatewayStudyResult, dict[str, float]]:  # fmt: skip
    """One study through a fresh gateway pair; (result, peak sampled VmRSS MiB per node)."""
    with GatewayStudy(fed, workdir, proxy=proxy) as pair:
        if not sample_rss:
            return pair.run(series, timeout), {}
        with RssSampler(pair.pids(), interval=0.05) as sampler:
            result = pair.run(series, timeout)
        peaks = {n: sampler.peak_mib("start", n) or 0.0 for n in pair.pids()}
        return result, peaks


# --- Orthanc ---------------------------------------------------------------------------------
def orthanc_available() -> bool:
    return ORTHANC.exists()


class OrthancProcess(Started):
    """One Orthanc with its defaults, its own ports and storage under ``workdir``;
    ``nodelay`` sets dcmtk's ``TCP_NODELAY=1`` in its environment (Orthanc's DICOM
    layer is dcmtk, which as packaged leaves Nagle's algorithm on)."""

    def __init__(
        self, name: str, workdir: Path, extra: dict[str, Any] | None = None, nodelay: bool = False
    ) -> None:
        self.name, self.workdir, self.extra = name, workdir, extra or {}
        self.nodelay = nodelay
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": self.name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.name,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SyncStorageArea": True,
            "Plugins": [],
            **self.extra,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log_path = self.workdir / "orthanc.log"
        with open(log_path, "ab") as logf:
            env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
            if self.nodelay:
                env["TCP_NODELAY"] = "1"
            self.proc = subprocess.Popen(
                [str(ORTHANC), str(path)],
                cwd=self.workdir,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc {self.name} exited:\n{log_path.read_text()[-3000:]}")
            try:
                self.get("/system")
                return True
            except OSError:
                return False

        _wait(f"Orthanc {self.name} start", up, 60, interval=0.1)

    def stop(self) -> None:
        stop_process(self.proc)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else (body if isinstance(body, str) else json.dumps(body))
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=None if data is None else data.encode(),
            method=method,
        )
        with urllib.request.urlopen(req, timeout=3600) as resp:
            return json.loads(resp.read() or b"null")

    def get(self, path: str) -> Any:
        return self._call("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self._call("POST", path, body)

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


@dataclass
class OrthancResult:
    ingest_s: float
    anonymize_s: float
    store_s: float
    peer_store_s: float

    @property
    def anonymize_store_s(self) -> float:
        return self.anonymize_s + self.store_s


def orthanc_study(
    workdir: Path, series: Series, timeout: float, nodelay: bool = False
) -> OrthancResult:
    """Orthanc A and B: ingest into A by storescu, anonymize + C-STORE to B, peer store."""
    n = series.count
    with OrthancProcess("ORTHANCB", workdir / "orthanc-b", nodelay=nodelay) as b:
        extra = {
            "DicomModalities": {"B": ["ORTHANCB", "127.0.0.1", b.dicom_port]},
            "OrthancPeers": {"B": {"Url": f"http://127.0.0.1:{b.http_port}/"}},
        }
        with OrthancProcess("ORTHANCA", workdir / "orthanc-a", extra, nodelay) as a:
            os.sync()
            ingest_s = storescu(a.dicom_port, series, timeout)
            (study_id,) = a.get("/studies")
            if a.instance_count() != n:
                raise RuntimeError(f"Orthanc A holds {a.instance_count()} instances, expected {n}")
            began = time.perf_counter()
            anon = a.post(f"/studies/{study_id}/anonymize", {})
            anonymize_s = time.perf_counter() - began
            began = time.perf_counter()
            a.post("/modalities/B/store", anon["ID"])
            store_s = time.perf_counter() - began
            if b.instance_count() != n:
                raise RuntimeError(f"Orthanc B got {b.instance_count()} of {n} by C-STORE")
            began = time.perf_counter()
            a.post("/peers/B/store", study_id)
            peer_store_s = time.perf_counter() - began
            if b.instance_count() != 2 * n:
                raise RuntimeError(f"Orthanc B got {b.instance_count() - n} of {n} by peer store")
    return OrthancResult(ingest_s, anonymize_s, store_s, peer_store_s)


# --- the benchmark ---------------------------------------------------------------------------
@dataclass
class Plan:
    size: SeriesSize
    rss_size: SeriesSize | None
    probe_bytes: int
    workdir: Path | None = None
    keep: bool = False
    orthanc: bool = True
    orthanc_packaged: bool = True
    wan: bool = True
    delay_ms: float = DEFAULT_DELAY_MS
    mbit: float = DEFAULT_MBIT

    @property
    def timeout(self) -> float:
        return 1800.0


def _secs(key: str, label: str, value: float, note: str = "") -> Metric:
    return Metric(key, label, value, "s", note=note)


def _ratio(key: str, label: str, theirs: float | None, ours: float, target: Target,
           why: str = "", note: str = "") -> Metric:  # fmt: skip
    if theirs is None:
        return Metric(key, label, None, "x", target=target, note=why)
    return Metric(key, label, theirs / ours, "x", target=target, note=note)


def gateway_metrics(g: GatewayStudyResult, ref_ingest: float) -> list[Metric]:
    gap = g.first_begun - g.confirm_started
    cpu = ", ".join(f"{k} {v:.1f} s" for k, v in g.cpu.items())
    return [
        _secs("study.gateway.ingest_s", "gateway ingest (storescu → catalogued)", g.ingest_s,
              f"{g.instances / g.ingest_s:.0f} instances/s"),
        _secs("study.gateway.confirm_s", "gateway confirm (ConfirmStudy: de-identify all)",
              g.confirm_s, f"{g.confirm_s / g.instances * 1000:.1f} ms/instance"),
        _secs("study.gateway.deliver_s", "gateway confirm reply → all delivered", g.deliver_s,
              f"{g.study_bytes / MiB:.0f} MiB in {g.instances} transfers"),
        _secs("study.gateway.confirm_to_done_s", "gateway confirm → all delivered",
              g.confirm_to_done_s, f"node CPU {cpu}"),
        _secs("study.gateway.first_transfer_s", "  confirm call → first object sent", gap,
              "transfers start only after the confirmation" if gap >= g.confirm_s else
              "transfers start during the confirmation"),
        _secs("study.gateway.transfer_window_s", "  first object sent → last completed",
              g.transfer_window_s,
              f"{g.study_bytes / MiB / g.transfer_window_s:.0f} MiB/s"),
        *phase_metrics(g),
        _secs("study.pynetdicom.ingest_s", "plain pynetdicom store + fsync ingest (ref)",
              ref_ingest),
        _ratio("study.ratio_ingest_pynetdicom", "ingest: pynetdicom + fsync / gateway",
               ref_ingest, g.ingest_s, INGEST_REF_TARGET),
    ]  # fmt: skip


PHASES = (
    ("record", "  confirm call → case.confirmation audited"),
    ("first_queued", "  confirm call → first instance queued"),
    ("first_begun", "  confirm call → first send attempt begun"),
    ("first_received", "  confirm call → first object stored at the factory"),
    ("last_queued", "  confirm call → last instance queued"),
    ("manifest_signed", "  confirm call → manifest signed at the factory"),
    ("batch_completed", "  confirm call → manifest verified at the hospital"),
    ("drain", "  last queued → last transfer.completed"),
    ("factory_window", "  factory: first → last transfer.received"),
    ("median_transfer", "  one transfer, begun → completed (median)"),
    ("p90_transfer", "  one transfer, begun → completed (90th percentile)"),
)


def phase_metrics(g: GatewayStudyResult) -> list[Metric]:
    """Where the time goes (no targets): see :meth:`GatewayStudy.study_phases`."""
    out = [_secs(f"study.gateway.phase.{k}", label, g.phases[k]) for k, label in PHASES
           if k in g.phases]  # fmt: skip
    if "attempts" in g.phases:
        batches = g.phases.get("batches", 0)
        per = "batch" if batches else "instance"
        out.append(Metric("study.gateway.phase.attempts", f"  send attempts per {per}",
                          g.phases["attempts"], "x",
                          note=f"{batches:.0f} batch exchange(s)"))  # fmt: skip
    return out


def orthanc_metrics(
    o: OrthancResult | None, packaged: OrthancResult | None, g: GatewayStudyResult, why: str
) -> list[Metric]:
    """``o``: Orthanc with TCP_NODELAY=1 (the reference the targets use: the faster
    Orthanc); ``packaged``: Orthanc as packaged (Nagle on), reported alongside."""
    ours = g.confirm_to_done_s
    out: list[Metric] = []
    for key, what, r in (
        ("orthanc", "TCP_NODELAY=1", o),
        ("orthanc_packaged", "packaged", packaged),
    ):
        if r is None:
            continue
        out += [
            _secs(f"study.{key}.ingest_s", f"Orthanc ({what}) ingest (storescu)", r.ingest_s),
            _secs(f"study.{key}.anonymize_s", f"Orthanc ({what}) /studies/{{id}}/anonymize",
                  r.anonymize_s),
            _secs(f"study.{key}.store_s", f"Orthanc ({what}) /modalities/B/store (C-STORE)",
                  r.store_s),
            _secs(f"study.{key}.anonymize_store_s", f"Orthanc ({what}) anonymize + DICOM store",
                  r.anonymize_store_s),
            _secs(f"study.{key}.peer_store_s", f"Orthanc ({what}) /peers/B/store (HTTP)",
                  r.peer_store_s),
        ]  # fmt: skip
    if o is None:
        out.append(Metric("study.orthanc.anonymize_store_s", "Orthanc anonymize + DICOM store",
                          None, "s", note=why))  # fmt: skip
    out += [
        _ratio("study.ratio_anonymize_store", "Orthanc anonymize+store / gateway confirm→done",
               o.anonymize_store_s if o else None, ours, ANON_STORE_TARGET, why),
        _ratio("study.ratio_peer_store", "Orthanc peer store / gateway confirm→done (stretch)",
               o.peer_store_s if o else None, ours, PEER_TARGET, why),
        _ratio("study.ratio_ingest_orthanc", "ingest: Orthanc / gateway",
               o.ingest_s if o else None, g.ingest_s, INGEST_ORTHANC_TARGET, why),
    ]  # fmt: skip
    if packaged is not None:
        out += [
            Metric("study.ratio_anonymize_store_packaged",
                   "  the same, Orthanc as packaged (Nagle on)",
                   packaged.anonymize_store_s / ours, "x"),
            Metric("study.ratio_ingest_orthanc_packaged",
                   "  ingest, Orthanc as packaged (Nagle on)",
                   packaged.ingest_s / g.ingest_s, "x"),
        ]  # fmt: skip
    return out


def wan_metrics(probe: ProbeResult, w: GatewayStudyResult, plan: Plan) -> list[Metric]:
    link = link_bytes_per_s(plan.mbit)
    from_confirm = w.last_completed - w.confirm_started
    return [
        Metric("study.wan.proxy_ratio", "WAN proxy: plain socket stream / link rate",
               probe.bytes_per_s / link, "x", target=PROXY_TARGET,
               note=f"{probe.nbytes / MiB:.0f} MiB at {probe.bytes_per_s / 1e6:.2f} MB/s; "
               f"link {plan.mbit:g} Mbit/s, RTT {2 * plan.delay_ms:g} ms"),
        _secs("study.wan.confirm_to_done_s", "WAN gateway confirm → all delivered",
              w.confirm_to_done_s, f"confirm {w.confirm_s:.1f} s"),
        Metric("study.wan.ratio", "WAN: study bytes/s (transfers) / link rate",
               w.study_bytes / w.transfer_window_s / link, "x", target=WAN_TARGET,
               note=f"{w.study_bytes / MiB:.0f} MiB in {w.transfer_window_s:.1f} s, first "
               "object sent → last completed"),
        Metric("study.wan.ratio_from_confirm", "WAN: study bytes/s from confirm / link rate",
               w.study_bytes / from_confirm / link, "x",
               note=f"{from_confirm:.1f} s, de-identification included"),
    ]  # fmt: skip


def rss_metrics(r: GatewayStudyResult | None, peaks: dict[str, float], size: SeriesSize | None,
                why: str = "") -> list[Metric]:  # fmt: skip
    out = []
    for name in ("hospital", "factory"):
        if r is None or size is None:
            out.append(Metric(f"study.rss.{name}_peak_mib", f"peak RSS {name}, study", None,
                              "MiB", target=RSS_TARGET, note=why))  # fmt: skip
            continue
        out.append(
            Metric(f"study.rss.{name}_peak_mib", f"peak RSS {name} (VmHWM), {size.slices}-slice "
                   "study", r.hwm_mib[name], "MiB", target=RSS_TARGET,
                   note=f"{size}; sampled VmRSS peak {peaks.get(name, 0):.0f} MiB")
        )  # fmt: skip
    return out


def run_plan(plan: Plan) -> list[Metric]:
    if plan.workdir is not None:
        plan.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="yigong-study-bench-", dir=plan.workdir))
    log(f"work directory {workdir}")
    try:
        if not STORESCU.exists():
            why = f"skipped: {STORESCU} missing (apt-get install dcmtk)"
            log(why)
            return [Metric("study.gateway.confirm_to_done_s", "gateway confirm → all delivered",
                           None, "s", note=why)]  # fmt: skip
        log(f"writing a {plan.size} CT series")
        series = write_series(workdir / "series", plan.size)
        metrics = [
            Metric("study.series_instances", "CT study (storescu, one association)",
                   series.count, "files",
                   note=f"{plan.size}, {series.file_bytes / MiB:.0f} MiB"),
        ]  # fmt: skip
        fed = Federation(workdir / "federation")
        log("reference: plain pynetdicom store + fsync")
        with PynetdicomReceiver(workdir / "pynetdicom", fsync=True) as ref:
            ref_ingest = ingest_once(ref, series, plan.timeout).seconds
        orthanc: OrthancResult | None = None
        packaged: OrthancResult | None = None
        why = ""
        if not plan.orthanc:
            why = "skipped: --no-orthanc"
        elif not orthanc_available():
            why = f"skipped: {ORTHANC} missing (apt-get install orthanc)"
        else:
            log("Orthanc (TCP_NODELAY=1): ingest, anonymize + DICOM store, peer store")
            orthanc = orthanc_study(workdir / "orthanc", series, plan.timeout, nodelay=True)
            shutil.rmtree(workdir / "orthanc", ignore_errors=True)
            if plan.orthanc_packaged:
                log("Orthanc as packaged (Nagle on): the same")
                packaged = orthanc_study(workdir / "orthanc", series, plan.timeout)
                shutil.rmtree(workdir / "orthanc", ignore_errors=True)
        if why:
            log(why)
        log("gateway: ingest, confirm, delivery")
        g, _ = gateway_study(fed, workdir / "gateway", series, plan.timeout)
        shutil.rmtree(workdir / "gateway", ignore_errors=True)
        metrics += gateway_metrics(g, ref_ingest)
        metrics += orthanc_metrics(orthanc, packaged, g, why)
        if plan.wan:
            log(f"WAN proxy probe: {plan.probe_bytes / MiB:.0f} MiB plain socket stream")
            probe = probe_proxy(workdir / "probe", plan.probe_bytes, plan.delay_ms, plan.mbit)
            log("gateway through the WAN proxy")
            w, _ = gateway_study(fed, workdir / "wan", series, plan.timeout,
                                 proxy=(plan.delay_ms, plan.mbit))  # fmt: skip
            shutil.rmtree(workdir / "wan", ignore_errors=True)
            metrics += wan_metrics(probe, w, plan)
        if plan.rss_size is not None:
            log(f"peak RSS: writing a {plan.rss_size} study")
            shutil.rmtree(workdir / "series", ignore_errors=True)
            big = write_series(workdir / "rss-series", plan.rss_size)
            r, peaks = gateway_study(fed, workdir / "rss", big, plan.timeout, sample_rss=True)
            metrics += rss_metrics(r, peaks, plan.rss_size)
        else:
            metrics += rss_metrics(None, {}, None, "skipped: --no-rss")
        return metrics
    finally:
        if plan.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(opts: BenchOptions) -> list[Metric]:
    """The study benchmark at full size (300 x 512x512; RSS 1,000 x 256x256) or
    ``--quick``; one study per side (``opts.reps`` is not used: a study is long)."""
    if opts.quick:
        plan = Plan(QUICK_SERIES, QUICK_RSS_SERIES, QUICK_PROBE_BYTES, opts.workdir, opts.keep)
    else:
        plan = Plan(FULL_SERIES, FULL_RSS_SERIES, FULL_PROBE_BYTES, opts.workdir, opts.keep)
    return run_plan(plan)


# --- command line ----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from bench.run import QUICK_NOTE, run_and_report

    parser = argparse.ArgumentParser(prog="python -m bench.study_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="this benchmark alone (python -m bench.run runs all)")
    p.add_argument("--quick", action="store_true", help="tiny study: a harness check only")
    p.add_argument("--slices", type=int, help="study length (300)")
    p.add_argument("--rows", type=int, help="rows per slice (512)")
    p.add_argument("--cols", type=int, help="columns per slice (512)")
    p.add_argument("--rss-slices", type=int, help="RSS study length (1000; 0 skips)")
    p.add_argument("--rss-rows", type=int, help="RSS study rows (256)")
    p.add_argument("--rss-cols", type=int, help="RSS study columns (256)")
    p.add_argument("--probe-mib", type=int, help="WAN proxy probe stream, MiB (64)")
    p.add_argument("--no-orthanc", action="store_true", help="gateway side only")
    p.add_argument("--no-wan", action="store_true", help="skip the WAN run")
    add_report_options(p)
    args = parser.parse_args(argv)
    for name in ("slices", "rows", "cols", "rss_rows", "rss_cols", "probe_mib"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    base, rss = (QUICK_SERIES, QUICK_RSS_SERIES) if args.quick else (FULL_SERIES, FULL_RSS_SERIES)
    size = SeriesSize(args.slices or base.slices, args.rows or base.rows, args.cols or base.cols)
    rss_slices = rss.slices if args.rss_slices is None else args.rss_slices
    rss_size = (
        SeriesSize(rss_slices, args.rss_rows or rss.rows, args.rss_cols or rss.cols)
        if rss_slices > 0
        else None
    )
    probe = args.probe_mib * MiB if args.probe_mib else (
        QUICK_PROBE_BYTES if args.quick else FULL_PROBE_BYTES)  # fmt: skip
    plan = Plan(size, rss_size, probe, args.workdir, args.keep, orthanc=not args.no_orthanc,
                wan=not args.no_wan)  # fmt: skip
    return run_and_report(
        "yigong-gateway study benchmark",
        f"study {size}, RSS study {rss_size or 'skipped'}{QUICK_NOTE if args.quick else ''}",
        {"study": str(size), "rss_study": str(rss_size), "quick": bool(args.quick)},
        lambda: run_plan(plan),
        args.json,
        args.strict,
    )


if __name__ == "__main__":
    sys.exit(main())
