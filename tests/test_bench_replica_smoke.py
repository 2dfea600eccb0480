"""The replica benchmark end to end with a tiny study (bench/replica_bench.py): a single
node, then one and three factory replicas on PostgreSQL and S3 behind HAProxy, each
receiving the confirmed study. Checks the output's structure, never a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import replica_bench
from tests.pg import find_postgres_bin
from tests.replicas import haproxy_bin


@pytest.mark.skipif(
    find_postgres_bin() is None or haproxy_bin() is None or not Path("/usr/bin/storescu").exists(),
    reason="needs postgresql, haproxy and dcmtk (.ci/run installs them)",
)
def test_replica_bench_runs_small_and_reports_each_configuration(tmp_path: Path) -> None:
    out = tmp_path / "replicas.json"
    argv = ["run", "--instances", "10", "--reps", "1", "--json", str(out)]
    assert replica_bench.main([*argv, "--workdir", str(tmp_path)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["replicas.reference.s"]["value"] > 0
    for key in ("1", "3"):
        assert metrics[f"replicas.{key}.s"]["value"] > 0
        assert len(metrics[f"replicas.{key}.s"]["samples"]) == 1
        assert metrics[f"replicas.{key}.ratio"]["value"] > 0
    assert [p for p in tmp_path.iterdir() if p.name.startswith("replica-bench-")] == []
