"""Progress and waiting in the CLI: plain progress lines off a terminal, a rich bar on
one, ``--quiet``, and ``yigong send --wait`` ending on a verified receipt, a failed
transfer or a timeout (each with its own exit status)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import pytest

from gateway.cli.progress import Reporter, human_bytes
from gateway.cli.send import EXIT_FAILED, EXIT_TIMEOUT
from tests.cluster import Federation, InProcessNode, write_config
from tests.outbound_files import clean_pdf
from yigong_node.cli import main


def _node_conn(node: InProcessNode) -> list[str]:
    return ["--config", str(node.config), "--address", node.address]


def test_plain_progress_prints_a_line_per_ten_percent_and_a_final_line() -> None:
    out = io.StringIO()
    with Reporter(stream=out, terminal=False, interval=3600) as progress:
        task = progress.task("upload knee.raw", total=1000)
        for _ in range(100):
            task.advance(10)
        task.done("stored")
    lines = out.getvalue().splitlines()
    assert lines[0] == "upload knee.raw: 1% (10 B of 1000 B)"  # it started
    assert [line.split(":")[1].split()[0] for line in lines[1:-1]] == [
        f"{p}%" for p in range(10, 100, 10)
    ]
    assert lines[-1].startswith("upload knee.raw: 100% (1000 B of 1000 B) in ")
    assert lines[-1].endswith(", stored")


def test_quiet_progress_prints_nothing() -> None:
    out = io.StringIO()
    with Reporter(stream=out, quiet=True, terminal=True) as progress:
        task = progress.task("download x", total=10)
        task.advance(10)
        task.done()
        progress.note("a note")
    assert out.getvalue() == ""


def test_terminal_progress_draws_a_rich_bar() -> None:
    out = io.StringIO()
    with Reporter(stream=out, terminal=True) as progress:
        task = progress.task("download knee.raw", total=4 * 1024 * 1024)
        task.advance(4 * 1024 * 1024)
        task.done("verified")
    text = out.getvalue()
    assert "download knee.raw (verified)" in text
    assert "100%" in text and "4.0/4.0 MiB" in text
    assert "\x1b[" in text  # drawn with terminal control sequences, not plain lines


def test_human_bytes() -> None:
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(500 * 1024 * 1024) == "500.0 MiB"


def test_send_wait_returns_when_the_receipt_is_verified(
    pair: tuple[InProcessNode, InProcessNode],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, _ = pair
    payload = clean_pdf(os.urandom(3_000_000))  # what a hospital may send
    src = tmp_path / "knee.pdf"
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    rc = main(
        [
            "send",
            str(src),
            "--to",
            "factory-1",
            "--case",
            "case-7",
            "--wait",
            "--timeout",
            "120",
            *_node_conn(hospital),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"stored object {digest} ({len(payload)} bytes)" in out
    assert "delivered, receipt signed by factory-1 verified" in out
    assert f"(sha256 {digest[:16]}…, {len(payload)} bytes)" in out
    # progress (plain lines: stderr is not a terminal here) on stderr, not stdout
    assert "upload knee.pdf: 100% (2.9 MiB of 2.9 MiB)" in err
    assert "transfer to factory-1: 100%" in err
    assert "upload knee.pdf" not in out


def test_send_wait_json_stays_parseable_and_quiet_silences_progress(
    pair: tuple[InProcessNode, InProcessNode],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, _ = pair
    src = tmp_path / "plan.pdf"
    src.write_bytes(clean_pdf(b"plan" * 1000))
    rc = main(
        [
            "send",
            str(src),
            "--to",
            "factory-1",
            "--wait",
            "--json",
            "--quiet",
            *_node_conn(hospital),
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    doc = json.loads(out)
    assert doc["wait"]["status"] == "done"
    (t,) = doc["wait"]["transfers"]
    assert t["state"] == "done" and t["peer"] == "factory-1"
    assert t["transfer_id"] == doc["queued"][0]["transfer_id"]


def test_send_wait_times_out_with_its_own_exit_status(
    federation: Federation,
    pair: tuple[InProcessNode, InProcessNode],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    factory.stop()  # the peer is down: the transfer stays queued, retrying
    src = tmp_path / "late.pdf"
    src.write_bytes(clean_pdf(b"x" * 5000))
    rc = main(
        ["send", str(src), "--to", "factory-1", "--wait", "--timeout", "1.5", *_node_conn(hospital)]
    )
    out, err = capsys.readouterr()
    assert rc == EXIT_TIMEOUT == 4
    assert "error: timed out after 1.5 s waiting for receipts" in err
    assert "still " in out and "after the timeout" in out


def test_send_wait_reports_a_refused_transfer_as_failed(
    federation: Federation, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A peer outside the hospital's residency policy is refused for good (no retry):
    --wait ends at once with the failure's own exit status and the node's reason."""
    factory = InProcessNode(
        write_config(federation, tmp_path, "factory-eu-west", "factory", region="eu-west")
    )
    hospital = InProcessNode(
        write_config(
            federation,
            tmp_path,
            "hospital-1",
            "hospital",
            peers={"factory-eu-west": factory.address},
        )
    )
    try:
        src = tmp_path / "plan.pdf"
        src.write_bytes(clean_pdf(b"plan" * 100))
        rc = main(
            [
                "send",
                str(src),
                "--to",
                "factory-eu-west",
                "--wait",
                "--timeout",
                "120",
                *_node_conn(hospital),
            ]
        )
    finally:
        hospital.stop()
        factory.stop()
    out, err = capsys.readouterr()
    assert rc == EXIT_FAILED == 3, (out, err)
    assert "failed: peer factory-eu-west is certified for region 'eu-west'" in out
    assert err.splitlines()[-1].startswith("error: failed: peer factory-eu-west is certified")


def test_send_on_a_terminal_draws_bars_on_stderr_and_keeps_stdout_plain(
    pair: tuple[InProcessNode, InProcessNode],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hospital, _ = pair
    src = tmp_path / "scan.pdf"
    src.write_bytes(clean_pdf(os.urandom(2_000_000)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc = main(["send", str(src), "--to", "factory-1", "--wait", "--json", *_node_conn(hospital)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert json.loads(out)["wait"]["status"] == "done"  # no control sequences in stdout
    assert "\x1b[" in err and "upload scan.pdf" in err and "transfer to factory-1" in err
    assert "0.0/1.9 MiB" in err  # sizes drawn (the final frame is cut at 80 columns)
