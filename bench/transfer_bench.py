"""Hospital→factory transfer throughput against a bare gRPC mTLS stream, and peak RSS.

Three measurements, all in one run (``python -m bench.run``; see bench/README.md):

1. **Bare stream (the reference).** A minimal gRPC servicer in its own process
   (``python -m bench.transfer_bench bare-server``) with the factory node's
   certificate, ``require_client_auth`` and the node's server options; the
   client presents the hospital node's certificate through
   :func:`gateway.rpc.channel.open_channel` (same ``CHANNEL_OPTIONS``) and
   streams the payload file as raw ``bytes`` messages of ``chunk_bytes``. The
   server only counts the bytes: the reference is *network + TLS + gRPC*, with
   no hashing, no protobuf envelope and no disk writes on the receiving side.
2. **Gateway.** A factory and a hospital node, each a ``yigong serve``
   subprocess (as in production: no GIL shared between them). The object is
   submitted to the hospital (timed separately as "submit"), and the transfer
   is timed from the hospital's ``transfer.begun`` to its
   ``transfer.completed`` audit event: channel set-up, offer, the verified
   chunked push, the factory's spool writes, fsyncs and read-back + re-hash
   (mostly in the background while the push goes on), the move into the
   store, signed receipt and its verification — everything a transfer does.
3. **Peak RSS** of both node processes (``VmHWM`` in ``/proc/PID/status``, which
   covers start-up, the submit and the transfer) for a multi-GB object, plus the
   peak ``VmRSS`` sampled during the transfer alone.

Two more references are reported without a target: the same bare stream with a
server that also writes the bytes to a file and fsyncs it (the cheapest durable
receive), and one that does the issue's minimum and nothing else (SHA-256 of every
chunk on both ends, write, fsync, read back and hash again). The CPU time of
every side is reported too: the bare stream alone keeps most of the machine's
cores busy, which bounds what any verified transfer can reach against it.
The four sides run in rotating order after one untimed warm-up of each,
and medians are compared, so that drift on a busy 2-core machine hits all alike.
Each gateway repetition sends a distinct object (its first 8 bytes are stamped),
since identical content is stored once and would not be transferred again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc

from bench import (
    BenchOptions,
    Metric,
    MiB,
    NodePair,
    Poller,
    Started,
    Target,
    add_report_options,
)
from gateway.audit import AuditEvent, AuditLog
from gateway.hashing import hash_chunks, hash_file, iter_file_chunks
from gateway.pki import IssuedCert
from gateway.rpc.channel import MESSAGE_LIMIT, ClientCredentials, open_channel
from gateway.rpc.client import NodeClient
from gateway.storage.filesystem import FilesystemStore
from gateway.transfer.readback import SpoolReadback
from tests.cluster import Federation, NodeProcess, write_config
from yigong.v1 import common_pb2, transfer_pb2

REPO_ROOT = Path(__file__).resolve().parents[1]
HOSPITAL = "hospital-1"
FACTORY = "factory-1"
RATIO_TARGET = Target(">=", 0.6)
RSS_TARGET_MIB = Target("<", 300)

BARE_SERVICE = "yigong.bench.v1.Bare"
BARE_METHOD = f"/{BARE_SERVICE}/Push"
_BARE_REPLY = struct.Struct(">Q32s")  # bytes counted, SHA-256 (zeros when not hashed)

# The node's own server options (gateway.server.Node.start), with the default
# server.max_message_bytes; the client side uses open_channel → CHANNEL_OPTIONS.
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]
SERVER_WORKERS = 16  # gateway default server.max_workers

_BLOCK = 16 * MiB


def log(msg: str) -> None:
    print(f"[transfer_bench] {msg}", file=sys.stderr, flush=True)


# --- payload ---------------------------------------------------------------------------------
_PNG_HEAD = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + b"\x00" * 17
_PNG_END = struct.pack(">I", 0) + b"IEND" + b"\xaeB`\x82"
_STAMP_AT = len(_PNG_HEAD) + 8  # inside the first IDAT chunk's data


def write_payload(path: Path, size: int) -> None:
    """``size`` real (non-sparse) bytes: one random 16 MiB block, each copy stamped
    with its index so no two blocks are equal, framed as PNG chunks (a hospital sends
    only types its outbound gate allows: a PNG is one, and its gate reads no pixels)."""
    block = os.urandom(min(_BLOCK, max(size, 8)))
    body = size - len(_PNG_HEAD) - len(_PNG_END)
    if body < 13:
        raise ValueError(f"a bench payload needs at least {13 + len(_PNG_HEAD) + 12} bytes")
    index = 0
    with open(path, "wb") as fh:
        fh.write(_PNG_HEAD)
        while body > 0:
            n = min(_BLOCK, body - 12)
            if 0 < body - 12 - n < 13:
                n -= 13  # leave room for one more whole chunk
            piece = (index.to_bytes(8, "big") + block[8:] * (1 + n // len(block)))[:n]
            fh.write(struct.pack(">I", n) + b"IDAT" + piece + b"\x00\x00\x00\x00")
            body -= n + 12
            index += 1
        fh.write(_PNG_END)
        fh.flush()
        os.fsync(fh.fileno())


def stamp_payload(path: Path, stamp: int) -> None:
    """Overwrite 8 bytes of the first chunk so the file is a new object (new SHA-256)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack(">Q", 0xB0000000_00000000 | stamp), _STAMP_AT)
    finally:
        os.close(fd)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# --- the bare stream (reference) ---------------------------------------------------------------
@dataclass(frozen=True)
class StreamResult:
    size: int
    seconds: float
    sha256: str  # what the server computed; "" when it only counted
    cpu_seconds: float = 0.0  # client + server process CPU time (user + system)

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds


def bare_handler(
    verify: bool, sink_dir: Path | None = None, *, checked: bool = False
) -> grpc.GenericRpcHandler:
    """``Push(stream bytes) -> bytes``: count the bytes; hash them if ``verify``; with
    ``sink_dir``, also write them to a file there and fsync it (then delete it).

    ``checked`` (needs ``sink_dir``) is the issue's minimum for a verified transfer
    and nothing else: every message is a chunk's SHA-256 followed by the chunk,
    checked before it is written; the file is written, made durable and read back
    and hashed again the way the node's receiver does it
    (:class:`gateway.transfer.readback.SpoolReadback`); the reply carries the digest
    read back. No protobuf, catalog, audit log or signed receipt."""

    def push(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        if checked:
            assert sink_dir is not None
            return _receive_checked(requests, sink_dir / f"{uuid.uuid4().hex}.part", context)
        count = 0
        hasher = hashlib.sha256() if verify else None
        sink = None
        if sink_dir is not None:
            sink = open(sink_dir / f"{uuid.uuid4().hex}.part", "wb")
        try:
            for data in requests:
                count += len(data)
                if hasher is not None:
                    hasher.update(data)
                if sink is not None:
                    sink.write(data)
            if sink is not None:
                sink.flush()
                os.fsync(sink.fileno())
        finally:
            if sink is not None:
                sink.close()
                os.unlink(sink.name)
        return _BARE_REPLY.pack(count, hasher.digest() if hasher is not None else bytes(32))

    # No (de)serializers: messages are the raw bytes, no protobuf involved.
    return grpc.method_handlers_generic_handler(
        BARE_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(push)}
    )


def _receive_checked(requests: Iterator[bytes], path: Path, context: grpc.ServicerContext) -> bytes:
    count = 0
    try:
        with SpoolReadback(path) as spool:
            for message in requests:
                data = memoryview(message)[32:]
                if hashlib.sha256(data).digest() != message[:32]:
                    context.abort(grpc.StatusCode.DATA_LOSS, f"chunk at offset {count}: SHA-256")
                spool.write(data)
                count += len(data)
            digest, size = spool.read_back()
    finally:
        path.unlink(missing_ok=True)
    if size != count:
        context.abort(grpc.StatusCode.DATA_LOSS, f"read back {size} of {count} bytes")
    return _BARE_REPLY.pack(count, bytes.fromhex(digest))


def serve_bare(
    ca: Path,
    cert: Path,
    key: Path,
    *,
    verify: bool,
    sink_dir: Path | None = None,
    checked: bool = False,
    listen: str = "127.0.0.1:0",
) -> tuple[grpc.Server, int]:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=SERVER_WORKERS, thread_name_prefix="bare"),
        options=SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers((bare_handler(verify, sink_dir, checked=checked),))
    creds = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port(listen, creds)
    if not port:
        raise RuntimeError(f"bare server cannot listen on {listen}")
    server.start()
    return server, port


class BareServerProcess(Started):
    """The bare servicer in a child process, with a node's certificate; ``durable``
    makes it write what arrives to a file under ``workdir`` and fsync it; ``checked``
    (implies ``durable``) makes it the issue's minimum (see :func:`bare_handler`)."""

    def __init__(
        self,
        ca: Path,
        issued: IssuedCert,
        workdir: Path,
        *,
        verify: bool = False,
        durable: bool = False,
        checked: bool = False,
    ) -> None:
        self.ca = ca
        self.issued = issued
        self.workdir = workdir
        self.verify = verify
        self.durable = durable or checked
        self.checked = checked
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "bare.ready"
        ready.unlink(missing_ok=True)
        log_path = self.workdir / "bare.log"
        cmd = [
            sys.executable,
            "-m",
            "bench.transfer_bench",
            "bare-server",
            "--ca",
            str(self.ca),
            "--cert",
            str(self.issued.cert_path),
            "--key",
            str(self.issued.key_path),
            "--ready-file",
            str(ready),
        ]
        if self.verify:
            cmd.append("--verify")
        if self.durable:
            sink = self.workdir / "sink"
            sink.mkdir(exist_ok=True)
            cmd += ["--sink-dir", str(sink)]
        if self.checked:
            cmd.append("--checked")
        with open(log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                self.port = int(json.loads(ready.read_text())["port"])
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"bare server did not start:\n{log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def bare_push(
    address: str,
    creds: ClientCredentials,
    server_node_id: str,
    path: Path,
    chunk_bytes: int,
    *,
    checked: bool = False,
    server_pid: int = 0,
) -> StreamResult:
    """Stream ``path`` over a new mTLS channel; timed from channel creation to the reply.

    ``checked``: every message is the chunk's SHA-256 followed by the chunk (for a
    ``checked`` server), as the node's sender computes it for each chunk it sends.
    ``server_pid``: add that process's CPU time to this one's in ``cpu_seconds``."""
    cpu_before = own_cpu_seconds() + (process_cpu_seconds(server_pid) if server_pid else 0.0)
    began = time.perf_counter()
    channel = open_channel(address, creds, peer_node_id=server_node_id)
    try:
        push = channel.stream_unary(BARE_METHOD, None, None)  # raw bytes both ways

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                for data in iter_file_chunks(fh, chunk_bytes):
                    yield hashlib.sha256(data).digest() + data if checked else data

        reply = push(chunks(), wait_for_ready=True, timeout=3600)
    finally:
        channel.close()
    seconds = time.perf_counter() - began
    cpu = own_cpu_seconds() + (process_cpu_seconds(server_pid) if server_pid else 0.0)
    size, digest = _BARE_REPLY.unpack(reply)
    return StreamResult(size, seconds, digest.hex() if any(digest) else "", cpu - cpu_before)


# --- the gateway -----------------------------------------------------------------------------
def _ts(event: AuditEvent) -> float:
    return datetime.fromisoformat(event.time).timestamp()


@dataclass
class GatewayResult:
    size: int
    transfer_id: str
    object_id: str
    submit_seconds: float
    seconds: float  # hospital transfer.begun → transfer.completed
    attempts: int
    phases: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per node, begun→completed

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.seconds

    @property
    def submit_mib_s(self) -> float:
        return self.size / MiB / self.submit_seconds


def node_extra_config(chunk_bytes: int) -> str:
    return (
        "[transfer]\n"
        f"chunk_bytes = {chunk_bytes}\n"
        "retry_initial_seconds = 0.2\n"
        "retry_max_seconds = 1.0\n"
    )


class GatewayPair(NodePair):
    """A factory node and a hospital node that knows it, as ``yigong serve`` processes."""

    def __init__(self, fed: Federation, workdir: Path, chunk_bytes: int) -> None:
        self.fed = fed
        self.workdir = workdir
        self.chunk_bytes = chunk_bytes
        self.factory: NodeProcess | None = None
        self.hospital: NodeProcess | None = None
        self.client: NodeClient | None = None
        self._audit: dict[str, AuditLog] = {}

    def data_dir(self, node_id: str) -> Path:
        return self.workdir / f"{node_id}-data"  # tests.cluster.write_config's layout

    def start(self) -> None:
        extra = node_extra_config(self.chunk_bytes)
        self.workdir.mkdir(parents=True, exist_ok=True)
        fcfg = write_config(self.fed, self.workdir, FACTORY, "factory", extra=extra)
        self.factory = NodeProcess(fcfg, self.workdir / f"{FACTORY}.log")
        self.factory.start()
        hcfg = write_config(
            self.fed,
            self.workdir,
            HOSPITAL,
            "hospital",
            peers={FACTORY: self.factory.address},
            extra=extra,
        )
        self.hospital = NodeProcess(hcfg, self.workdir / f"{HOSPITAL}.log")
        self.hospital.start()
        creds = self.fed.creds(self.fed.node(HOSPITAL, "hospital"))
        self.client = NodeClient(self.hospital.address, creds, node_id=HOSPITAL)
        # Only events() is used from here (timestamps). Opened after the nodes created
        # their logs, so the constructor's idempotent schema statements change nothing.
        for node_id in (HOSPITAL, FACTORY):
            self._audit[node_id] = AuditLog(self.data_dir(node_id) / "audit.sqlite", node_id)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for audit in self._audit.values():
            audit.close()
        self._audit.clear()
        for proc in (self.hospital, self.factory):
            if proc is not None:
                proc.stop()

    def submit(self, path: Path) -> tuple[str, str, float]:
        """Submit ``path`` to the hospital for the factory: (transfer id, object id, seconds)."""
        assert self.client is not None
        began = time.perf_counter()
        reply = self.client.submit(path, [FACTORY], chunk_bytes=self.chunk_bytes)
        seconds = time.perf_counter() - began
        (queued,) = reply.queued
        return queued.transfer_id, reply.object.object_id, seconds

    def wait_done(self, transfer_id: str, timeout: float) -> list[AuditEvent]:
        """Poll the hospital's audit log (not its query API: every query is itself
        audited and fsynced inside the node, which would disturb the measurement)."""
        audit = self._audit[HOSPITAL]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = audit.events(transfer_id=transfer_id, limit=10_000)
            if any(e.event == "transfer.completed" for e in events):
                return events
            for proc in (self.hospital, self.factory):
                if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
                    raise RuntimeError(f"node exited during transfer:\n{self.logs_tail()}")
            time.sleep(0.05)
        raise TimeoutError(
            f"transfer {transfer_id} not completed after {timeout:.0f} s:\n{self.logs_tail()}"
        )

    def send(self, path: Path, size: int, timeout: float) -> GatewayResult:
        spool_dir = self.data_dir(FACTORY) / "spool" / "inbound"
        with SpoolWatcher(spool_dir, size, pids=self.pids()) as spool:
            transfer_id, object_id, submit_seconds = self.submit(path)
            events = self.wait_done(transfer_id, timeout)
        begun = [e for e in events if e.event == "transfer.begun"]
        completed = next(e for e in events if e.event == "transfer.completed")
        result = GatewayResult(
            size=size,
            transfer_id=transfer_id,
            object_id=object_id,
            submit_seconds=submit_seconds,
            seconds=_ts(completed) - _ts(begun[-1]),
            attempts=len(begun),
            cpu_seconds=spool.cpu_between(_ts(begun[-1]), _ts(completed)),
        )
        result.phases = self._phases(
            transfer_id,
            object_id,
            _ts(begun[-1]),
            spool.seen_at.get(f"{transfer_id}.part"),
            spool.full_at.get(f"{transfer_id}.part"),
            _ts(completed),
        )
        return result

    def _phases(
        self,
        transfer_id: str,
        object_id: str,
        begun: float,
        push_began: float | None,
        spooled: float | None,
        completed: float,
    ) -> dict[str, float]:
        """Where the transfer's time went, from what the nodes leave anyway: when the
        factory's spool file appeared (the push began) and reached full size (the last
        chunk written), the stored file's ctime (the rename of the fsynced spool file
        into the store, after the last of it was read back and hashed) and the
        factory's ``object.stored`` audit event."""
        stored = [
            e
            for e in self._audit[FACTORY].events(transfer_id=transfer_id, limit=10_000)
            if e.event == "object.stored"
        ]
        if not stored or push_began is None or spooled is None:
            return {}
        store = FilesystemStore(self.data_dir(FACTORY) / "objects")
        st = store.path_for(object_id).stat()
        marks = [begun, push_began, spooled, st.st_ctime_ns / 1e9]
        marks += [_ts(stored[-1]), completed]
        # The watcher sees "spooled" up to 5 ms late, and a store that adopts the spool
        # file by rename keeps its mtime: clamp small inversions, give up on big ones.
        for i in range(1, len(marks)):
            if marks[i] < marks[i - 1] - 0.05:
                return {}
            marks[i] = max(marks[i], marks[i - 1])
        return {name: marks[i + 1] - marks[i] for i, name in enumerate(PHASES)}


PHASES = {
    "setup": "→ push opens spool",
    "push": "→ last chunk spooled",
    "readback": "→ the rest fsynced + read back, renamed into the store",
    "stored": "→ object.stored",
    "receipt": "→ transfer.completed",
}
"""Consecutive phases of one gateway transfer, each ending at a mark the nodes leave
(see GatewayPair._phases); with the current receiver they hold:

- setup: hospital ``transfer.begun`` → the factory's spool file appears: catalog read,
  channel + TLS handshake, Offer (catalog writes on the factory), Push start;
- push: → the spool file has every byte: read, SHA-256 per chunk on both sides,
  protobuf, TLS, spool writes; in the background every 32 MiB: fdatasync, read
  back and hash (``gateway.transfer.readback``);
- readback: → the spooled file is renamed into the store (its ctime): the final
  fsync and read-back of what the background had not done yet, then the rename;
- stored: → factory ``object.stored``: directory fsync, audit;
- receipt: → hospital ``transfer.completed``: catalog, receipt signed and verified.
"""


class SpoolWatcher(Poller):
    """Notes when each ``*.part`` file in a spool directory appears and when it first
    reaches ``size`` bytes (polled every 5 ms by stat; ~±5 ms), and the CPU time of
    the processes ``pids`` at every poll."""

    def __init__(
        self,
        spool_dir: Path,
        size: int,
        interval: float = 0.005,
        pids: dict[str, int] | None = None,
    ) -> None:
        super().__init__("spool-watcher", interval)
        self.spool_dir = spool_dir
        self.size = size
        self.pids = pids or {}
        self.seen_at: dict[str, float] = {}
        self.full_at: dict[str, float] = {}
        self.cpu: list[tuple[float, dict[str, float]]] = []

    def poll(self) -> None:
        try:
            entries = list(os.scandir(self.spool_dir))
        except OSError:
            entries = []
        now = time.time()
        if self.pids:
            self.cpu.append((now, {k: process_cpu_seconds(p) for k, p in self.pids.items()}))
        for entry in entries:
            if not entry.name.endswith(".part") or entry.name in self.full_at:
                continue
            self.seen_at.setdefault(entry.name, now)
            try:
                if entry.stat().st_size >= self.size:
                    self.full_at[entry.name] = now
            except OSError:
                continue

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each process used from the last poll before ``start`` to the
        first after ``end`` (clock ticks of 10 ms; ±15 ms)."""
        before = [c for t, c in self.cpu if t <= start]
        after = [c for t, c in self.cpu if t >= end]
        if not before or not after:
            return {}
        return {k: after[0][k] - before[-1][k] for k in self.pids}


# --- peak RSS --------------------------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all its threads (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (KiB) of a live process from /proc/PID/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0])
    return out


class RssSampler(Poller):
    """Samples VmRSS of some processes in a background thread; peaks per phase."""

    def __init__(self, pids: dict[str, int], interval: float = 0.02) -> None:
        super().__init__("rss-sampler", interval)
        self.pids = pids
        self.phase = "start"
        self.peaks: dict[tuple[str, str], int] = {}

    def poll(self) -> None:
        for name, pid in self.pids.items():
            try:
                rss = proc_status_kib(pid).get("VmRSS", 0)
            except OSError:
                continue
            key = (self.phase, name)
            self.peaks[key] = max(self.peaks.get(key, 0), rss)

    def peak_mib(self, phase: str, name: str) -> float | None:
        kib = self.peaks.get((phase, name))
        return None if kib is None else kib / 1024


# --- component costs (explain where the time goes) -------------------------------------------
def component_costs(payload: Path, workdir: Path, chunk_bytes: int) -> dict[str, float]:
    """Seconds each serial step of a transfer costs for ``payload`` on this machine,
    done in this process the way the nodes do them (reads come from the page cache)."""
    size = payload.stat().st_size
    out: dict[str, float] = {}

    def read_chunks() -> Iterator[bytes]:
        with open(payload, "rb") as fh:
            yield from iter_file_chunks(fh, chunk_bytes)

    for _ in read_chunks():  # warm the page cache
        pass
    began = time.perf_counter()
    for _ in read_chunks():
        pass
    out["read"] = time.perf_counter() - began

    began = time.perf_counter()
    for data in read_chunks():
        hashlib.sha256(data).digest()
    out["chunk_sha256"] = time.perf_counter() - began - out["read"]

    began = time.perf_counter()
    for offset, data in enumerate(read_chunks()):
        wire = transfer_pb2.PushMessage(
            chunk=common_pb2.Chunk(offset=offset, data=data, sha256=b"\0" * 32)
        ).SerializeToString()
        transfer_pb2.PushMessage.FromString(wire)
    out["protobuf_encode_decode"] = time.perf_counter() - began - out["read"]

    workdir.mkdir(parents=True, exist_ok=True)
    spool = workdir / "spool.part"
    began = time.perf_counter()
    with open(spool, "ab") as fh:
        for data in read_chunks():
            fh.write(data)
        written = time.perf_counter()
        fh.flush()
        os.fsync(fh.fileno())
    synced = time.perf_counter()
    out["spool_write"] = written - began - out["read"]
    out["spool_fsync"] = synced - written

    store = FilesystemStore(workdir / "store")
    store.check()
    key = hashlib.sha256(b"component-costs").hexdigest()
    began = time.perf_counter()
    store.put_file(key, spool)
    out["store_put_file"] = time.perf_counter() - began

    began = time.perf_counter()
    _, got = hash_chunks(store.open_read(key))
    out["reread_hash"] = time.perf_counter() - began
    assert got == size
    store.delete(key)
    spool.unlink()
    return out


# --- the benchmark ---------------------------------------------------------------------------
def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def measure_throughput(
    opts: BenchOptions, fed: Federation, workdir: Path
) -> tuple[list[Metric], Path]:
    size = opts.size_mb * MiB
    workdir.mkdir(parents=True, exist_ok=True)
    payload = workdir / "payload.bin"
    log(f"writing {opts.size_mb} MiB payload")
    write_payload(payload, size)
    timeout = max(120.0, size / (2 * MiB))
    hospital_creds = fed.creds(fed.node(HOSPITAL, "hospital"))
    factory_cert = fed.node(FACTORY, "factory")
    bare: list[StreamResult] = []
    durable: list[StreamResult] = []
    checked: list[StreamResult] = []
    gw: list[GatewayResult] = []
    stamp = 0
    with (
        BareServerProcess(fed.ca, factory_cert, workdir / "bare") as server,
        BareServerProcess(fed.ca, factory_cert, workdir / "durable", durable=True) as dserver,
        BareServerProcess(fed.ca, factory_cert, workdir / "checked", checked=True) as cserver,
        GatewayPair(fed, workdir / "nodes", opts.chunk_bytes) as pair,
    ):

        def stream(target: BareServerProcess, out: list[StreamResult], name: str) -> None:
            expect = hash_file(payload)[0] if target.checked else ""
            os.sync()
            r = bare_push(
                target.address,
                hospital_creds,
                FACTORY,
                payload,
                opts.chunk_bytes,
                checked=target.checked,
                server_pid=target.pid,
            )
            if r.size != size:
                raise RuntimeError(f"{name} stream delivered {r.size} of {size} bytes")
            if r.sha256 != expect:
                raise RuntimeError(f"{name} stream: SHA-256 read back {r.sha256}, sent {expect}")
            out.append(r)
            log(f"{name:8s} {len(out)}: {r.mib_s:8.1f} MiB/s ({r.seconds:.3f} s)")

        def run_bare() -> None:
            stream(server, bare, "bare")

        def run_durable() -> None:
            stream(dserver, durable, "durable")

        def run_checked() -> None:
            stream(cserver, checked, "checked")

        def run_gateway() -> None:
            nonlocal stamp
            stamp += 1
            stamp_payload(payload, stamp)
            os.sync()
            r = pair.send(payload, size, timeout)
            if r.attempts != 1:
                raise RuntimeError(
                    f"transfer {r.transfer_id} needed {r.attempts} attempts; see node logs:\n"
                    + pair.logs_tail()
                )
            gw.append(r)
            log(
                f"gateway  {len(gw)}: {r.mib_s:8.1f} MiB/s ({r.seconds:.3f} s; "
                f"submit {r.submit_seconds:.3f} s)"
            )

        log("warm-up (not counted)")
        sides = [run_bare, run_gateway, run_durable, run_checked]
        for fn in sides:
            fn()
        for results in (bare, durable, checked, gw):
            results.clear()
        for i in range(opts.reps):
            # Rotate the order: no side always runs right after another's disk writes.
            k = i % len(sides)
            for fn in sides[k:] + sides[:k]:
                fn()

    bare_med = _median([r.mib_s for r in bare])
    durable_med = _median([r.mib_s for r in durable])
    checked_med = _median([r.mib_s for r in checked])
    gw_med = _median([r.mib_s for r in gw])
    pair_ratios = [g.mib_s / b.mib_s for b, g in zip(bare, gw, strict=True)]

    def spread(values: Sequence[float]) -> str:
        return f"median of {len(values)}, range {min(values):.0f}-{max(values):.0f}"

    def rate(key: str, label: str, rates: list[float], what: str) -> Metric:
        return Metric(
            key, label, _median(rates), "MiB/s", note=f"{spread(rates)}; {what}", samples=rates
        )

    def ratio(key: str, label: str, value: float, note: str) -> Metric:
        return Metric(key, label, value, "x", note=note)

    metrics = [
        Metric("transfer.size_mib", "throughput object size", opts.size_mb, "MiB"),
        rate(
            "transfer.bare_mib_s",
            "bare gRPC mTLS stream (reference)",
            [r.mib_s for r in bare],
            "server only counts the bytes",
        ),
        rate(
            "transfer.gateway_mib_s",
            "gateway hospital→factory transfer",
            [r.mib_s for r in gw],
            "audit transfer.begun→completed",
        ),
        Metric(
            "transfer.ratio",
            "gateway / bare stream",
            gw_med / bare_med,
            "x",
            target=RATIO_TARGET,
            note=f"per-pair ratios {min(pair_ratios):.2f}-{max(pair_ratios):.2f}",
            samples=pair_ratios,
        ),
        rate(
            "transfer.bare_durable_mib_s",
            "bare stream + write + fsync (2nd reference)",
            [r.mib_s for r in durable],
            "server writes a file and fsyncs it",
        ),
        ratio(
            "transfer.ratio_durable",
            "gateway / bare durable stream",
            gw_med / durable_med,
            "how far the gateway is from the cheapest durable receive",
        ),
        rate(
            "transfer.bare_checked_mib_s",
            "bare stream + the issue's minimum (3rd reference)",
            [r.mib_s for r in checked],
            "SHA-256 per chunk both sides, write, fsync, read back + SHA-256",
        ),
        ratio(
            "transfer.ratio_floor",
            "issue's minimum / bare stream",
            checked_med / bare_med,
            "the ratio when only the required steps are done (the ceiling below bounds any)",
        ),
        ratio(
            "transfer.ratio_checked",
            "gateway / issue's minimum",
            gw_med / checked_med,
            "what the gateway adds to the required steps (protobuf, catalog, audit, receipt)",
        ),
        *cpu_metrics(bare, checked, gw),
        rate(
            "transfer.submit_mib_s",
            "submit to hospital (not in the ratio)",
            [r.submit_mib_s for r in gw],
            "upload+spool+store+catalog",
        ),
    ]
    with_phases = [r.phases for r in gw if r.phases]
    pushes = [opts.size_mb / p["push"] for p in with_phases]
    metrics.append(
        Metric(
            "transfer.push_mib_s",
            "gateway push phase alone",
            _median(pushes) if pushes else None,
            "MiB/s",
            note=f"{_median(pushes) / bare_med:.2f}x the bare stream; size / push phase"
            if pushes
            else "timestamps too coarse to split",
            samples=pushes,
        )
    )
    for name, label in PHASES.items():
        values = [p[name] for p in with_phases]
        metrics.append(
            Metric(
                f"transfer.phase.{name}",
                f"  phase {label}",
                _median(values) if values else None,
                "s",
                note=f"median of {len(values)}" if values else "timestamps too coarse to split",
                samples=values,
            )
        )
    submit = metrics.pop(next(i for i, m in enumerate(metrics) if m.key == "transfer.submit_mib_s"))
    metrics.append(submit)
    return metrics, payload


def cpu_metrics(
    bare: Sequence[StreamResult], checked: Sequence[StreamResult], gw: Sequence[GatewayResult]
) -> list[Metric]:
    """CPU time of each side, and what it implies for the ratio on this machine's cores."""
    cores = os.cpu_count() or 1

    def stream_cpu(key: str, label: str, results: Sequence[StreamResult]) -> Metric:
        busy = _median([r.cpu_seconds / r.seconds for r in results])
        return Metric(
            key,
            label,
            _median([r.cpu_seconds for r in results]),
            "s",
            note=f"{busy:.2f} of {cores} cores busy",
            samples=[r.cpu_seconds for r in results],
        )

    cpu_checked = _median([r.cpu_seconds for r in checked])
    bare_s = _median([r.seconds for r in bare])
    with_cpu = [r for r in gw if r.cpu_seconds]
    gw_note = "not sampled"
    if with_cpu:
        nodes = with_cpu[0].cpu_seconds
        per_node = {k: _median([r.cpu_seconds[k] for r in with_cpu]) for k in nodes}
        shares = ", ".join(f"{k} {v:.2f}" for k, v in per_node.items())
        cores_busy = _median([sum(r.cpu_seconds.values()) / r.seconds for r in with_cpu])
        gw_note = f"{cores_busy:.2f} of {cores} cores busy; {shares}"
    return [
        stream_cpu("transfer.cpu.bare_s", "CPU time, bare stream (both ends)", bare),
        stream_cpu("transfer.cpu.checked_s", "CPU time, issue's minimum (both ends)", checked),
        Metric(
            "transfer.cpu.gateway_s",
            "CPU time, gateway transfer (both nodes)",
            _median([sum(r.cpu_seconds.values()) for r in with_cpu]) if with_cpu else None,
            "s",
            note=gw_note,
            samples=[sum(r.cpu_seconds.values()) for r in with_cpu],
        ),
        Metric(
            "transfer.ratio_ceiling",
            "ceiling of gateway / bare on these cores",
            bare_s * cores / cpu_checked,
            "x",
            note=f"bare seconds x {cores} cores / CPU time of the issue's minimum: "
            "every core busy all the time with the required steps only",
        ),
    ]


def measure_components(opts: BenchOptions, payload: Path, workdir: Path) -> list[Metric]:
    log("component costs (in-process, same payload)")
    costs = component_costs(payload, workdir, opts.chunk_bytes)
    labels = {
        "read": "read from page cache",
        "chunk_sha256": "SHA-256 of the chunks",
        "protobuf_encode_decode": "protobuf encode+decode",
        "spool_write": "spool write",
        "spool_fsync": "spool fsync",
        "store_put_file": "store put_file (copy+fsync)",
        "reread_hash": "store re-read+hash",
    }
    size_mib = payload.stat().st_size / MiB
    return [
        Metric(
            f"transfer.cost.{name}",
            f"  cost: {labels[name]}",
            seconds,
            "s",
            note=f"= {size_mib / seconds:.0f} MiB/s" if seconds > 0 else "",
        )
        for name, seconds in costs.items()
    ]


def measure_rss(opts: BenchOptions, fed: Federation, workdir: Path) -> list[Metric]:
    size = int(opts.rss_gb * 1024 * MiB)
    size_mib = size / MiB
    keys = [
        ("rss.hospital_peak_mib", "hospital node peak RSS (VmHWM)", RSS_TARGET_MIB),
        ("rss.factory_peak_mib", "factory node peak RSS (VmHWM)", RSS_TARGET_MIB),
        ("rss.hospital_transfer_peak_mib", "hospital peak VmRSS during transfer", None),
        ("rss.factory_transfer_peak_mib", "factory peak VmRSS during transfer", None),
        ("rss.gateway_mib_s", "gateway throughput, RSS object", None),
    ]
    workdir.mkdir(parents=True, exist_ok=True)
    need = int(size * opts.min_free_factor)
    free = disk_free(workdir)
    head = Metric("rss.size_mib", "RSS object size", size_mib, "MiB")
    why = ""
    if size <= 0:
        why = "skipped: --rss-gb 0"
    elif free < need:
        why = f"skipped: {free / 1e9:.1f} GB free in {workdir}, need {need / 1e9:.1f} GB"
    if why:
        log(why)
        return [head] + [
            Metric(k, label, None, "MiB/s" if k.endswith("_s") else "MiB", target=t, note=why)
            for k, label, t in keys
        ]
    payload = workdir / "rss-payload.bin"
    log(f"writing {size_mib:.0f} MiB payload for the RSS run")
    write_payload(payload, size)
    with GatewayPair(fed, workdir / "nodes", opts.chunk_bytes) as pair:
        pids = pair.pids()
        idle = {name: proc_status_kib(pid)["VmHWM"] / 1024 for name, pid in pids.items()}
        with RssSampler(pids) as sampler:
            sampler.phase = "submit"
            transfer_id, _, submit_seconds = pair.submit(payload)
            sampler.phase = "transfer"
            events = pair.wait_done(transfer_id, timeout=max(300.0, size / (2 * MiB)))
        hwm = {name: proc_status_kib(pid)["VmHWM"] / 1024 for name, pid in pids.items()}
        begun = [e for e in events if e.event == "transfer.begun"]
        completed = next(e for e in events if e.event == "transfer.completed")
        seconds = _ts(completed) - _ts(begun[-1])
    payload.unlink()
    log(
        f"RSS: hospital {hwm['hospital']:.0f} MiB, factory {hwm['factory']:.0f} MiB "
        f"(idle {idle['hospital']:.0f}/{idle['factory']:.0f}); transfer {seconds:.1f} s, "
        f"submit {submit_seconds:.1f} s"
    )
    note_hwm = "lifetime peak: start-up, submit and transfer"
    return [
        head,
        Metric(keys[0][0], keys[0][1], hwm["hospital"], "MiB", RSS_TARGET_MIB, note_hwm),
        Metric(keys[1][0], keys[1][1], hwm["factory"], "MiB", RSS_TARGET_MIB, note_hwm),
        Metric(
            keys[2][0],
            keys[2][1],
            sampler.peak_mib("transfer", "hospital"),
            "MiB",
            note=f"sampled every 20 ms; idle VmHWM {idle['hospital']:.0f} MiB",
        ),
        Metric(
            keys[3][0],
            keys[3][1],
            sampler.peak_mib("transfer", "factory"),
            "MiB",
            note=f"sampled every 20 ms; idle VmHWM {idle['factory']:.0f} MiB",
        ),
        Metric(
            keys[4][0],
            keys[4][1],
            size_mib / seconds,
            "MiB/s",
            note=f"one {size_mib:.0f} MiB transfer, {len(begun)} attempt(s)",
        ),
    ]


def run(opts: BenchOptions) -> list[Metric]:
    """All transfer measurements; cleans up its work directory unless ``opts.keep``."""
    if opts.workdir is not None:
        opts.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="yigong-bench-", dir=opts.workdir))
    log(f"work directory {workdir}")
    try:
        fed = Federation(workdir / "federation")
        metrics, payload = measure_throughput(opts, fed, workdir / "throughput")
        metrics += measure_components(opts, payload, workdir / "components")
        if not opts.keep:  # free the disk before the multi-GB run
            shutil.rmtree(workdir / "throughput", ignore_errors=True)
        shutil.rmtree(workdir / "components", ignore_errors=True)
        metrics += measure_rss(opts, fed, workdir / "rss")
        return metrics
    finally:
        if opts.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --- bare server entry point -----------------------------------------------------------------
def _serve_main(args: argparse.Namespace) -> int:
    server, port = serve_bare(
        args.ca,
        args.cert,
        args.key,
        verify=args.verify,
        sink_dir=args.sink_dir,
        checked=args.checked,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, args.ready_file)
    while not done.wait(0.5):
        pass
    server.stop(0).wait()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer_bench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bare-server", help="the reference servicer (started by the benchmark)")
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--verify", action="store_true", help="hash what arrives and return it")
    p.add_argument("--sink-dir", type=Path, help="write what arrives to a file here + fsync")
    p.add_argument(
        "--checked",
        action="store_true",
        help="with --sink-dir: per-chunk SHA-256 check, fsync, read back and hash again",
    )
    p = sub.add_parser(
        "run", help="this benchmark alone (the options of python -m bench.run; no study, DICOM)"
    )
    p.add_argument("--size-mb", type=int, default=150, help="throughput object, MiB (150)")
    p.add_argument("--rss-gb", type=float, default=0.0, help="RSS object, GiB (0: skip)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per side (5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a harness check only")
    add_report_options(p)
    args = parser.parse_args(argv)
    if args.command == "run":
        return _run_main(args)
    return _serve_main(args)


def _run_main(args: argparse.Namespace) -> int:
    from bench.run import QUICK, QUICK_NOTE, run_and_report

    sizes = (
        QUICK if args.quick else {"size_mb": args.size_mb, "rss_gb": args.rss_gb, "reps": args.reps}
    )
    opts = BenchOptions(
        size_mb=int(sizes["size_mb"]),
        rss_gb=float(sizes["rss_gb"]),
        reps=int(sizes["reps"]),
        chunk_bytes=MiB,
        workdir=args.workdir,
        keep=args.keep,
        quick=args.quick,
    )
    return run_and_report(
        "yigong-gateway transfer benchmark",
        f"size {opts.size_mb} MiB, RSS object {opts.rss_gb:g} GiB, {opts.reps} reps"
        + (QUICK_NOTE if opts.quick else ""),
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        lambda: run(opts),
        args.json,
        args.strict,
    )


if __name__ == "__main__":
    sys.exit(main())
