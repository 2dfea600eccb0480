"""The study benchmark harness works (the WAN proxy in CI; whole quick runs by hand).

The WAN proxy forwards every byte both ways and really delays them (fast, in CI); the
whole ``python -m bench.study_bench run --quick`` and its gateway-only run without
Orthanc are slow (run by hand). No timing assertions beyond the proxy's lower bound,
which load can only make longer."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bench.study_bench as study_bench
from bench.study_bench import (
    QUICK_SERIES,
    REPO_ROOT,
    Plan,
    ProxyProcess,
    orthanc_available,
    run_plan,
)

GATEWAY_KEYS = {
    "study.series_instances",
    "study.gateway.ingest_s",
    "study.gateway.confirm_s",
    "study.gateway.deliver_s",
    "study.gateway.confirm_to_done_s",
    "study.gateway.first_transfer_s",
    "study.gateway.transfer_window_s",
    "study.pynetdicom.ingest_s",
    "study.ratio_ingest_pynetdicom",
}
ORTHANC_KEYS = {
    f"study.{side}.{what}"
    for side in ("orthanc", "orthanc_packaged")
    for what in ("ingest_s", "anonymize_s", "store_s", "anonymize_store_s", "peer_store_s")
} | {"study.ratio_anonymize_store_packaged", "study.ratio_ingest_orthanc_packaged"}
ORTHANC_RATIOS = {
    "study.ratio_anonymize_store",
    "study.ratio_peer_store",
    "study.ratio_ingest_orthanc",
}
WAN_KEYS = {
    "study.wan.proxy_ratio",
    "study.wan.confirm_to_done_s",
    "study.wan.ratio",
    "study.wan.ratio_from_confirm",
}
RSS_KEYS = {"study.rss.hospital_peak_mib", "study.rss.factory_peak_mib"}


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    """A TCP server that answers each connection with the SHA-256 of what it got."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            hasher = hashlib.sha256()
            while data := conn.recv(65536):
                hasher.update(data)
            conn.sendall(hasher.digest())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_wan_proxy_forwards_every_byte_both_ways_and_adds_the_round_trip(
    tmp_path: Path,
) -> None:
    """3 MiB arrive intact, their hash comes back, and it takes at least the 40 ms RTT.

    The far end sends the SHA-256 of what it got back through the proxy."""
    payload = os.urandom(3 * 1024 * 1024 + 17)
    server, thread = _echo_server()
    port = server.getsockname()[1]
    try:
        with ProxyProcess(f"127.0.0.1:{port}", tmp_path / "proxy", 20.0, 1000.0) as proxy:
            began = time.perf_counter()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                answer = b""
                while chunk := conn.recv(64):
                    answer += chunk
            seconds = time.perf_counter() - began
            thread.join(30)
    finally:
        server.close()
    assert answer == hashlib.sha256(payload).digest()
    assert seconds >= 0.040  # there and back: 2 x 20 ms at the very least


def test_wan_proxy_connections_share_one_link(tmp_path: Path) -> None:
    """Four streams at once share the link's rate, as on a real line (they do not get a
    bucket each): 4 x 1 MiB over 40 Mbit/s takes at least the 4 MiB's wire time."""
    payloads = [os.urandom(1024 * 1024) for _ in range(4)]
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    got: list[bytes] = []

    def serve_one(conn: socket.socket) -> None:
        with conn:
            hasher = hashlib.sha256()
            while data := conn.recv(65536):
                hasher.update(data)
            got.append(hasher.digest())

    def accept() -> None:
        for _ in payloads:
            conn, _ = server.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()

    def send(proxy_port: int, data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", proxy_port), timeout=60) as conn:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the far end closes after reading everything

    try:
        with ProxyProcess(f"127.0.0.1:{server.getsockname()[1]}", tmp_path / "p", 1.0, 40.0) as p:
            began = time.perf_counter()
            senders = [threading.Thread(target=send, args=(p.port, d)) for d in payloads]
            for t in senders:
                t.start()
            for t in senders:
                t.join(60)
            seconds = time.perf_counter() - began
    finally:
        server.close()
    assert sorted(got) == sorted(hashlib.sha256(d).digest() for d in payloads)
    wire = 4 * 1024 * 1024 / (40e6 / 8)  # 0.84 s for 4 MiB at 40 Mbit/s
    assert seconds >= wire - 0.1  # one shared burst allowance; a bucket each: ~0.2 s


def test_wan_proxy_rejects_a_bad_target_with_a_clear_message() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.wan_proxy", "--target", "nowhere"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "'nowhere': expected HOST:PORT" in proc.stderr


@pytest.mark.slow
def test_quick_study_bench_reports_every_metric(tmp_path: Path) -> None:
    """The quick study bench measures every figure (Orthanc's skipped if not installed).

    Orthanc's figures are SKIP with the reason when the Debian package is missing."""
    out = tmp_path / "study.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.study_bench", "run", "--quick", "--json", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(out.read_text())["metrics"]
    measured = GATEWAY_KEYS | WAN_KEYS | RSS_KEYS
    if orthanc_available():
        measured |= ORTHANC_KEYS | ORTHANC_RATIOS
    else:
        for key in ORTHANC_RATIOS:
            assert metrics[key]["status"] == "SKIP", metrics[key]
            assert "apt-get install orthanc" in metrics[key]["note"]
    for key in measured:
        m = metrics[key]
        assert isinstance(m["value"], int | float) and m["value"] > 0, (key, m)
    assert metrics["study.series_instances"]["value"] == QUICK_SERIES.slices
    assert "Orthanc anonymize+store / gateway confirm→done" in proc.stdout
    assert list((tmp_path / "work").iterdir()) == []  # the work directory was removed


@pytest.mark.slow
def test_study_bench_without_orthanc_still_runs_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Orthanc the gateway's study is still measured end to end.

    The Orthanc figures are SKIP and say what to install."""
    monkeypatch.setattr(study_bench, "ORTHANC", tmp_path / "no-such-Orthanc")
    metrics = {m.key: m for m in run_plan(Plan(QUICK_SERIES, None, 1024, tmp_path, wan=False))}
    for key in ORTHANC_RATIOS:
        assert metrics[key].status == "SKIP"
        assert "no-such-Orthanc missing (apt-get install orthanc)" in metrics[key].note
    for key in GATEWAY_KEYS:
        value = metrics[key].value
        assert value is not None and value > 0, key
    assert metrics["study.rss.hospital_peak_mib"].note == "skipped: --no-rss"
