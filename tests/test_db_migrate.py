"""``yigong db``: status, and moving a node from its SQLite files to PostgreSQL (#13).

A factory receives an object on SQLite; it is stopped; ``yigong db migrate-to-postgresql``
copies its catalog into an empty PostgreSQL database (every table, compared before the
commit); the factory restarts with ``[database] url`` and still serves the object with
the same receipt; a second copy into the now non-empty database is refused; a copy
without ``--yes`` changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from gateway.audit import read_events
from gateway.catalog import Catalog
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.outbound_files import clean_pdf
from tests.pg import PgServer


def yigong(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yigong_node", *args], capture_output=True, text=True, timeout=120
    )


def _received(federation: Federation, tmp_path: Path) -> tuple[Path, str, str, bytes]:
    """A factory config whose SQLite catalog holds one received object."""
    fconf = write_config(federation, tmp_path, "factory-1", "factory")
    factory = InProcessNode(fconf)
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": factory.address}
        )
    )
    try:
        payload = clean_pdf(os.urandom(200_000))
        src = tmp_path / "report.pdf"
        src.write_bytes(payload)
        with hospital.self_client() as client:
            (queued,) = client.submit(src, ["factory-1"], case_id="case-9").queued
        tid = queued.transfer_id

        def done() -> bool:
            rec = factory.node.catalog.find_transfer(tid, "inbound")
            return rec is not None and rec.status == "done"

        wait_for(done, what="inbound transfer done")
        receipt = factory.node.catalog.get_transfer(tid, "inbound").receipt
        assert receipt
    finally:
        hospital.stop()
        factory.stop()
    return fconf, tid, hashlib.sha256(payload).hexdigest(), receipt


def test_migrate_sqlite_catalog_to_postgresql_and_serve_from_it(
    federation: Federation, tmp_path: Path, pg_server: PgServer, pg_url: str
) -> None:
    fconf, tid, digest, receipt = _received(federation, tmp_path)
    before = Catalog(tmp_path / "factory-1-data" / "catalog.sqlite")
    tables = {
        r[0]: before.query(f"SELECT COUNT(*) FROM {r[0]}")[0][0]
        for r in before.query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    before.close()

    dry = yigong("db", "migrate-to-postgresql", "--config", str(fconf), "--to", pg_url)
    assert dry.returncode == 1 and "re-run with --yes" in dry.stderr
    assert pg_server.sql(pg_url, "SELECT schema_name FROM information_schema.schemata"
                         " WHERE schema_name = 'catalog'") == []  # fmt: skip

    done = yigong("db", "migrate-to-postgresql", "--config", str(fconf), "--to", pg_url, "--yes")
    assert done.returncode == 0, done.stderr
    assert "copied and compared" in done.stdout and f'url = "{pg_url}"' in done.stdout
    assert "chain verified on PostgreSQL" in done.stdout
    tables["schema_versions"] += 1  # SQLite's PRAGMA user_version becomes a row there
    for table, count in tables.items():
        (got,) = pg_server.sql(pg_url, f"SELECT COUNT(*) FROM catalog.{table}")
        assert got[0] == count, table
    # a second copy never merges into what is there
    again = yigong("db", "migrate-to-postgresql", "--config", str(fconf), "--to", pg_url, "--yes")
    assert again.returncode == 2 and "already holds" in again.stderr and "empty" in again.stderr

    fconf.write_text(fconf.read_text() + f'\n[database]\nurl = "{pg_url}"\n')
    status = yigong("db", "status", "--config", str(fconf), "--json")
    assert status.returncode == 0, status.stderr
    out = json.loads(status.stdout)
    assert out["engine"] == "postgresql" and out["schema_versions"]["schema"] == 4
    sqlite_entries = len(read_events(tmp_path / "factory-1-data" / "audit.sqlite", limit=100_000))
    verified = yigong("audit", "verify", "--config", str(fconf))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert f"{sqlite_entries} entries" in verified.stdout and "(schema audit)" in verified.stdout
    factory = InProcessNode(fconf)
    try:
        assert factory.node.catalog.engine == "postgresql"
        assert factory.node.audit.db.engine == "postgresql"  # the chain goes on there
        seq = factory.node.audit.record("query", actor="node:factory-1")
        assert seq > sqlite_entries
        rec = factory.node.catalog.get_transfer(tid, "inbound")
        assert rec.status == "done" and rec.receipt == receipt and rec.object_id == digest
        with factory.self_client() as fc:
            detail = fc.get_object(digest)
            (t,) = detail.transfers
            assert t.transfer_id == tid and t.status == "done"
        history = [h.kind for h in factory.node.catalog.history(tid, "inbound")]
        assert history and history == sorted(history, key=history.index)  # order kept
    finally:
        factory.stop()


def test_status_on_sqlite_names_the_files(federation: Federation, tmp_path: Path) -> None:
    fconf = write_config(federation, tmp_path, "factory-1", "factory")
    InProcessNode(fconf).stop()
    status = yigong("db", "status", "--config", str(fconf))
    assert status.returncode == 0, status.stderr
    assert "engine: sqlite" in status.stdout
    assert str(tmp_path / "factory-1-data" / "catalog.sqlite") in status.stdout
    assert "schema 4" in status.stdout


def test_migrate_refuses_a_node_already_on_postgresql(
    federation: Federation, tmp_path: Path, pg_url: str
) -> None:
    fconf = write_config(
        federation, tmp_path, "factory-1", "factory",
        extra=f'[database]\nurl = "{pg_url}"',
    )  # fmt: skip
    out = yigong("db", "migrate-to-postgresql", "--config", str(fconf), "--to", pg_url, "--yes")
    assert out.returncode == 2 and "already names" in out.stderr and "on PostgreSQL" in out.stderr


def test_a_password_in_the_url_is_refused_and_never_printed(
    federation: Federation, tmp_path: Path
) -> None:
    fconf = write_config(
        federation, tmp_path, "factory-1", "factory",
        extra='[database]\nurl = "postgresql://gw:s3cret@127.0.0.1:1/x"',
    )  # fmt: skip
    out = yigong("db", "status", "--config", str(fconf))
    assert out.returncode == 2 and "PGPASSWORD" in out.stderr
    assert "s3cret" not in out.stderr + out.stdout


def test_config_check_names_the_database_and_says_when_it_is_unreachable(
    federation: Federation, tmp_path: Path, pg_url: str
) -> None:
    fconf = write_config(
        federation, tmp_path, "factory-1", "factory", extra=f'[database]\nurl = "{pg_url}"'
    )
    ok = yigong("config", "check", str(fconf), "--no-peers")
    assert ok.returncode == 0, ok.stdout
    assert any(
        line.startswith("OK") and "  database: " in line and "PostgreSQL" in line
        and "writable" in line
        for line in ok.stdout.splitlines()
    ), ok.stdout  # fmt: skip
    assert "  catalog: " not in ok.stdout  # no SQLite file is checked
    fconf.write_text(fconf.read_text().replace(pg_url, "postgresql://gw@127.0.0.1:1/nodb"))
    bad = yigong("config", "check", str(fconf), "--no-peers")
    assert bad.returncode == 1
    (fail,) = [line for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert "database" in fail and "127.0.0.1:1" in fail and "is PostgreSQL running" in fail
