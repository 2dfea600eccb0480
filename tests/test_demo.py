"""``yigong demo``: the README's run command, end to end as a user would run it: the main
path (PACS C-STORE, clinician confirmation, de-identified study and suitability at the
factory, engineer download) and a file round trip."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.demo import CASE_ID
from gateway.demo.data import FICTITIOUS_ID, FICTITIOUS_NAME, clean_pdf
from gateway.demo.steps import PDF_NAME, SLICES
from gateway.hashing import sha256_hex
from gateway.rpc.channel import ClientCredentials
from gateway.rpc.client import NodeClient

PDF = clean_pdf(f"Design review for case {CASE_ID}")
DIGEST = sha256_hex(PDF)


def _demo(*args: str | Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yigong_node", "demo", *map(str, args)],
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


def test_demo_runs_the_main_path_from_pacs_to_engineer(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    run = _demo("--dir", root)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "CHECK FAILED" not in out and "Demo passed every check" in out
    # Ten numbered steps, each with its duration.
    assert re.findall(r"^\[(\d+)/10\]", out, re.M) == [str(i) for i in range(1, 11)], out
    assert len(re.findall(r"^  \(\d+\.\d s\)$", out, re.M)) == 10, out
    # The study is pushed by C-STORE, as a PACS does.
    assert f"C-STORE: {SLICES}/{SLICES} instances answered Success (0x0000)" in out
    assert "status received, 12 instances in 1 series" in out
    # The clinician confirms; every instance is released and sent.
    assert "signed by hospital-1 for clinician:dr-demo@hospital-1" in out
    assert f"{SLICES} instances released, {SLICES} transfers queued" in out
    assert f"all {SLICES} transfers done" in out
    # The factory holds the de-identified study and its suitability result.
    assert "suitability PASSED" in out and f"suitability passed for all {SLICES}" in out
    assert "no trace of the patient's name or ID in any of" in out
    factory_files = [p for p in (root / "data" / "factory-1").rglob("*") if p.is_file()]
    assert factory_files
    for path in factory_files:
        data = path.read_bytes()
        assert b"FICTITIOUS" not in data and FICTITIOUS_ID.encode() not in data, path
    hospital_files = [p for p in (root / "data" / "hospital-1").rglob("*") if p.is_file()]
    assert any(FICTITIOUS_NAME.encode() in p.read_bytes() for p in hospital_files)
    # The engineer downloads the whole study; every instance is verified and pseudonymous.
    assert f"download verified: {SLICES}/{SLICES} instances match their SHA-256" in out
    (pseudonym,) = re.findall(r"patient name in every instance: (YG-\S+) ", out)
    downloads = sorted((root / "downloads" / CASE_ID).glob("*.dcm"))
    assert len(downloads) == SLICES
    for path in downloads:
        data = path.read_bytes()
        assert pseudonym.encode() in data and b"FICTITIOUS" not in data
    # Query endpoints and audit logs of both nodes agree.
    assert f"list the same {SLICES} transfers, all done" in out
    # The study went as one exchange: one signed manifest receipt, the same on both nodes.
    assert "the study went as one exchange: one signed manifest receipt (Merkle root" in out
    assert "byte-identical on both nodes, listing every object's SHA-256\n" in out
    assert "audit hospital-1: 12 'transfer.completed' entries" in out
    assert "audit factory-1: 12 'transfer.received' entries" in out
    assert "both audit logs record every transfer once" in out
    # The file round trip: a clean PDF, the same receipt on both sides, verified download.
    assert f"sha256 {DIGEST}" in out and "matches the file the hospital sent" in out
    assert (root / "downloads" / PDF_NAME).read_bytes() == PDF
    # Both nodes were real processes, stopped cleanly.
    stopped = [line for line in out.splitlines() if line.strip().startswith("stopped ")]
    assert len(stopped) == 2 and all("exit status 0" in line for line in stopped), out
    for node in ("hospital-1", "factory-1"):
        assert f"node {node} stopped" in (root / "logs" / f"{node}.log").read_text()
    assert f"Everything is in {root}" in out


def test_demo_without_dir_removes_its_temporary_folder(tmp_path: Path) -> None:
    """The throwaway folder holds the CA's private key: it must not be left behind."""
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "yigong_node", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(env_tmp)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (removed,) = re.findall(r"Removed the temporary folder (\S+) ", run.stdout)
    assert Path(removed).parent == env_tmp and not Path(removed).exists()
    assert list(env_tmp.iterdir()) == []


def test_demo_keep_running_leaves_nodes_to_explore(tmp_path: Path) -> None:
    run = _demo("--dir", tmp_path / "demo", "--keep-running")
    pids: list[int] = []
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        doc = json.loads(run.stdout)  # stdout is exactly one JSON document
        pids = [n["pid"] for n in doc["nodes"].values()]
        assert set(doc["nodes"]) == {"hospital-1", "factory-1"}
        # Every port and every certificate is listed.
        hospital_ports = doc["nodes"]["hospital-1"]["ports"]
        assert hospital_ports["grpc"] > 0 and hospital_ports["dicom"] > 0
        assert "console" in hospital_ports and doc["nodes"]["factory-1"]["ports"]["grpc"] > 0
        assert doc["nodes"]["hospital-1"]["dicom"]["ae_title"] == "YIGONG"
        assert set(doc["certificates"]) == {
            "ca",
            "hospital",
            "factory",
            "clinician",
            "engineer",
            "officer",
        }
        for name, files in doc["certificates"].items():
            assert all(Path(p).is_file() for p in files.values()), name
        assert all(_alive(pid) for pid in pids), "nodes must outlive the demo command"
        assert (
            "Demo" not in run.stdout and "both audit logs record every transfer once" in run.stderr
        )
        assert Path(doc["ca_dir"], "ca.crt").is_file()

        factory = doc["nodes"]["factory-1"]["address"]
        eng = _creds(doc["certificates"]["engineer"])
        with NodeClient(factory, eng, node_id="factory-1") as client:
            objects = client.list_objects()
        assert len(objects) == SLICES + 1
        (pdf,) = [o for o in objects if o.name == PDF_NAME]
        assert (pdf.object_id, pdf.size) == (DIGEST, len(PDF))

        hospital = doc["nodes"]["hospital-1"]["address"]
        officer = _creds(doc["certificates"]["officer"])
        with NodeClient(hospital, officer, node_id="hospital-1") as client:
            transfers = client.list_transfers()
            batches = {b.batch_id: b for b in client.list_batches()}
        assert len(transfers) == SLICES + 1
        for transfer in transfers:
            assert (transfer.direction, transfer.status) == ("outbound", "done")
            assert transfer.case_id == CASE_ID
            # One signed receipt each, or one manifest receipt for the study's batch.
            if transfer.batch_id:
                batch = batches[transfer.batch_id]
                assert batch.status == "done" and batch.HasField("receipt")
            else:
                assert transfer.HasField("receipt")
        assert sum(1 for t in transfers if t.batch_id) == SLICES and len(batches) == 1

        # The printed example commands work as printed (a person's certificate; --config).
        objects = next(e for e in doc["examples"] if e.startswith("yigong query objects"))
        by_config = next(e for e in doc["examples"] if "--config" in e)
        for example, field, want in ((objects, "object_id", DIGEST), (by_config, "status", "done")):
            cmd = [sys.executable, "-m", "yigong_node", *shlex.split(example)[1:], "--json"]
            listed = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0, listed.stderr
            assert want in [o[field] for o in json.loads(listed.stdout)], example
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
