"""The console benchmark end to end with tiny numbers (bench/console_bench.py): a real
hospital node, filled through the domain APIs, its list pages fetched over TLS. Checks
the output's structure only, never a timing."""

from __future__ import annotations

import json
from pathlib import Path

from bench import console_bench
from gateway.web.app import server_timing


def test_console_bench_runs_small_and_reports_every_page(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "console.json"
    argv = ["run", "--studies", "50", "--audit", "500", "--transfers", "40", "--reps", "1"]
    rc = console_bench.main([*argv, "--json", str(out), "--workdir", str(tmp_path)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["options"] == {
        "studies": 50,
        "audit": 500,
        "transfers": 40,
        "reps": 1,
        "quick": False,
    }
    metrics = report["metrics"]
    for who in ("clinician", "officer"):
        ref = metrics[f"console.reference.{who}.server_ms"]
        assert ref["status"] == "INFO" and ref["value"] > 0 and len(ref["samples"]) == 1
    keys = {p.key for p in console_bench.pages(console_bench.Cursors(("", ""), 2, 3, "", "C"))}
    assert keys == {
        f"{page}.{where}"
        for page in ("studies", "audit", "audit_event", "audit_case", "audit_tail", "transfers")
        for where in ("first", "deep")
    }
    for key in keys:
        server = metrics[f"console.{key}.server_ms"]
        assert server["target"] == "< 300" and server["status"] in ("PASS", "MISS")
        assert server["value"] > 0 and len(server["samples"]) == 1
        assert metrics[f"console.{key}.ratio"]["value"] > 0
        assert metrics[f"console.{key}.client_ms"]["value"] > 0
    assert metrics["console.studies.first.server_ms"]["note"].endswith("rows")
    assert [p for p in tmp_path.iterdir() if p.name.startswith("console-bench-")] == []


def test_server_timing_header_value() -> None:
    assert server_timing(0.0123456) == "app;dur=12.35"
