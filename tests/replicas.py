"""Several ``yigong serve`` replicas of ONE node behind HAProxy (issue #13), for tests and
benchmarks.

Every replica has the same node id, certificate and key, the same ``[database] url``
(PostgreSQL) and the same S3 bucket (``[storage] backend = "s3"``); each has its own
``data_dir`` (spools, the audit log while it is still per replica) and its own ports.
HAProxy listens in front of them in TCP mode — mTLS passes through untouched, so each
replica still does the handshake and sees the client's certificate — on one frontend
for gRPC and, for a hospital, one for DICOM. Its configuration is the one
``docs/haproxy.cfg.example`` explains, with the test's ports filled in
(:func:`haproxy_config`).

Use::

    with ReplicaSet(federation, tmp_path / "factory", "factory-1", "factory",
                    database_url=pg_url, s3=s3_server, bucket=bucket, count=3) as rs:
        rs.address          # HAProxy's gRPC frontend: what peers are configured with
        rs.dicom_address    # HAProxy's DICOM frontend (hospital only)
        rs.replica_addresses
        rs.kill(1); rs.restart(1)

or the ``replica_set`` fixture factory (torn down by the fixture; logs of replicas and
HAProxy are appended to a failing test's report). Ports: replicas start on port 0 and
report theirs in their ready file; the config is then pinned to that port so that a
restart comes back where HAProxy expects it. HAProxy's frontends bind ports found by
binding port 0 first (HAProxy cannot report a port it picked).

When ``/usr/sbin/haproxy`` (or ``haproxy`` in PATH) is missing, :func:`haproxy_bin`
returns None and the fixture skips naming the package (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster import Federation, NodeProcess, write_config
from tests.s3server import S3Server

HAPROXY_PATHS = (Path("/usr/sbin/haproxy"),)
DEFAULT_TRANSFER = "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0"


def haproxy_bin() -> Path | None:
    for p in HAPROXY_PATHS:
        if p.exists():
            return p
    found = shutil.which("haproxy")
    return Path(found) if found else None


def free_port() -> int:
    """A port nothing listens on right now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(address: str, timeout: float = 0.5) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def replica_extra(database_url: str, s3: S3Server, bucket: str, extra: str = "") -> str:
    """The configuration every replica shares beyond node/tls/server: one PostgreSQL
    database, one S3 bucket (the caller's ``extra`` adds e.g. ``[transfer]``)."""
    return (
        f'[database]\nurl = "{database_url}"\npool_size = 4\n\n'
        '[storage]\nbackend = "s3"\n\n[storage.s3]\n'
        f'endpoint = "{s3.endpoint}"\nbucket = "{bucket}"\n'
        f'access_key = "{s3.access_key}"\nsecret_key = "{s3.secret_key}"\n'
        f'secure = false\ncreate_bucket = true\npart_size_mb = 5\nregion = "{s3.region}"\n\n'
        f'[residency]\nallowed_storage_regions = ["{s3.region}"]\n\n'
        + (extra.strip() or DEFAULT_TRANSFER)
    )


def haproxy_config(
    grpc_bind: str,
    grpc_servers: list[str],
    *,
    dicom_bind: str | None = None,
    dicom_servers: list[str] | None = None,
    balance: str = "roundrobin",
    check_inter: str = "500ms",
    stats_socket: Path | None = None,
    send_proxy: bool = True,
) -> str:
    """HAProxy in TCP mode in front of the replicas (see docs/haproxy.cfg.example);
    ``send_proxy``: each connection to a replica opens with a PROXY v2 header naming the
    client (the replicas list HAProxy in ``proxy_protocol_from``)."""

    def backend(name: str, servers: list[str]) -> list[str]:
        return [
            f"backend {name}",
            f"    balance {balance}",
            # a plain TCP connect: the replica is up when its port accepts
            f"    default-server check inter {check_inter} fall 2 rise 1"
            + (" send-proxy-v2" if send_proxy else ""),
            *(f"    server r{i} {addr}" for i, addr in enumerate(servers)),
            "",
        ]

    lines = [
        "global",
        "    maxconn 4096",
        *([f"    stats socket {stats_socket} mode 600 level admin"] if stats_socket else []),
        "",
        "defaults",
        "    mode tcp",
        "    log stdout format raw local0 info",
        "    option tcplog",
        "    option dontlognull",
        "    timeout connect 2s",
        # long gRPC streams (a transfer's Push) and idle keep-alive connections
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout check 2s",
        # a connection refused by a dead replica is retried on another one
        "    retries 3",
        "    option redispatch 1",  # every retry on another replica, not the dead one
        "",
        "frontend grpc",
        f"    bind {grpc_bind}",
        "    default_backend grpc_replicas",
        "",
        *backend("grpc_replicas", grpc_servers),
    ]
    if dicom_bind and dicom_servers:
        lines += [
            "frontend dicom",
            f"    bind {dicom_bind}",
            "    default_backend dicom_replicas",
            "",
            *backend("dicom_replicas", dicom_servers),
        ]
    return "\n".join(lines)


@dataclass
class Replica:
    index: int
    config: Path
    process: NodeProcess
    port: int = 0
    dicom_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dicom_address(self) -> str | None:
        return f"127.0.0.1:{self.dicom_port}" if self.dicom_port else None

    @property
    def alive(self) -> bool:
        p = self.process.proc
        return p is not None and p.poll() is None


@dataclass
class ReplicaSet:
    """``count`` replicas of ``node_id`` and the HAProxy in front of them."""

    federation: Federation
    workdir: Path
    node_id: str
    role: str
    database_url: str
    s3: S3Server
    bucket: str
    count: int = 3
    peers: dict[str, str] | None = None
    extra: str = ""  # e.g. a [transfer] section; database and storage are added
    dicom: dict[str, object] | None = None  # hospital: [dicom] keys beyond listen
    balance: str = "roundrobin"
    proxy_protocol: bool = True  # HAProxy sends PROXY v2; the replicas read it
    replicas: list[Replica] = field(default_factory=list)
    haproxy_port: int = 0
    haproxy_dicom_port: int | None = None
    haproxy_cfg: Path | None = None
    haproxy_log: Path | None = None
    haproxy_stats: Path | None = None  # HAProxy's runtime API (stats socket)
    _haproxy: subprocess.Popen[bytes] | None = None

    # -- start -----------------------------------------------------------
    def start(self, timeout: float = 60.0) -> ReplicaSet:
        exe = haproxy_bin()
        if exe is None:
            raise FileNotFoundError("HAProxy is not installed (Debian: apt-get install haproxy)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.count):
            self.replicas.append(self._write(i, port=0, dicom_port=0))
        # Started together, as a deployment would: the migrations run once (db.py).
        with ThreadPoolExecutor(self.count) as pool:
            for done in [pool.submit(self._start_replica, r, timeout) for r in self.replicas]:
                done.result()
        self._start_haproxy(exe, timeout)
        return self

    def _write(self, i: int, *, port: int, dicom_port: int | None) -> Replica:
        wd = self.workdir / f"replica-{i}"
        dicom = None
        proxies = ["127.0.0.1"] if self.proxy_protocol else []
        if self.role == "hospital":
            dicom = {
                **(self.dicom or {}), "listen": f"127.0.0.1:{dicom_port or 0}",
                **({"proxy_protocol_from": proxies} if proxies else {}),
            }  # fmt: skip
        cfg = write_config(
            self.federation,
            wd,
            self.node_id,
            self.role,
            peers=self.peers,
            listen=f"127.0.0.1:{port}",
            extra=replica_extra(self.database_url, self.s3, self.bucket, self.extra),
            dicom=dicom,
        )
        if proxies:  # HAProxy (on loopback here) opens every connection with PROXY v2
            text = cfg.read_text()
            assert "[server]\n" in text
            cfg.write_text(
                text.replace(
                    "[server]\n",
                    f"[server]\nproxy_protocol_from = {proxies!r}\n".replace("'", '"'),
                    1,
                )
            )
        if i < len(self.replicas):
            return self.replicas[i]
        return Replica(i, cfg, NodeProcess(cfg, wd / "serve.log"))

    def _start_replica(self, r: Replica, timeout: float) -> None:
        r.port = r.process.start(timeout=timeout)
        ready = json.loads(r.config.with_suffix(".ready").read_text())
        r.dicom_port = ready.get("dicom_port")
        # pin the ports: a restart comes back where HAProxy sends connections
        self._write(r.index, port=r.port, dicom_port=r.dicom_port)

    def _start_haproxy(self, exe: Path, timeout: float) -> None:
        if not self.haproxy_port:
            self.haproxy_port = free_port()
            if self.role == "hospital":
                self.haproxy_dicom_port = free_port()
        self.haproxy_cfg = self.workdir / "haproxy.cfg"
        self.haproxy_log = self.workdir / "haproxy.log"
        # a Unix socket path has at most 107 bytes: pytest's tmp paths can be longer
        self.haproxy_stats = Path(tempfile.mkdtemp(prefix="yg-haproxy-")) / "admin.sock"
        self.haproxy_cfg.write_text(
            haproxy_config(
                self.address,
                [r.address for r in self.replicas],
                dicom_bind=self.dicom_address,
                dicom_servers=[r.dicom_address or "" for r in self.replicas]
                if self.haproxy_dicom_port
                else None,
                balance=self.balance,
                stats_socket=self.haproxy_stats,
                send_proxy=self.proxy_protocol,
            )
        )
        check = subprocess.run(
            [str(exe), "-c", "-q", "-f", str(self.haproxy_cfg)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused {self.haproxy_cfg}:\n{check.stderr}")
        with open(self.haproxy_log, "ab") as logf:
            self._haproxy = subprocess.Popen(
                [str(exe), "-f", str(self.haproxy_cfg), "-db"],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not (
            listening(self.address)
            and (self.dicom_address is None or listening(self.dicom_address))
        ):
            if self._haproxy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"haproxy did not listen on {self.address}:\n{self.haproxy_log.read_text()}"
                )
            time.sleep(0.05)

    # -- addresses -------------------------------------------------------
    @property
    def address(self) -> str:
        """HAProxy's gRPC frontend: the node's one address for its peers."""
        return f"127.0.0.1:{self.haproxy_port}"

    @property
    def dicom_address(self) -> str | None:
        return f"127.0.0.1:{self.haproxy_dicom_port}" if self.haproxy_dicom_port else None

    @property
    def replica_addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    @property
    def configs(self) -> list[Path]:
        return [r.config for r in self.replicas]

    def haproxy_command(self, command: str) -> str:
        """One command of HAProxy's runtime API (e.g. ``show stat``); its answer."""
        assert self.haproxy_stats is not None
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.haproxy_stats))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def sessions(self, backend: str = "grpc_replicas") -> list[int]:
        """Connections open right now from HAProxy to each replica (``scur``)."""
        lines = self.haproxy_command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        scur = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname", "").startswith("r"):
                scur[int(row["svname"][1:])] = int(row["scur"] or 0)
        return [scur.get(i, 0) for i in range(len(self.replicas))]

    # -- faults ----------------------------------------------------------
    def kill(self, i: int) -> None:
        """SIGKILL replica ``i`` (HAProxy notices by its health check or a refused connect)."""
        self.replicas[i].process.kill()

    def restart(self, i: int, timeout: float = 60.0) -> None:
        """Start replica ``i`` again on its pinned ports (after a kill or a stop)."""
        r = self.replicas[i]
        if r.alive:
            r.process.stop()
        self._start_replica(r, timeout)

    def stop_replica(self, i: int) -> int | None:
        return self.replicas[i].process.stop()

    def wait_up(self, i: int, timeout: float = 10.0) -> None:
        """Until HAProxy's health check would see replica ``i`` accept again."""
        deadline = time.monotonic() + timeout
        while not listening(self.replicas[i].address):
            if time.monotonic() > deadline:
                raise AssertionError(f"replica {i} does not listen:\n{self.logs()}")
            time.sleep(0.05)

    # -- stop ------------------------------------------------------------
    def stop(self) -> None:
        if self._haproxy is not None and self._haproxy.poll() is None:
            self._haproxy.send_signal(signal.SIGTERM)
            try:
                self._haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self._haproxy.kill()
                self._haproxy.wait(10)
        if self.haproxy_stats is not None:
            shutil.rmtree(self.haproxy_stats.parent, ignore_errors=True)
        # together: a graceful stop takes seconds (a hospital's DICOM SCP ~6 s)
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            for r in self.replicas:
                pool.submit(r.process.stop)

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, tail: int = 3000) -> str:
        """The last ``tail`` characters of every replica's log and HAProxy's."""
        out = []
        for r in self.replicas:
            p = r.process.log_path
            text = p.read_text(errors="replace")[-tail:] if p.exists() else "(no log)"
            out.append(f"--- replica {r.index} ({r.address}) {p}\n{text}")
        if self.haproxy_log and self.haproxy_log.exists():
            out.append(f"--- haproxy {self.haproxy_log}\n{self.haproxy_log.read_text()[-tail:]}")
        return "\n".join(out)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep the call phase's report on the item: the fixture adds logs when it failed."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]


@pytest.fixture
def replica_set(
    request: pytest.FixtureRequest, federation: Federation, tmp_path: Path
) -> Iterator[Callable[..., ReplicaSet]]:
    """Factory: ``replica_set(node_id, role, database_url=..., s3=..., bucket=..., **kw)``
    starts a :class:`ReplicaSet` under ``tmp_path``; every set is stopped at the end and,
    if the test failed, its logs are added to the report."""
    if haproxy_bin() is None:
        pytest.skip("HAProxy is not installed: apt-get install haproxy (.ci/run does)")
    made: list[ReplicaSet] = []

    def make(node_id: str, role: str, **kw: object) -> ReplicaSet:
        rs = ReplicaSet(federation, tmp_path / f"{node_id}-replicas", node_id, role, **kw)  # type: ignore[arg-type]
        made.append(rs)
        return rs.start()

    yield make
    for rs in made:
        rs.stop()
    call = getattr(request.node, "rep_call", None)
    if call is not None and call.failed:
        for rs in made:  # shown under the failure, with the traceback
            call.sections.append((f"replicas of {rs.node_id}", rs.logs()))
