"""The database benchmark end to end with tiny numbers (bench/db_bench.py): a durable
PostgreSQL started for the run, SQLite beside it, four writer processes, three claiming
replicas. Checks the output's structure and the exactly-once claim check, never a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import db_bench
from tests.pg import find_postgres_bin


@pytest.mark.skipif(find_postgres_bin() is None, reason="PostgreSQL not installed")
def test_db_bench_runs_small_and_reports_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "db.json"
    argv = ["run", "--objects", "16", "--claims", "30", "--reps", "1", "--audit-seconds", "0.3"]
    assert db_bench.main([*argv, "--json", str(out), "--workdir", str(tmp_path)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    for procs in (1, 4):
        for engine in ("sqlite", "postgresql"):
            m = metrics[f"db.{engine}.{procs}p.objects_per_s"]
            assert m["value"] > 0 and len(m["samples"]) == 1
        assert metrics[f"db.postgresql.{procs}p.ratio"]["value"] > 0
        for engine in ("sqlite", "postgresql"):
            assert metrics[f"db.audit.{engine}.{procs}p.per_s"]["value"] > 0
        assert metrics[f"db.audit.postgresql.{procs}p.ratio"]["value"] > 0
    claims = metrics["db.postgresql.claims_per_s"]
    assert claims["value"] > 0 and claims["note"] == "every send claimed exactly once"
    assert [p for p in tmp_path.iterdir() if p.name.startswith("db-bench-")] == []
