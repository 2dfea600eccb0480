"""``yigong demo``: the README's run command, end to end as a user would run it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.client import NodeClient
from gateway.demo import CASE_ID, SAMPLE_NAME, sample_payload
from gateway.hashing import sha256_hex
from gateway.rpc.channel import ClientCredentials

SAMPLE = sample_payload()
DIGEST = sha256_hex(SAMPLE)


def _demo(*args: str | Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # an exited child nobody has reaped yet is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _creds(cert: dict[str, str]) -> ClientCredentials:
    return ClientCredentials.from_files(Path(cert["ca"]), Path(cert["cert"]), Path(cert["key"]))


def test_demo_sends_a_file_and_both_sides_agree(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    run = _demo("--dir", root)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    # The object id, both receipts and the download all state the same SHA-256.
    assert out.count(f"sha256 {DIGEST}") >= 5, out
    assert f"SHA-256 is identical on both sides: {DIGEST}" in out
    assert "receipt signature bytes are identical on both sides" in out
    assert "CHECK FAILED" not in out
    assert "matches the file the hospital sent" in out
    # Both nodes were real processes, stopped cleanly.
    stopped = [line for line in out.splitlines() if line.strip().startswith("stopped ")]
    assert len(stopped) == 2 and all("exit status 0" in line for line in stopped), out
    assert (root / "downloads" / SAMPLE_NAME).read_bytes() == (
        root / "sample" / SAMPLE_NAME
    ).read_bytes()
    for node in ("hospital-1", "factory-1"):
        assert f"node {node} stopped" in (root / "logs" / f"{node}.log").read_text()
    assert f"Everything is in {root}" in out


def test_demo_keep_running_leaves_nodes_to_explore(tmp_path: Path) -> None:
    run = _demo("--dir", tmp_path / "demo", "--keep-running")
    pids: list[int] = []
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        doc = json.loads(run.stdout)  # stdout is exactly one JSON document
        pids = [n["pid"] for n in doc["nodes"].values()]
        assert set(doc["nodes"]) == {"hospital-1", "factory-1"}
        assert all(_alive(pid) for pid in pids), "nodes must outlive the demo command"
        assert "SHA-256 is identical on both sides" in run.stderr
        assert Path(doc["ca_dir"], "ca.crt").is_file()

        factory = doc["nodes"]["factory-1"]["address"]
        eng = _creds(doc["certificates"]["engineer"])
        with NodeClient(factory, eng, node_id="factory-1") as client:
            (obj,) = client.list_objects()
        assert (obj.object_id, obj.size, obj.name) == (DIGEST, len(SAMPLE), SAMPLE_NAME)

        hospital = doc["nodes"]["hospital-1"]["address"]
        officer = _creds(doc["certificates"]["officer"])
        with NodeClient(hospital, officer, node_id="hospital-1") as client:
            (transfer,) = client.list_transfers()
        assert (transfer.direction, transfer.status) == ("outbound", "done")
        assert transfer.case_id == CASE_ID and transfer.HasField("receipt")

        # The printed example commands work as printed (a person's certificate; --config).
        objects = next(e for e in doc["examples"] if e.startswith("yigong query objects"))
        by_config = next(e for e in doc["examples"] if "--config" in e)
        for example, field, want in ((objects, "object_id", DIGEST), (by_config, "status", "done")):
            cmd = [sys.executable, "-m", "gateway.cli", *shlex.split(example)[1:], "--json"]
            listed = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0, listed.stderr
            assert [o[field] for o in json.loads(listed.stdout)] == [want], example
        assert sorted(doc["stop"].split()) == sorted(["kill", *map(str, pids)])
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = [pid for pid in pids if _alive(pid)]
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
    assert not leftover, f"nodes {leftover} ignored SIGTERM"


def test_demo_refuses_a_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep-me.txt").write_text("precious")
    run = _demo("--dir", tmp_path)
    assert run.returncode == 2
    assert f"error: demo directory {tmp_path} is not empty" in run.stderr
    assert run.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["keep-me.txt"]
    assert (tmp_path / "keep-me.txt").read_text() == "precious"
