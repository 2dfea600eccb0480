"""The DICOM benchmark harness works (a tiny series in CI; the whole quick run by hand).

Every ingest receiver gets every instance of a 5-slice series through dcmtk's storescu
(the gateway catalogues exactly the expected objects), both de-identifiers process
every file, and ``python -m bench.dicom_bench run --quick`` (slow) reports every
metric. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.dicom_bench import (
    REPO_ROOT,
    STORESCP,
    STORESCU,
    DeidRun,
    Series,
    SeriesSize,
    check_deid_output,
    deid_components,
    deid_floors,
    deid_metrics,
    deid_ours,
    ingest_components,
    ingest_receivers,
    load_files,
    node_part10,
    run_ingest,
    write_series,
)
from gateway.hashing import sha256_hex
from tests.cluster import Federation

TINY = SeriesSize(5, 64, 64)
SIDES = {
    "dcmtk",
    "dcmtk_default",
    "pynetdicom",
    "pynetdicom_nofsync",
    "pynetdicom_matched",
    "gateway",
}
EXPECTED_KEYS = {
    "dicom.series_instances",
    *(f"ingest.{side}_per_s" for side in SIDES),
    "ingest.ratio",
    "ingest.ratio_matched",
    "ingest.ratio_dcmtk",
    "ingest.ratio_dcmtk_default",
    "ingest.cost.parse_validate",
    "ingest.cost.object_sha256",
    "ingest.cost.store_put",
    "ingest.cost.catalog_audit",
    "ingest.cost.total",
    "deid.ours_per_s",
    "deid.dicognito_per_s",
    "deid.ratio",
    "deid.cost.engine",
    "deid.cost.parse",
    "deid.cost.geometry_hash",
    "deid.cost.pixel_hash",
    "deid.cost.write",
    "deid.cost.rest",
    "deid.floor.pydicom_roundtrip",
    "deid.floor.raw_element_pass",
}
TARGETED = {"ingest.ratio", "deid.ratio"}
needs_dcmtk = pytest.mark.skipif(
    not (STORESCU.exists() and STORESCP.exists()), reason="dcmtk storescu/storescp missing"
)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return write_series(tmp_path_factory.mktemp("dicom-bench") / "series", TINY)


def test_series_is_written_with_the_node_object_ids(series: Series) -> None:
    assert series.count == 5 and len(series.object_ids) == 5
    assert series.file_bytes == sum(p.stat().st_size for p in series.files)
    assert 64 * 64 * 2 * 5 < series.dataset_bytes < series.file_bytes
    assert {sha256_hex(node_part10(p)) for p in series.files} == series.object_ids


@needs_dcmtk
def test_every_receiver_stores_every_instance(
    series: Series, federation: Federation, tmp_path: Path
) -> None:
    """Every ingest receiver stores all 5 instances in one round and frees its disk.

    The gateway's are checked against the expected object ids inside the harness."""
    receivers = ingest_receivers(tmp_path / "ingest", federation)
    assert {r.name for r in receivers} == SIDES
    results = run_ingest(receivers, series, reps=1, warmup=False)
    assert set(results) == SIDES
    for name, (result,) in results.items():
        assert result.instances == series.count, name
        assert result.seconds > 0, name
        assert result.stored_bytes >= series.dataset_bytes, name
    exact = sum(len(node_part10(p)) for p in series.files)
    assert results["gateway"][0].stored_bytes == exact
    for receiver in receivers:  # outputs are deleted after each run
        out = receiver.workdir / "out"
        assert not out.exists() or list(out.iterdir()) == []
    assert not list((tmp_path / "ingest" / "gateway").glob("run-*"))


def test_ingest_costs_cover_the_node_work(
    series: Series, federation: Federation, tmp_path: Path
) -> None:
    costs = ingest_components(series, tmp_path / "costs", federation)
    assert set(costs) == {
        "parse_validate", "object_sha256", "store_put", "catalog_audit", "total",
    }  # fmt: skip
    assert costs["total"] > 0 and costs["store_put"] > 0 and costs["parse_validate"] > 0
    assert not (tmp_path / "costs" / "store").exists()


def test_our_deidentifier_processes_every_file(series: Series) -> None:
    data = load_files(series)
    run = deid_ours(data)
    check_deid_output(run, data)  # Patient's Name and SOP Instance UID replaced
    assert run.files == series.count and run.out_bytes > 64 * 64 * 2 * series.count
    components = deid_components(data)
    assert set(components) == {"engine", "parse", "geometry_hash", "pixel_hash", "write"}
    assert all(v > 0 for v in components.values())
    floors = deid_floors(data)
    assert set(floors) == {"pydicom_roundtrip", "raw_element_pass"}
    assert all(v > 0 for v in floors.values())
    # Without dicognito the comparison is reported as SKIP, not as a failure.
    metrics = {m.key: m for m in deid_metrics({"ours": [run], "dicognito": []}, components, series)}
    assert metrics["deid.ratio"].status == "SKIP"
    assert metrics["deid.ours_per_s"].value == pytest.approx(run.per_s)


def test_dicognito_reference_processes_every_file(series: Series) -> None:
    pytest.importorskip(
        "dicognito.anonymizer",
        reason="dicognito not installed (extra 'bench')",
        exc_type=ImportError,
    )
    from bench.dicom_bench import deid_dicognito

    data = load_files(series)
    run = deid_dicognito(data)
    check_deid_output(run, data)
    assert run.files == series.count and run.out_bytes > 64 * 64 * 2 * series.count
    ours = deid_ours(data)
    metrics = {m.key: m for m in deid_metrics({"ours": [ours], "dicognito": [run]}, {}, series)}
    assert metrics["deid.ratio"].status in {"PASS", "MISS"}


def test_check_deid_output_refuses_untouched_files(series: Series) -> None:
    data = load_files(series)
    same = DeidRun("noop", 1.0, len(data), sum(map(len, data)), data[0])
    with pytest.raises(RuntimeError, match="unchanged"):
        check_deid_output(same, data)


def test_dicom_bench_is_discovered_by_the_runner() -> None:
    from bench.run import discover

    assert "bench.dicom_bench" in {m.__name__ for m in discover()}


@pytest.mark.slow
@needs_dcmtk
def test_quick_dicom_bench_reports_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "dicom.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.dicom_bench",
            "run",
            "--quick",
            "--json",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert EXPECTED_KEYS <= set(metrics)
    dicognito = metrics["deid.dicognito_per_s"]["status"] != "SKIP"
    for key in EXPECTED_KEYS:
        m = metrics[key]
        if key in {"deid.dicognito_per_s", "deid.ratio"} and not dicognito:
            assert m["status"] == "SKIP", (key, m)
            continue
        assert isinstance(m["value"], int | float), (key, m)
        if key != "ingest.cost.catalog_audit" and not key.startswith("deid.cost.rest"):
            assert m["value"] > 0, (key, m)  # remainders may dip below 0 on a noisy machine
        assert m["status"] in ({"PASS", "MISS"} if key in TARGETED else {"INFO"}), (key, m)
    assert report["options"]["quick"] is True
    assert "gateway / plain pynetdicom store + fsync" in proc.stdout
    assert list((tmp_path / "work").iterdir()) == []  # the work directory was removed
