#!/usr/bin/env python3
"""Write docs/tests.md: every test case, grouped by feature.

Reads the test modules with ``ast`` (nothing is imported or run): each
module's docstring names what it covers, each test's docstring or name says
what it shows. tests/test_docs.py fails when docs/tests.md is stale:

    python scripts/list_tests.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "tests.md"

# Feature headings, in reading order; a module not listed goes under "Other".
FEATURES: list[tuple[str, list[str]]] = [
    ("Federation PKI and identity", ["test_pki.py"]),
    (
        "mTLS, authentication and authorization",
        ["test_security.py", "test_handshake_audit.py", "test_authz_home.py"],
    ),
    (
        "Verified transfer and receipts",
        ["test_transfer.py", "test_receipts.py", "test_readback.py"],
    ),
    ("Failure and recovery", ["test_resilience.py"]),
    ("Hostile peer on the transfer path", ["test_transfer_hostile.py"]),
    ("Study exchange: a batch of objects, one manifest receipt", ["test_batch_transfer.py"]),
    (
        "Study exchange: kill -9 of either node, hostile manifest receipts",
        ["test_study_kill.py", "test_study_hostile.py"],
    ),
    ("Object storage (filesystem and S3)", ["test_storage_contract.py"]),
    ("Node process, configuration, catalog", ["test_node.py", "test_allocator.py"]),
    ("One node on several machines: replicas behind HAProxy", ["test_replicas.py"]),
    ("Command line and demo", ["test_cli.py", "test_cli_usability.py", "test_demo.py"]),
    (
        "Command line: progress, waiting, bulk download",
        ["test_cli_progress.py", "test_cli_bulk_download.py"],
    ),
    ("Audit log", ["test_audit.py", "test_audit_witness.py", "test_atna.py"]),
    (
        "DICOM ingest (hospital)",
        [
            "test_dicom_ingest.py",
            "test_dicom_spool.py",
            "test_dicom_malformed.py",
            "test_dicom_abuse.py",
            "test_ingest_fast.py",
            "test_dicom_raw.py",
        ],
    ),
    ("Study previews for the web console (hospital)", ["test_previews.py"]),
    (
        "De-identification (PS3.15)",
        ["test_deid_profile.py", "test_deid_engine.py", "test_deid_text.py"],
    ),
    (
        "Confirmation and de-identified release (hospital)",
        ["test_hospital_release.py", "test_deid_recipients.py", "test_study_identity.py"],
    ),
    (
        "Pipelined release on both cores (worker processes, batch, kill and resume)",
        ["test_release_pipeline.py"],
    ),
    ("What can leave a hospital: the outbound gate", ["test_outbound_gate.py"]),
    ("Series geometry and suitability (factory)", ["test_fidelity_series.py", "test_factory.py"]),
    ("Case workflow: signed records and stage gates", ["test_cases.py", "test_record_binding.py"]),
    ("Case records from the command line: schema, templates, hashes", ["test_case_cli.py"]),
    ("One home: chunk streams, client RPC calls, retry delays", ["test_one_home.py"]),
    (
        "Design files, mesh fidelity, Encapsulated STL export",
        [
            "test_design_files.py",
            "test_stl_export.py",
            "test_design_export.py",
            "test_mesh_view.py",
            "test_mesh_viewer_js.py",
        ],
    ),
    (
        "Residency, telemetry and the officer's view",
        ["test_residency.py", "test_telemetry.py", "test_officer.py"],
    ),
    (
        "Wire contract and house style",
        [
            "test_protos.py",
            "test_lint.py",
            "test_docs.py",
            "test_error_tree.py",
            "test_push_encoding.py",
        ],
    ),
    ("Layers: the import graph (no cycle, no role in the core)", ["test_import_graph.py"]),
    (
        "Benchmarks (smoke)",
        ["test_bench_smoke.py", "test_bench_dicom_smoke.py", "test_bench_study_smoke.py"],
    ),
]


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].strip() if doc and doc.strip() else ""


def _describe(fn: ast.FunctionDef) -> str:
    text = _first_line(ast.get_docstring(fn))
    if not text:
        text = fn.name.removeprefix("test_").replace("_", " ")
    marks = []
    for dec in fn.decorator_list:
        src = ast.unparse(dec)
        if "parametrize" in src:
            marks.append("parametrized")
        if "mark.slow" in src:
            marks.append("slow, not in CI")
    return text + (f" *({', '.join(marks)})*" if marks else "")


def module_entries(path: Path) -> tuple[str, list[tuple[str, str]]]:
    tree = ast.parse(path.read_text())
    tests: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            tests.append((node.name, _describe(node)))
    return _first_line(ast.get_docstring(tree)), tests


def render() -> str:
    files = sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    listed = {name for _, names in FEATURES for name in names}
    features = [*FEATURES, ("Other", sorted(set(files) - listed))]
    lines = [
        "# Test cases by feature",
        "",
        "Generated by `python scripts/list_tests.py` from the test modules; "
        "`tests/test_docs.py` fails when this page is stale. Run everything with "
        "`python -m pytest` (slow benchmarks: `python -m pytest -m slow`).",
        "",
    ]
    for title, names in features:
        present = [n for n in names if n in files]
        if not present:
            continue
        lines += [f"## {title}", ""]
        for name in present:
            doc, tests = module_entries(ROOT / "tests" / name)
            lines += [f"### `tests/{name}` — {doc}" if doc else f"### `tests/{name}`", ""]
            lines += [f"- `{fn}`: {text}" for fn, text in tests]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
