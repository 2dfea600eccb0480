"""The yigong CLI against real nodes: send, query tables and --json, download."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __version__
from tests.cluster import Federation, InProcessNode, wait_for
from tests.outbound_files import clean_pdf
from yigong_node.cli import main


def _conn(node: InProcessNode, fed: Federation, person: tuple[str, str] | None) -> list[str]:
    if person is None:
        return ["--config", str(node.config), "--address", node.address]
    issued = fed.person(person[0], person[1], node.node.cfg.node.id)
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


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "yigong_node", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"yigong-gateway {__version__}"


def test_send_and_query_as_engineer(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    payload = clean_pdf(os.urandom(200_000))  # what a hospital may send
    src = tmp_path / "knee.pdf"
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()

    assert (
        main(
            [
                "send",
                str(src),
                "--to",
                "factory-1",
                "--case",
                "case-42",
                "--json",
                *_conn(hospital, federation, None),
            ]
        )
        == 0
    )
    sent = json.loads(capsys.readouterr().out)
    assert sent["object"]["object_id"] == digest
    tid = sent["queued"][0]["transfer_id"]
    wait_for(lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done")

    eng = _conn(factory, federation, ("eng-cli", "engineer"))
    assert main(["query", "objects", "--case", "case-42", "--json", *eng]) == 0
    (obj,) = json.loads(capsys.readouterr().out)
    assert obj["object_id"] == digest and obj["size"] == str(len(payload))

    assert main(["query", "objects", *eng]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("OBJECT (SHA-256)") and digest in table

    assert main(["query", "transfers", "--direction", "inbound", "--json", *eng]) == 0
    (t,) = json.loads(capsys.readouterr().out)
    assert t["status"] == "done" and t["receipt"]["sha256"] == digest
    assert t["receipt"]["receiver_node"] == "factory-1" and t["receipt"]["signature_hex"]

    assert main(["query", "object", digest, *eng]) == 0
    shown = capsys.readouterr().out
    assert "receipt signed by factory-1" in shown and digest in shown

    out_file = tmp_path / "pulled.raw"
    assert main(["query", "download", digest, "-o", str(out_file), *eng]) == 0
    assert "verified" in capsys.readouterr().out
    assert out_file.read_bytes() == payload


def test_officer_cannot_download(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, factory = pair
    officer = _conn(factory, federation, ("officer-cli", "officer"))
    code = main(["query", "download", "ab" * 32, "-o", str(tmp_path / "x"), *officer])
    assert code == 2
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and "/yigong.v1.Query/ReadObject" in err
    assert not (tmp_path / "x").exists()


def test_missing_connection_options_explained(capsys: pytest.CaptureFixture[str]) -> None:
    # the CLI reads no YIGONG_* option here (YIGONG_TEST_*: the test harness's own)
    env_keys = [
        k for k in os.environ if k.startswith("YIGONG_") and not k.startswith("YIGONG_TEST_")
    ]
    assert not env_keys
    assert main(["query", "objects"]) == 2
    assert "--config NODE.toml, or --address HOST:PORT" in capsys.readouterr().err


def test_bad_config_path_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err
