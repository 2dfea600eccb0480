"""DICOM ingest into the hospital node against dcmtk and pynetdicom stores, and
de-identification throughput against ``dicognito``, all in one run.

Requirement (issue): ingest of a 300-slice 512x512 CT through dcmtk's ``storescu``,
durable and catalogued, no slower than a plain pynetdicom store (ratio to dcmtk's
``storescp`` reported too); de-identification at least 3x ``dicognito`` on the same
files. See bench/README.md for what each figure means and the latest results.

1. **Ingest.** The series is written once (``tests/dicom_factory.py``, uncompressed
   Explicit VR Little Endian, ~515 KiB per file) and pushed with
   ``/usr/bin/storescu ... +sd DIR`` — all files in one association, the same
   command line for every receiver — and the figure is the wall time from starting
   storescu until the receiver holds everything as its label says: for the gateway
   that includes waiting (a ``Hospital.ListStudies`` query on a connection opened
   before the clock started) until every acknowledged instance is catalogued.
   Receivers (each in its own process, listening on 127.0.0.1):

   - ``dcmtk``: ``/usr/bin/storescp -od DIR`` with ``TCP_NODELAY=1`` (dcmtk's own
     switch; without it each instance waits ~40 ms for a delayed ACK, see
     ``dcmtk_default``). dcmtk never fsyncs what it stores.
   - ``dcmtk_default``: the same, as packaged (Nagle left on).
   - ``pynetdicom`` (**the reference**): a plain pynetdicom 3 SCP (``python -m
     bench.dicom_bench pynetdicom-scp``: ``AE()`` defaults, all storage contexts)
     whose C-STORE handler writes ``event.encoded_dataset()`` (preamble, meta and
     the data set as received, not decoded) to a file and fsyncs it before
     returning 0x0000: the cheapest durable plain store.
   - ``pynetdicom_nofsync``: the same without the fsync.
   - ``pynetdicom_matched``: the durable reference with the node's association
     settings: 256 KiB max PDU and the node's TCP_NODELAY + per-read TCP_QUICKACK.
   - ``gateway``: a hospital node as a ``yigong serve`` process (fresh data directory
     for every repetition so each instance is new to it), checked after every run:
     ``Hospital.GetStudy`` must list exactly the object ids expected for the files.

   One untimed warm-up of every receiver, then ``reps`` rounds in rotating order,
   ``os.sync()`` before each run; medians are compared. Ratios are throughput ratios:
   gateway instances/s ÷ reference instances/s = reference seconds ÷ gateway
   seconds, so ≥ 1.0 means the gateway is no slower. ``ingest.cost.*`` splits the
   node's own work per instance (``Ingest.ingest`` in this process) into its parts.

2. **De-identification.** The same files, read into memory first; timed: our
   :meth:`Deidentifier.deidentify_part10` (parse, PS3.15 profile, geometry and pixel
   checks, write) over every file, against ``dicognito.anonymizer.Anonymizer`` with
   the same parse (``dcmread``) and write (``dcmwrite(..., enforce_file_format=True)``,
   as dicognito's own command line does) around ``anonymize``. One process, one
   de-identifier per pass (created untimed), warm-up, ``reps`` rounds (at least 3),
   medians. ``deid.cost.*`` splits one of our instances into its parts, measured
   separately with the same public functions on the same files; ``deid.floor.*`` are
   two lower bounds without any de-identification (a pydicom read + write, and one
   pass over the raw elements).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import BenchOptions, Metric, MiB, Started, Target, add_report_options
from gateway.config import DicomSection
from gateway.hashing import sha256_hex
from hospital_node.deid import Deidentifier
from hospital_node.ingest import wrap_dataset
from tests.cluster import Federation, NodeProcess, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]
STORESCU = Path("/usr/bin/storescu")  # pynetdicom's own `storescu` comes first on PATH
STORESCP = Path("/usr/bin/storescp")
AE_TITLE = "YIGONG"
CALLING_AE = "PACS"
HOSPITAL = "hospital-1"
PSEUDONYM = "CASE-BENCH-0001"
DEID_KEY = bytes(range(32))  # a fixed test key: the figures do not depend on it
NODE_MAX_PDU = DicomSection().max_pdu_bytes
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
INGEST_TARGET = Target(">=", 1.0)
DEID_TARGET = Target(">=", 3.0)
MIN_DEID_REPS = 3


def log(msg: str) -> None:
    print(f"[dicom_bench] {msg}", file=sys.stderr, flush=True)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _mib(nbytes: float) -> str:
    mib = nbytes / MiB
    return f"{mib:.1f} MiB" if mib < 10 else f"{mib:.0f} MiB"


# --- the series ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesSize:
    slices: int
    rows: int
    cols: int

    def __str__(self) -> str:
        return f"{self.slices} x {self.rows}x{self.cols}"


FULL_SERIES = SeriesSize(300, 512, 512)
QUICK_SERIES = SeriesSize(10, 128, 128)
"""--quick: proves the harness works in seconds; the figures mean nothing."""


@dataclass(frozen=True)
class Series:
    """A CT series on disk and what every receiver must end up with."""

    directory: Path
    files: tuple[Path, ...]
    study_uid: str
    file_bytes: int  # sum of the file sizes
    dataset_bytes: int  # sum of the data sets (what travels in C-STOREs)
    object_ids: frozenset[str]  # the gateway's object ids (SHA-256 of its Part-10 objects)

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def mean_kib(self) -> float:
        return self.file_bytes / self.count / 1024


def node_part10(path: Path) -> bytes:
    """The Part-10 object the hospital node stores for the file ``path``: its own File
    Meta group and the data set bytes exactly as sent (``hospital_node.ingest``)."""
    from pynetdicom.dsutils import split_dataset

    meta, offset = split_dataset(path)
    return wrap_dataset(
        path.read_bytes()[offset:],
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax=str(meta.TransferSyntaxUID),
    )


def write_series(directory: Path, size: SeriesSize) -> Series:
    """Write one axial CT series (Explicit VR Little Endian) as ``0000.dcm`` ... and
    compute the object id the hospital node must give each file."""
    from pynetdicom.dsutils import split_dataset

    from tests.dicom_factory import ct_series, to_part10

    directory.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    object_ids: set[str] = set()
    study_uid = ""
    file_bytes = dataset_bytes = 0
    for index, ds in enumerate(ct_series(size.slices, rows=size.rows, cols=size.cols)):
        path = directory / f"{index:04d}.dcm"
        data = to_part10(ds)
        path.write_bytes(data)
        files.append(path)
        study_uid = str(ds.StudyInstanceUID)
        file_bytes += len(data)
        dataset_bytes += len(data) - split_dataset(path)[1]
        object_ids.add(sha256_hex(node_part10(path)))
    os.sync()
    return Series(
        directory, tuple(files), study_uid, file_bytes, dataset_bytes, frozenset(object_ids)
    )


# --- storescu (the PACS) ---------------------------------------------------------------------
def storescu(port: int, series: Series, timeout: float) -> float:
    """Push every file of ``series`` in one association; the process's wall time (s)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}  # as a PACS would
    cmd = [str(STORESCU), "-aet", CALLING_AE, "-aec", AE_TITLE, "127.0.0.1", str(port)]
    cmd += ["+sd", str(series.directory)]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"storescu failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"receiver on port {port} did not start:\n{log_path.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def count_files(directory: Path) -> tuple[int, int]:
    """(files, bytes) directly in ``directory``."""
    sizes = [p.stat().st_size for p in directory.iterdir() if p.is_file()]
    return len(sizes), sum(sizes)


def empty_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


# --- receivers -------------------------------------------------------------------------------
class Receiver(Started):
    """One side of the ingest comparison: ``start`` once, then for every run
    ``prepare`` → storescu → ``collect`` (instances, bytes stored) → ``finish``."""

    name = ""
    label = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0

    def prepare(self) -> None:
        """Before a run, untimed."""

    def settle(self, series: Series) -> None:
        """Right after storescu, timed with it: wait until what was acknowledged is
        where the receiver's figure says it is (the gateway: catalogued)."""

    def collect(self, series: Series) -> tuple[int, int]:
        """After a run, untimed: (instances stored, bytes stored); raises if incomplete."""
        raise NotImplementedError

    def finish(self) -> None:
        """After a run, untimed: free the disk."""


class FileReceiver(Receiver):
    """A receiver process that writes one file per instance into ``workdir/out``."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.out = workdir / "out"
        self.log_path = workdir / "receiver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self) -> None:
        empty_directory(self.out)
        cmd, env = self.command()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT, env=env
            )
        self.port = self.wait_port()

    def wait_port(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)

    def prepare(self) -> None:
        empty_directory(self.out)

    def collect(self, series: Series) -> tuple[int, int]:
        files, nbytes = count_files(self.out)
        if files != series.count or nbytes < series.dataset_bytes:
            raise RuntimeError(
                f"{self.name}: {files} files / {nbytes} bytes stored, expected {series.count} "
                f"files of at least {series.dataset_bytes} bytes; see {self.log_path}"
            )
        return files, nbytes

    def finish(self) -> None:
        empty_directory(self.out)


class DcmtkReceiver(FileReceiver):
    """``/usr/bin/storescp -od DIR`` (normal mode: parses each data set and writes it
    as a file; dcmtk 3.6.7 never fsyncs). ``nodelay`` sets dcmtk's ``TCP_NODELAY=1``."""

    def __init__(self, workdir: Path, *, nodelay: bool) -> None:
        super().__init__(workdir)
        self.nodelay = nodelay
        if nodelay:
            self.name, self.label = "dcmtk", "dcmtk storescp, TCP_NODELAY=1 (no fsync)"
        else:
            self.name, self.label = "dcmtk_default", "dcmtk storescp as packaged (no fsync)"

    def command(self) -> tuple[list[str], dict[str, str]]:
        self._port = free_port()
        cmd = [str(STORESCP), "-aet", AE_TITLE, "-dhl", "-od", str(self.out), str(self._port)]
        env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
        if self.nodelay:
            env["TCP_NODELAY"] = "1"
        return cmd, env

    def wait_port(self) -> int:
        assert self.proc is not None
        wait_listening(self._port, self.proc, self.log_path)
        return self._port


class PynetdicomReceiver(FileReceiver):
    """The plain pynetdicom store, ``python -m bench.dicom_bench pynetdicom-scp``."""

    def __init__(self, workdir: Path, *, fsync: bool, matched: bool = False) -> None:
        super().__init__(workdir)
        self.fsync = fsync
        self.matched = matched
        if matched:
            self.name = "pynetdicom_matched"
            self.label = "pynetdicom + fsync, node's PDU and TCP options"
        elif fsync:
            self.name, self.label = "pynetdicom", "plain pynetdicom store + fsync (reference)"
        else:
            self.name, self.label = "pynetdicom_nofsync", "plain pynetdicom store, no fsync"

    def command(self) -> tuple[list[str], dict[str, str]]:
        self.ready = self.workdir / "scp.ready"
        self.ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.dicom_bench", "pynetdicom-scp"]
        cmd += ["--out", str(self.out), "--ready-file", str(self.ready)]
        if not self.fsync:
            cmd.append("--no-fsync")
        if self.matched:
            cmd.append("--matched")
        return cmd, dict(os.environ)

    def wait_port(self) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if self.ready.exists():
                return int(json.loads(self.ready.read_text())["port"])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"pynetdicom SCP did not start:\n{self.log_path.read_text()[-3000:]}")


class GatewayReceiver(Receiver):
    """A hospital node (``yigong serve``), fresh for every run (so every instance is new
    to it: a resent identical instance is not written again); after the run its
    ``Hospital.GetStudy`` must list exactly the expected object ids."""

    name = "gateway"
    label = "gateway hospital node (durable, catalogued)"

    def __init__(self, workdir: Path, fed: Federation) -> None:
        super().__init__(workdir)
        self.fed = fed
        self.runs = 0
        self.node: NodeProcess | None = None
        self.node_dir: Path | None = None
        self.client: Any = None
        self.stub: Any = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)

    def prepare(self) -> None:
        self.runs += 1
        self.node_dir = self.workdir / f"run-{self.runs}"
        dicom: dict[str, object] = {
            "ae_title": AE_TITLE,
            "allowed_calling_aes": [CALLING_AE],
            "allowed_addresses": ["127.0.0.1"],
            # the completeness report is computed after the quiet period, not at ingest
            "quiet_period_seconds": 3600.0,
        }
        config = write_config(self.fed, self.node_dir, HOSPITAL, "hospital", dicom=dicom)
        self.node = NodeProcess(config, self.node_dir / "node.log")
        self.node.start()
        ready = json.loads(config.with_suffix(".ready").read_text())
        self.port = int(ready["dicom_port"])
        from gateway.rpc.client import NodeClient
        from yigong.v1 import hospital_pb2_grpc

        creds = self.fed.creds(self.fed.node(HOSPITAL, "hospital"))
        self.client = NodeClient(self.node.address, creds, node_id=HOSPITAL)
        self.stub = hospital_pb2_grpc.HospitalStub(self.client.channel)
        self._list_studies()  # connected before the clock starts

    def _list_studies(self) -> Any:
        from yigong.v1 import hospital_pb2

        return self.stub.ListStudies(hospital_pb2.ListHospitalStudiesRequest(), timeout=120)

    def settle(self, series: Series) -> None:
        """The node acknowledges an instance once it is durable in its spool and files it
        (store, audit, catalog) right after; a query waits until everything acknowledged
        is filed, so the clock stops only when all of it is catalogued."""
        listed = self._list_studies()
        if not any(s.study_uid == series.study_uid for s in listed.studies):
            raise RuntimeError("gateway: the study is not listed after storescu finished")

    def collect(self, series: Series) -> tuple[int, int]:
        from gateway.rpc.client import NodeClient
        from yigong.v1 import hospital_pb2, hospital_pb2_grpc

        assert self.node is not None
        creds = self.fed.creds(self.fed.node(HOSPITAL, "hospital"))
        with NodeClient(self.node.address, creds, node_id=HOSPITAL) as client:
            stub = hospital_pb2_grpc.HospitalStub(client.channel)
            study = stub.GetStudy(
                hospital_pb2.GetHospitalStudyRequest(study_uid=series.study_uid), timeout=60
            )
            ids = {i.object_id for i in study.instances}
            sizes = {o.object_id: o.size for o in client.list_objects(limit=1000)}
        if ids != series.object_ids or study.study.instance_count != series.count:
            raise RuntimeError(
                f"gateway catalogued {len(ids)} instances ({study.study.instance_count} "
                f"counted), expected {series.count}; {len(ids & series.object_ids)} match"
            )
        return len(ids), sum(sizes.get(i, 0) for i in ids)

    def finish(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.stop()
        if self.node_dir is not None:
            shutil.rmtree(self.node_dir, ignore_errors=True)

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None


# --- the plain pynetdicom SCP (reference), run as its own process ------------------------------
def serve_pynetdicom(out: Path, *, fsync: bool, matched: bool) -> tuple[Any, int]:
    """A minimal pynetdicom storage SCP on 127.0.0.1 (free port): each C-STORE's data set
    is written as received, with preamble and File Meta, to ``out/<SOP Instance UID>.dcm``
    (and fsynced) before the success status goes back."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def on_store(event: Any) -> int:
        path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        with open(path, "wb") as fh:
            fh.write(event.encoded_dataset())
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        return 0x0000

    ae = AE(ae_title=AE_TITLE)
    ae.supported_contexts = AllStoragePresentationContexts
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
    if matched:
        ae.maximum_pdu_size = NODE_MAX_PDU
        handlers.append((evt.EVT_CONN_OPEN, _node_socket_options))
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    assert server is not None  # block=False returns the server
    return server, int(server.server_address[1])


def _node_socket_options(event: Any) -> None:
    """What ``hospital_node.wire.scp.DicomServer._on_conn_open`` does: TCP_NODELAY, and
    TCP_QUICKACK re-armed after every read."""
    asock = event.assoc.dul.socket
    sock = asock.socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    read = asock.recv

    def recv_and_ack(nr_bytes: int) -> bytearray:
        data: bytearray = read(nr_bytes)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return data

    asock.recv = recv_and_ack


def _serve_main(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    server, port = serve_pynetdicom(args.out, fsync=not args.no_fsync, matched=args.matched)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, args.ready_file)
    while not done.wait(0.5):
        pass
    server.shutdown()
    return 0


# --- ingest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestResult:
    side: str
    seconds: float
    instances: int
    stored_bytes: int

    @property
    def per_s(self) -> float:
        return self.instances / self.seconds


def ingest_once(receiver: Receiver, series: Series, timeout: float) -> IngestResult:
    receiver.prepare()
    try:
        os.sync()
        began = time.perf_counter()
        storescu(receiver.port, series, timeout)
        receiver.settle(series)
        seconds = time.perf_counter() - began
        instances, stored = receiver.collect(series)
    finally:
        receiver.finish()
    return IngestResult(receiver.name, seconds, instances, stored)


def ingest_receivers(workdir: Path, fed: Federation) -> list[Receiver]:
    """Every side of the ingest comparison, in the order they are first run."""
    return [
        DcmtkReceiver(workdir / "dcmtk", nodelay=True),
        PynetdicomReceiver(workdir / "pynetdicom", fsync=True),
        GatewayReceiver(workdir / "gateway", fed),
        PynetdicomReceiver(workdir / "pynetdicom-nofsync", fsync=False),
        PynetdicomReceiver(workdir / "pynetdicom-matched", fsync=True, matched=True),
        DcmtkReceiver(workdir / "dcmtk-default", nodelay=False),
    ]


def run_ingest(
    receivers: Sequence[Receiver], series: Series, reps: int, *, warmup: bool = True
) -> dict[str, list[IngestResult]]:
    """``reps`` rounds over every receiver in rotating order (after one untimed warm-up)."""
    results: dict[str, list[IngestResult]] = {r.name: [] for r in receivers}
    timeout = max(120.0, 2.0 * series.count)
    started: list[Receiver] = []
    try:
        for receiver in receivers:
            receiver.start()
            started.append(receiver)
        if warmup:
            log("ingest warm-up (not counted)")
            for receiver in receivers:
                ingest_once(receiver, series, timeout)
        for i in range(reps):
            shift = i % len(receivers)
            for receiver in [*receivers[shift:], *receivers[:shift]]:
                r = ingest_once(receiver, series, timeout)
                results[receiver.name].append(r)
                log(f"{receiver.name:20s} {i + 1}: {r.seconds:7.3f} s ({r.per_s:6.1f} instances/s)")
    finally:
        for receiver in started:
            receiver.stop()
    return results


def ingest_metrics(
    receivers: Sequence[Receiver], results: dict[str, list[IngestResult]], series: Series
) -> list[Metric]:
    medians = {name: _median([r.seconds for r in rs]) for name, rs in results.items()}

    def note(name: str) -> str:
        secs = [r.seconds for r in results[name]]
        return (
            f"{medians[name]:.2f} s (median of {len(secs)}, {min(secs):.2f}-{max(secs):.2f}), "
            f"{_mib(series.file_bytes / medians[name])}/s"
        )

    metrics: list[Metric] = []
    for receiver in receivers:
        name = receiver.name
        metrics.append(
            Metric(
                f"ingest.{name}_per_s",
                receiver.label,
                series.count / medians[name],
                "inst/s",
                note=note(name),
                samples=[r.per_s for r in results[name]],
            )
        )

    def ratio(key: str, label: str, ref: str, target: Target | None, why: str) -> Metric:
        pairs = [g.per_s / b.per_s for g, b in zip(results["gateway"], results[ref], strict=True)]
        return Metric(
            key,
            label,
            medians[ref] / medians["gateway"],
            "x",
            target=target,
            note=f"per-round {min(pairs):.2f}-{max(pairs):.2f}; {why}",
            samples=pairs,
        )

    metrics += [
        ratio(
            "ingest.ratio",
            "gateway / plain pynetdicom store + fsync",
            "pynetdicom",
            INGEST_TARGET,
            "≥ 1 = no slower",
        ),
        ratio(
            "ingest.ratio_matched",
            "gateway / pynetdicom + fsync, node's options",
            "pynetdicom_matched",
            None,
            "same PDU size and TCP options as the node",
        ),
        ratio(
            "ingest.ratio_dcmtk",
            "gateway / dcmtk storescp (TCP_NODELAY=1)",
            "dcmtk",
            None,
            "dcmtk does not fsync",
        ),
        ratio(
            "ingest.ratio_dcmtk_default",
            "gateway / dcmtk storescp as packaged",
            "dcmtk_default",
            None,
            "dcmtk does not fsync",
        ),
    ]
    return metrics


def ingest_components(series: Series, workdir: Path, fed: Federation) -> dict[str, float]:
    """Seconds per instance for the parts of the node's ``Ingest.ingest``, each measured
    alone in this process over the same instances, held in memory as the SCP hands them
    over: ``parse_instance`` (structure checks, parse, geometry and pixel hashes), the
    object id (SHA-256 of the object), ``FilesystemStore.put_stream`` (write, fsync,
    rename, directory fsync) and the whole ``Ingest.ingest`` of a fresh in-process
    hospital node; what the whole costs beyond the parts is catalog, study tables and
    audit log (three SQLite commits, WAL with synchronous=FULL)."""
    from gateway.storage.filesystem import FilesystemStore
    from hospital_node.ingest import Ingest, parse_instance
    from tests.cluster import InProcessNode

    objects = [node_part10(path) for path in series.files]
    n = len(objects)
    out: dict[str, float] = {}
    began = time.perf_counter()
    for part10 in objects:
        parse_instance(part10, context_sop_class=CT_IMAGE_STORAGE)
    out["parse_validate"] = (time.perf_counter() - began) / n
    began = time.perf_counter()
    ids = [sha256_hex(part10) for part10 in objects]
    out["object_sha256"] = (time.perf_counter() - began) / n
    store = FilesystemStore(workdir / "store")
    store.check()
    os.sync()
    began = time.perf_counter()
    for object_id, part10 in zip(ids, objects, strict=True):
        store.put_stream(object_id, [part10])
    out["store_put"] = (time.perf_counter() - began) / n
    shutil.rmtree(workdir / "store", ignore_errors=True)
    dicom: dict[str, object] = {"ae_title": AE_TITLE, "quiet_period_seconds": 3600.0}
    node = InProcessNode(write_config(fed, workdir / "node", HOSPITAL, "hospital", dicom=dicom))
    try:
        hooks: Any = node.node.hooks
        ingest = Ingest(
            node.node.store, node.node.catalog, hooks.studies, node.node.audit, HOSPITAL
        )
        os.sync()
        began = time.perf_counter()
        for part10 in objects:
            ingest.ingest(
                part10, calling_ae=CALLING_AE, called_ae=AE_TITLE,
                context_sop_class=CT_IMAGE_STORAGE,
            )  # fmt: skip
        total = (time.perf_counter() - began) / n
    finally:
        node.stop()
        shutil.rmtree(workdir / "node", ignore_errors=True)
    out["catalog_audit"] = total - sum(out.values())
    out["total"] = total
    return out


def ingest_cost_metrics(costs: dict[str, float], gateway_seconds: float, n: int) -> list[Metric]:
    labels = {
        "parse_validate": "parse_instance (checks, parse, hashes)",
        "object_sha256": "object id (SHA-256)",
        "store_put": "store put_stream (write+fsync+rename)",
        "catalog_audit": "catalog + studies + audit commits",
        "total": "Ingest.ingest in-process, whole",
    }
    per_instance = gateway_seconds / n
    return [
        Metric(
            f"ingest.cost.{name}",
            f"  cost: {labels[name]}",
            seconds * 1000,
            "ms/inst",
            note=f"{seconds / per_instance:.0%} of the gateway's {per_instance * 1000:.1f} ms"
            + (" per instance over storescu" if name == "total" else ""),
        )
        for name, seconds in costs.items()
    ]


# --- de-identification -----------------------------------------------------------------------
@dataclass(frozen=True)
class DeidRun:
    side: str
    seconds: float
    files: int
    out_bytes: int
    first_output: bytes = field(repr=False, default=b"")

    @property
    def per_s(self) -> float:
        return self.files / self.seconds


def load_files(series: Series) -> list[bytes]:
    return [path.read_bytes() for path in series.files]


def deid_ours(data: Sequence[bytes]) -> DeidRun:
    """:meth:`Deidentifier.deidentify_part10` over every file (parse, profile, write)."""
    deid = Deidentifier(DEID_KEY)
    out: list[bytes] = []
    began = time.perf_counter()
    for blob in data:
        out.append(deid.deidentify_part10(blob, PSEUDONYM)[0])
    seconds = time.perf_counter() - began
    return DeidRun("ours", seconds, len(out), sum(map(len, out)), out[0] if out else b"")


def dicognito_available() -> bool:
    try:
        import dicognito.anonymizer  # noqa: F401
    except ImportError:
        return False
    return True


def deid_dicognito(data: Sequence[bytes]) -> DeidRun:
    """``dicognito``: the same read, ``Anonymizer().anonymize`` and a Part-10 write (as
    its command line saves: ``enforce_file_format=True``); one Anonymizer for the
    series, as its documentation asks."""
    from dicognito.anonymizer import Anonymizer
    from pydicom import dcmread, dcmwrite

    anonymizer = Anonymizer()
    out: list[bytes] = []
    began = time.perf_counter()
    for blob in data:
        ds = dcmread(io.BytesIO(blob))
        anonymizer.anonymize(ds)
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        out.append(buffer.getvalue())
    seconds = time.perf_counter() - began
    return DeidRun("dicognito", seconds, len(out), sum(map(len, out)), out[0] if out else b"")


def check_deid_output(run: DeidRun, data: Sequence[bytes]) -> None:
    """The side did the work: every file came out, and the first one is a readable
    Part-10 object whose Patient's Name and SOP Instance UID were replaced."""
    from pydicom import dcmread

    if run.files != len(data) or not run.first_output:
        raise RuntimeError(f"{run.side} de-identified {run.files} of {len(data)} files")
    before = dcmread(io.BytesIO(data[0]), stop_before_pixels=True)
    after = dcmread(io.BytesIO(run.first_output), stop_before_pixels=True)
    for keyword in ("PatientName", "SOPInstanceUID"):
        if str(after.get(keyword, "")) == str(before.get(keyword, "")):
            raise RuntimeError(f"{run.side} left {keyword} unchanged")


def deid_sides() -> list[Callable[[Sequence[bytes]], DeidRun]]:
    sides: list[Callable[[Sequence[bytes]], DeidRun]] = [deid_ours]
    if dicognito_available():
        sides.append(deid_dicognito)
    return sides


def run_deid(data: Sequence[bytes], reps: int) -> dict[str, list[DeidRun]]:
    """``reps`` rounds of every side, alternating which goes first, after a warm-up."""
    sides = deid_sides()
    if len(sides) == 1:
        log("dicognito not installed (pip install -e '.[bench]'): its side is skipped")
    log("de-identification warm-up (not counted)")
    for fn in sides:
        check_deid_output(fn(data), data)
    results: dict[str, list[DeidRun]] = {"ours": [], "dicognito": []}
    for i in range(reps):
        for fn in sides if i % 2 == 0 else sides[::-1]:
            r = fn(data)
            check_deid_output(r, data)
            results[r.side].append(r)
            log(f"deid {r.side:10s} {i + 1}: {r.seconds:7.3f} s ({r.per_s:6.1f} files/s)")
    return results


def deid_components(data: Sequence[bytes]) -> dict[str, float]:
    """Seconds per file of the engine path of ``deidentify_part10`` (pydicom: what the
    fast path falls back to), whole (``engine``) and its parts, each measured alone, file
    by file, with the functions the engine calls (reads from memory): parse
    (``dcmread``), the geometry and pixel hashes (computed twice by the engine: before
    and after), and the write (``dcmwrite`` of the de-identified data set)."""
    from pydicom import dcmread, dcmwrite

    from gateway.fidelity.dicom import geometry_hash, pixel_hash

    deid = Deidentifier(DEID_KEY, fast=False)
    out = dict.fromkeys(("parse", "geometry_hash", "pixel_hash", "write", "engine"), 0.0)
    for blob in data:
        t0 = time.perf_counter()
        ds = dcmread(io.BytesIO(blob))
        t1 = time.perf_counter()
        geometry_hash(ds)  # the first call also converts the raw geometry values
        geometry_hash(ds)
        t2 = time.perf_counter()
        pixel_hash(ds)
        pixel_hash(ds)
        t3 = time.perf_counter()
        done = deid.deidentify_part10(blob, PSEUDONYM)[1].dataset
        t4 = time.perf_counter()
        dcmwrite(io.BytesIO(), done, enforce_file_format=True)
        t5 = time.perf_counter()
        out["engine"] += t4 - t3
        out["parse"] += t1 - t0
        out["geometry_hash"] += t2 - t1
        out["pixel_hash"] += t3 - t2
        out["write"] += t5 - t4
    return {name: seconds / len(data) for name, seconds in out.items()}


def deid_floors(data: Sequence[bytes]) -> dict[str, float]:
    """Seconds per file of two lower bounds, no de-identification in either:
    ``pydicom_roundtrip``, ``dcmread`` + ``dcmwrite`` of the file unchanged (the least any
    de-identifier built on a pydicom read and write pays: ours and dicognito both do),
    and ``raw_element_pass``, one pass over the raw elements of the Part-10 bytes
    (``data_element_generator``, nothing decoded) joining them back into a file — the
    least a de-identifier that rewrites only the elements it changes would pay. The
    files here are Explicit VR Little Endian, like their File Meta groups."""
    from pydicom import dcmread, dcmwrite
    from pydicom.filereader import data_element_generator

    began = time.perf_counter()
    for blob in data:
        dcmwrite(io.BytesIO(), dcmread(io.BytesIO(blob)), enforce_file_format=True)
    roundtrip = (time.perf_counter() - began) / len(data)
    began = time.perf_counter()
    for blob in data:
        view = memoryview(blob)
        fp = io.BytesIO(blob)
        fp.seek(132)
        parts: list[bytes | memoryview] = [view[:132]]
        at = 132
        for _elem in data_element_generator(fp, False, True, defer_size=None):
            parts.append(view[at : fp.tell()])
            at = fp.tell()
        if len(b"".join(parts)) != len(blob):
            raise RuntimeError("the raw element pass did not cover the whole file")
    raw = (time.perf_counter() - began) / len(data)
    return {"pydicom_roundtrip": roundtrip, "raw_element_pass": raw}


def deid_metrics(
    results: dict[str, list[DeidRun]],
    components: dict[str, float],
    series: Series,
    floors: dict[str, float] | None = None,
) -> list[Metric]:
    ours = _median([r.seconds for r in results["ours"]])
    metrics = [
        Metric(
            "deid.ours_per_s",
            "de-identification, Deidentifier.deidentify_part10",
            series.count / ours,
            "files/s",
            note=f"{ours:.2f} s, {ours / series.count * 1000:.2f} ms/file, "
            f"{_mib(series.file_bytes / ours)}/s"
            f" (median of {len(results['ours'])})",
            samples=[r.per_s for r in results["ours"]],
        )
    ]
    if results["dicognito"]:
        theirs = _median([r.seconds for r in results["dicognito"]])
        pairs = [
            o.per_s / d.per_s for o, d in zip(results["ours"], results["dicognito"], strict=True)
        ]
        metrics += [
            Metric(
                "deid.dicognito_per_s",
                "dicognito 0.19 read + anonymize + write (ref)",
                series.count / theirs,
                "files/s",
                note=f"{theirs:.2f} s, {theirs / series.count * 1000:.2f} ms/file "
                f"(median of {len(results['dicognito'])})",
                samples=[r.per_s for r in results["dicognito"]],
            ),
            Metric(
                "deid.ratio",
                "ours / dicognito",
                theirs / ours,
                "x",
                target=DEID_TARGET,
                note=f"per-round {min(pairs):.2f}-{max(pairs):.2f}",
                samples=pairs,
            ),
        ]
    else:
        why = "skipped: dicognito not installed (pip install -e '.[bench]')"
        metrics += [
            Metric("deid.dicognito_per_s", "dicognito read + anonymize + write", None,
                   "files/s", note=why),
            Metric("deid.ratio", "ours / dicognito", None, "x", target=DEID_TARGET, note=why),
        ]  # fmt: skip
    per_file = ours / series.count
    metrics += _engine_cost_metrics(components, per_file)
    theirs_per_file = (
        _median([r.seconds for r in results["dicognito"]]) / series.count
        if results["dicognito"]
        else None
    )
    floor_labels = {
        "pydicom_roundtrip": "floor: dcmread + dcmwrite, file unchanged",
        "raw_element_pass": "floor: one pass over the raw elements",
    }
    for name, seconds in (floors or {}).items():
        note = f"{seconds / per_file:.0%} of ours"
        if theirs_per_file is not None:
            note += f"; dicognito / this = {theirs_per_file / seconds:.1f}x (ceiling)"
        metrics.append(
            Metric(f"deid.floor.{name}", f"  {floor_labels[name]}", seconds * 1000, "ms/file",
                   note=note)
        )  # fmt: skip
    return metrics


def _engine_cost_metrics(components: dict[str, float], per_file: float) -> list[Metric]:
    """The engine path's cost per file and its parts (none when it was not measured)."""
    if "engine" not in components:
        return []
    labels = {
        "parse": "dcmread",
        "geometry_hash": "geometry_hash x2 (before, after)",
        "pixel_hash": "pixel_hash x2 (before, after)",
        "write": "dcmwrite",
    }
    engine = components["engine"]
    parts = {k: v for k, v in components.items() if k != "engine"}
    metrics = [
        Metric(
            "deid.cost.engine",
            "  engine path (pydicom; the fast path's fallback)",
            engine * 1000,
            "ms/file",
            note=f"{engine / per_file:.1f}x ours; its parts below",
        )
    ]
    for name, seconds in [*parts.items(), ("rest", engine - sum(parts.values()))]:
        metrics.append(
            Metric(
                f"deid.cost.{name}",
                f"    engine: {labels.get(name, 'rest: profile walk, finish, checks')}",
                seconds * 1000,
                "ms/file",
                note=f"{seconds / engine:.0%} of the engine path",
            )
        )
    return metrics


def profile_deid(data: Sequence[bytes], top: int = 30) -> str:
    """cProfile of :meth:`Deidentifier.deidentify_part10` over ``data`` (after a warm-up)."""
    deid = Deidentifier(DEID_KEY)
    for blob in data[:3]:
        deid.deidentify_part10(blob, PSEUDONYM)
    profiler = cProfile.Profile()
    profiler.enable()
    for blob in data:
        deid.deidentify_part10(blob, PSEUDONYM)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# --- the benchmark ---------------------------------------------------------------------------
@dataclass
class Plan:
    size: SeriesSize
    reps: int
    workdir: Path | None = None
    keep: bool = False
    ingest: bool = True
    deid: bool = True


def series_metric(series: Series, size: SeriesSize) -> Metric:
    return Metric(
        "dicom.series_instances",
        "CT series (storescu, one association)",
        series.count,
        "files",
        note=f"{size}, Explicit VR LE, {series.mean_kib:.0f} KiB/file, {_mib(series.file_bytes)}",
    )


def run_plan(plan: Plan) -> list[Metric]:
    if plan.workdir is not None:
        plan.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="yigong-dicom-bench-", dir=plan.workdir))
    log(f"work directory {workdir}")
    try:
        log(f"writing a {plan.size} CT series")
        series = write_series(workdir / "series", plan.size)
        metrics = [series_metric(series, plan.size)]
        if plan.ingest:
            missing = [str(p) for p in (STORESCU, STORESCP) if not p.exists()]
            if missing:
                why = f"skipped: {', '.join(missing)} missing (apt-get install dcmtk)"
                log(why)
                metrics.append(Metric("ingest.ratio", "gateway / plain pynetdicom store", None,
                                      "x", target=INGEST_TARGET, note=why))  # fmt: skip
            else:
                fed = Federation(workdir / "federation")
                receivers = ingest_receivers(workdir / "ingest", fed)
                results = run_ingest(receivers, series, plan.reps)
                metrics += ingest_metrics(receivers, results, series)
                log("ingest component costs (in-process, same instances)")
                costs = ingest_components(series, workdir / "ingest-costs", fed)
                gateway_seconds = _median([r.seconds for r in results["gateway"]])
                metrics += ingest_cost_metrics(costs, gateway_seconds, series.count)
        if plan.deid:
            data = load_files(series)
            reps = max(MIN_DEID_REPS, plan.reps) if plan.size == FULL_SERIES else plan.reps
            deid_results = run_deid(data, reps)
            components = deid_components(data)
            floors = deid_floors(data)
            metrics += deid_metrics(deid_results, components, series, floors)
        return metrics
    finally:
        if plan.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(opts: BenchOptions) -> list[Metric]:
    """Ingest and de-identification, full size (300 x 512x512) or ``--quick`` (10 x
    128x128); ``opts.reps`` rounds (de-identification at least 3 in full mode)."""
    size = QUICK_SERIES if opts.quick else FULL_SERIES
    return run_plan(Plan(size=size, reps=opts.reps, workdir=opts.workdir, keep=opts.keep))


# --- command line ----------------------------------------------------------------------------


def _run_main(args: argparse.Namespace) -> int:
    from bench.run import QUICK_NOTE, run_and_report

    size = QUICK_SERIES if args.quick else FULL_SERIES
    size = SeriesSize(args.slices or size.slices, args.rows or size.rows, args.cols or size.cols)
    reps = args.reps or (2 if args.quick else 5)
    plan = Plan(size, reps, args.workdir, args.keep, ingest=not args.no_ingest,
                deid=not args.no_deid)  # fmt: skip
    return run_and_report(
        "yigong-gateway DICOM benchmark",
        f"series {size}, {reps} reps{QUICK_NOTE if args.quick else ''}",
        {"series": str(size), "reps": reps, "quick": bool(args.quick)},
        lambda: run_plan(plan),
        args.json,
        args.strict,
    )


def _profile_main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="yigong-deid-profile-") as tmp:
        size = SeriesSize(args.slices, args.rows, args.cols)
        data = load_files(write_series(Path(tmp) / "series", size))
    print(f"cProfile of Deidentifier.deidentify_part10 over {size}")
    print(profile_deid(data, args.top))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dicom_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="this benchmark alone (python -m bench.run runs all)")
    p.add_argument("--quick", action="store_true", help="10 x 128x128, 2 reps: harness check")
    p.add_argument("--slices", type=int, help="series length (300)")
    p.add_argument("--rows", type=int, help="rows per slice (512)")
    p.add_argument("--cols", type=int, help="columns per slice (512)")
    p.add_argument("--reps", type=int, help="timed rounds (5; de-identification at least 3)")
    p.add_argument("--no-ingest", action="store_true", help="de-identification only")
    p.add_argument("--no-deid", action="store_true", help="ingest only")
    add_report_options(p)
    p = sub.add_parser("profile-deid", help="cProfile of our de-identification")
    p.add_argument("--slices", type=int, default=50)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--top", type=int, default=30)
    p = sub.add_parser("pynetdicom-scp", help="the reference SCP (started by the benchmark)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--no-fsync", action="store_true")
    p.add_argument("--matched", action="store_true", help="the node's PDU size and TCP options")
    args = parser.parse_args(argv)
    if args.command == "pynetdicom-scp":
        return _serve_main(args)
    if args.command == "profile-deid":
        return _profile_main(args)
    if any(v is not None and v < 1 for v in (args.slices, args.rows, args.cols, args.reps)):
        parser.error("--slices, --rows, --cols and --reps must be positive")
    return _run_main(args)


if __name__ == "__main__":
    sys.exit(main())
