"""``yigong query download``: into a directory, a whole case or study over one
connection, every file verified, files already present skipped, partial files resumed."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli.download import part_path
from gateway.roles import CORE_ONLY
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.test_factory import deid_series, uids
from yigong_node.cli import main
from yigong_node.roles import ROLES


@pytest.fixture
def pair(federation: Federation, tmp_path: Path) -> Iterator[tuple[InProcessNode, InProcessNode]]:
    """A running factory node and a hospital node that knows it as a peer. The hospital
    runs the core only (no hospital role): these tests send arbitrary files from it, which
    its outgoing guard would hold (the guard's own tests are test_outbound_gate.py)."""
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": factory.address}
        ),
        roles=ROLES.with_role("hospital", CORE_ONLY),
    )
    yield hospital, factory
    hospital.stop()
    factory.stop()


def _engineer(node: InProcessNode, fed: Federation) -> list[str]:
    issued = fed.person("eng-bulk", "engineer", node.node.cfg.node.id)
    return [
        "--address",
        node.address,
        "--cert",
        str(issued.cert_path),
        "--key",
        str(issued.key_path),
        "--ca",
        str(fed.ca),
        "--node-id",
        node.node.cfg.node.id,
    ]


def _send(
    hospital: InProcessNode,
    tmp_path: Path,
    files: dict[str, bytes],
    case: str,
    media_type: str = "application/octet-stream",
) -> list[str]:
    """Submit each file to factory-1 and wait for every receipt; returns the digests."""
    tids, digests = [], []
    with hospital.self_client() as client:
        for name, data in files.items():
            src = tmp_path / "src" / uuid.uuid4().hex / name
            src.parent.mkdir(parents=True)
            src.write_bytes(data)
            reply = client.submit(src, ["factory-1"], case_id=case, media_type=media_type)
            tids.append(reply.queued[0].transfer_id)
            digests.append(reply.object.object_id)
    wait_for(
        lambda: all(
            hospital.node.catalog.get_transfer(t, "outbound").status == "done" for t in tids
        ),
        timeout=60,
        what="transfers done",
    )
    return digests


def test_download_into_a_directory_uses_the_objects_name(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    payload = os.urandom(300_000)
    (digest,) = _send(hospital, tmp_path, {"knee scan.raw": payload}, "case-d")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(["query", "download", digest, "-o", str(out_dir), *_engineer(factory, federation)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    target = out_dir / "knee_scan.raw"
    assert target.read_bytes() == payload
    assert out.strip() == f"wrote {target} (300000 bytes, sha256 {digest}, verified, downloaded)"
    assert "download knee_scan.raw: 100%" in err
    assert list(out_dir.iterdir()) == [target]  # no .part left behind

    # again: the file is there with the right SHA-256, nothing is read from the node
    reads = len(factory.node.audit.events(event="object.downloaded"))
    assert (
        main(["query", "download", digest, "-o", str(target), *_engineer(factory, federation)]) == 0
    )
    assert "verified, already present" in capsys.readouterr().out
    assert len(factory.node.audit.events(event="object.downloaded")) == reads


def test_case_download_fetches_every_object_verifies_skips_and_resumes(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    files = {f"slice-{i:02d}.raw": os.urandom(50_000 + i) for i in range(6)}
    digests = _send(hospital, tmp_path, files, "case-bulk")
    # two objects with the same name: both kept, told apart by their object id
    (dup,) = _send(hospital, tmp_path, {"slice-00.raw": b"other bytes" * 10}, "case-bulk")
    _send(hospital, tmp_path, {"elsewhere.raw": b"another case"}, "case-other")
    eng = _engineer(factory, federation)
    out_dir = tmp_path / "case"

    rc = main(["query", "download", "--case", "case-bulk", "-o", str(out_dir), *eng])
    out, err = capsys.readouterr()
    assert rc == 0, err
    total = sum(len(d) for d in files.values()) + 110
    assert out.strip().startswith("7 files, ")
    assert (
        f"({total} bytes), every SHA-256 verified: 7 downloaded, 0 resumed, 0 already present"
        in out
    )
    assert "7 objects: 100%" in err
    names = sorted(p.name for p in out_dir.iterdir())
    assert len(names) == 7 and "elsewhere.raw" not in names
    assert f"slice-00-{dup[:12]}.raw" in names
    for name, data in files.items():
        path = (
            out_dir / name
            if (out_dir / name).exists()
            else out_dir / f"slice-00-{digests[0][:12]}.raw"
        )
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()

    # an interrupted download: half of one file in its .part, another .part with wrong bytes
    half = out_dir / "slice-03.raw"
    data3 = half.read_bytes()
    half.unlink()
    part_path(half).write_bytes(data3[:20_000])
    bad = out_dir / "slice-04.raw"
    data4 = bad.read_bytes()
    bad.unlink()
    part_path(bad).write_bytes(b"\0" * 10_000)
    rc = main(
        ["query", "download", "--case", "case-bulk", "-o", str(out_dir), "--json", "-q", *eng]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""  # --quiet: no progress lines
    doc = json.loads(out)
    assert (doc["files"], doc["bytes"], doc["failed"]) == (7, total, 0)
    states = {Path(o["path"]).name: o["state"] for o in doc["objects"]}
    assert states.pop("slice-03.raw") == "resumed"
    assert states.pop("slice-04.raw") == "downloaded"  # the bad part was discarded
    assert set(states.values()) == {"present"}
    assert half.read_bytes() == data3 and bad.read_bytes() == data4
    assert not list(out_dir.glob(".*.part"))
    # the resumed file was read from the node from where the .part ended
    offsets = [
        e.details["offset"]
        for e in factory.node.audit.events(event="object.downloaded")
        if e.object_id == hashlib.sha256(data3).hexdigest()
    ]
    assert offsets == [0, 20_000]


def test_study_download_writes_every_instance_by_series_and_sop_uid(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    blobs = deid_series(5)
    _send(
        hospital,
        tmp_path,
        {f"{i}.dcm": b for i, b in enumerate(blobs)},
        "case-s",
        "application/dicom",
    )
    study_uid, series_uid = uids(blobs[0])
    wait_for(
        lambda: len(factory.node.hooks.studies.instances("case-s", study_uid)) == 5,  # type: ignore[attr-defined]
        what="instances catalogued",
    )
    out_dir = tmp_path / "study"
    rc = main(
        [
            "query",
            "download",
            "--study",
            study_uid,
            "--case",
            "case-s",
            "-o",
            str(out_dir),
            *_engineer(factory, federation),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("5 files, ") and "5 downloaded" in out
    got = sorted(p.relative_to(out_dir) for p in out_dir.rglob("*.dcm"))
    assert {p.parts[0] for p in got} == {series_uid}
    assert sorted(p.read_bytes() for p in out_dir.rglob("*.dcm")) == sorted(blobs)


def test_download_refuses_unclear_requests_with_clear_errors(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    eng = _engineer(factory, federation)
    assert main(["query", "download", "-o", str(tmp_path), *eng]) == 2
    assert "say what to download: an OBJECT_ID, or --case" in capsys.readouterr().err
    assert main(["query", "download", "ab" * 32, "--case", "c", "-o", str(tmp_path), *eng]) == 2
    assert "say what to download: an OBJECT_ID, or --case" in capsys.readouterr().err
    assert main(["query", "download", "--case", "nope", "-o", str(tmp_path / "x"), *eng]) == 2
    assert "holds no objects of case nope" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    conn = ["--config", str(hospital.config), "--address", hospital.address]
    assert main(["query", "download", "--study", "1.2.3", "-o", str(tmp_path / "y"), *conn]) == 2
    assert "is not a factory node; --study downloads" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "file.raw"
    assert main(["query", "download", "ab" * 32, "-o", str(missing), *eng]) == 2
    assert "error: " in capsys.readouterr().err


def test_single_download_to_a_file_resumes_its_part_and_replaces_a_bad_one(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    payload = os.urandom(200_000)
    (digest,) = _send(hospital, tmp_path, {"plan.bin": payload}, "case-r")
    eng = _engineer(factory, federation)
    target = tmp_path / "plan.bin"
    part_path(target).write_bytes(payload[:1000])
    assert main(["query", "download", digest, "-o", str(target), *eng]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"wrote {target} (200000 bytes, sha256 {digest}, verified, resumed)"
    assert target.read_bytes() == payload and not part_path(target).exists()
    # a .part longer than the object (not from this object): discarded, fetched anew
    target.unlink()
    part_path(target).write_bytes(b"\1" * 300_000)
    assert main(["query", "download", digest, "-o", str(target), *eng]) == 0
    assert "verified, downloaded" in capsys.readouterr().out
    assert target.read_bytes() == payload
    offsets = [
        e.details["offset"]
        for e in factory.node.audit.events(event="object.downloaded")
        if e.object_id == digest
    ]
    assert offsets == [1000, 0]
