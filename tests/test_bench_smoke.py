"""The benchmark harness works: the bare-stream reference (fast, in CI) and the
whole ``python -m bench.run --quick`` (slow, run by hand). No timing assertions."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from bench.transfer_bench import (
    BARE_METHOD,
    FACTORY,
    HOSPITAL,
    REPO_ROOT,
    BareServerProcess,
    bare_push,
    write_payload,
)
from gateway.hashing import hash_file
from gateway.rpc.channel import open_channel
from tests.cluster import Federation

EXPECTED_KEYS = {
    "transfer.size_mib",
    "transfer.bare_mib_s",
    "transfer.gateway_mib_s",
    "transfer.ratio",
    "transfer.bare_durable_mib_s",
    "transfer.ratio_durable",
    "transfer.bare_checked_mib_s",
    "transfer.ratio_floor",
    "transfer.ratio_checked",
    "transfer.push_mib_s",
    "transfer.phase.setup",
    "transfer.phase.push",
    "transfer.phase.readback",
    "transfer.phase.stored",
    "transfer.phase.receipt",
    "transfer.submit_mib_s",
    "transfer.cost.chunk_sha256",
    "transfer.cost.store_put_file",
    "transfer.cost.reread_hash",
    "rss.size_mib",
    "rss.hospital_peak_mib",
    "rss.factory_peak_mib",
    "rss.hospital_transfer_peak_mib",
    "rss.factory_transfer_peak_mib",
    "rss.gateway_mib_s",
}
TARGETED = {"transfer.ratio", "rss.hospital_peak_mib", "rss.factory_peak_mib"}


@pytest.mark.parametrize(
    ("durable", "checked"),
    [(False, False), (True, False), (True, True)],
    ids=["count-only", "write-fsync", "checked"],
)
def test_bare_stream_reference_delivers_the_bytes(
    federation: Federation, tmp_path: Path, durable: bool, checked: bool
) -> None:
    payload = tmp_path / "payload.bin"
    size = 4 * 1024 * 1024 + 12345  # a short last chunk too
    write_payload(payload, size)
    digest, _ = hash_file(payload)
    creds = federation.creds(federation.node(HOSPITAL, "hospital"))
    server_cert = federation.node(FACTORY, "factory")
    with BareServerProcess(
        federation.ca,
        server_cert,
        tmp_path / "bare",
        verify=True,
        durable=durable,
        checked=checked,
    ) as server:
        result = bare_push(server.address, creds, FACTORY, payload, 1024 * 1024, checked=checked)
    assert result.size == size
    assert result.sha256 == digest
    assert result.seconds > 0
    if durable:  # the sink file was written, fsynced and removed
        assert list((tmp_path / "bare" / "sink").iterdir()) == []


def test_checked_reference_refuses_an_altered_chunk(federation: Federation, tmp_path: Path) -> None:
    """The issue's-minimum reference really checks each chunk's SHA-256."""
    creds = federation.creds(federation.node(HOSPITAL, "hospital"))
    server_cert = federation.node(FACTORY, "factory")
    chunk = b"x" * 65536
    with BareServerProcess(federation.ca, server_cert, tmp_path / "bare", checked=True) as server:
        channel = open_channel(server.address, creds, peer_node_id=FACTORY)
        try:
            push = channel.stream_unary(BARE_METHOD, None, None)
            good = hashlib.sha256(chunk).digest() + chunk
            bad = hashlib.sha256(chunk).digest() + b"y" + chunk[1:]
            with pytest.raises(grpc.RpcError) as err:
                push(iter([good, bad]), timeout=30)
        finally:
            channel.close()
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "chunk at offset 65536" in (err.value.details() or "")
    assert list((tmp_path / "bare" / "sink").iterdir()) == []


@pytest.mark.slow
def test_quick_bench_reports_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert EXPECTED_KEYS <= set(metrics)
    for key in EXPECTED_KEYS:
        m = metrics[key]
        assert isinstance(m["value"], int | float) and m["value"] > 0, (key, m)
        assert m["status"] in ({"PASS", "MISS"} if key in TARGETED else {"INFO"}), (key, m)
    assert report["options"]["quick"] is True
    assert "gateway / bare stream" in proc.stdout
    assert list((tmp_path / "work").iterdir()) == []  # the work directory was removed
