"""Node process: S3 storage end to end, start-up refusals, graceful stop, migrations."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

from gateway.catalog import MIGRATIONS, Catalog
from gateway.config import load_config
from gateway.errors import CatalogError, ConfigError, StorageError
from tests.cluster import Federation, InProcessNode, NodeProcess, wait_for, write_config
from tests.outbound_files import clean_pdf
from tests.s3server import S3Server, new_bucket_name
from yigong_node.compose import build_node


def _s3_extra(s3: S3Server, bucket: str, endpoint: str | None = None) -> str:
    return (
        '[storage]\nbackend = "s3"\n\n[storage.s3]\n'
        f'endpoint = "{endpoint or s3.endpoint}"\nbucket = "{bucket}"\n'
        f'access_key = "{s3.access_key}"\nsecret_key_env = "YIGONG_TEST_S3_SECRET"\n'
        "secure = false\ncreate_bucket = true\npart_size_mb = 5\n\n"
        "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n\n"
        f'[residency]\nallowed_storage_regions = ["{s3.region}"]'
    )


def test_factory_on_s3_receives_and_serves(
    federation: Federation, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YIGONG_TEST_S3_SECRET", s3_server.secret_key)
    bucket = new_bucket_name()
    factory = InProcessNode(
        write_config(
            federation, tmp_path, "factory-1", "factory", extra=_s3_extra(s3_server, bucket)
        )
    )
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": factory.address}
        )
    )
    try:
        # multipart at 5 MiB parts; a hospital may send only allowed, clean types
        payload = clean_pdf(os.urandom(12 * 1024 * 1024 + 3))
        src = tmp_path / "review.pdf"
        src.write_bytes(payload)
        digest = hashlib.sha256(payload).hexdigest()
        with hospital.self_client() as client:
            tid = client.submit(src, ["factory-1"]).queued[0].transfer_id
        wait_for(
            lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done",
            what="transfer to the S3-backed factory",
        )
        assert factory.node.store.describe().startswith(f"s3://{bucket}")
        obj = s3_server.client().get_object(bucket, digest)
        try:
            assert hashlib.sha256(obj.read()).hexdigest() == digest
        finally:
            obj.close()
            obj.release_conn()
        eng = federation.person("eng-s3", "engineer", "factory-1")
        with factory.client(federation.creds(eng)) as fc:
            got, size = fc.download(digest, tmp_path / "pulled.stl")
        assert got == digest and size == len(payload)
    finally:
        hospital.stop()
        factory.stop()


def test_unreachable_s3_refused_at_startup(
    federation: Federation, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YIGONG_TEST_S3_SECRET", "x")
    cfg = write_config(
        federation,
        tmp_path,
        "factory-1",
        "factory",
        extra=_s3_extra(s3_server, "b-unreach", endpoint="127.0.0.1:9"),
    )
    with pytest.raises(StorageError, match=re.escape("127.0.0.1:9")):
        build_node(load_config(cfg))


def test_certificate_must_match_configured_identity(federation: Federation, tmp_path: Path) -> None:
    cfg = write_config(federation, tmp_path, "hospital-1", "hospital")
    text = cfg.read_text().replace('role = "hospital"', 'role = "factory"')
    cfg.write_text(text)
    with pytest.raises(ConfigError, match="asserts node 'hospital-1', role 'hospital'"):
        build_node(load_config(cfg))


def test_key_must_belong_to_certificate(federation: Federation, tmp_path: Path) -> None:
    cfg = write_config(federation, tmp_path, "hospital-1", "hospital")
    other_key = federation.node("factory-1", "factory").key_path
    text = cfg.read_text()
    own_key = str(federation.node("hospital-1", "hospital").key_path)
    cfg.write_text(text.replace(own_key, str(other_key)))
    with pytest.raises(ConfigError, match="does not belong to"):
        build_node(load_config(cfg))


def test_unknown_config_key_is_an_error(federation: Federation, tmp_path: Path) -> None:
    cfg = write_config(federation, tmp_path, "hospital-1", "hospital")
    cfg.write_text(cfg.read_text().replace("[server]", "[server]\nlisten_port = 7"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'listen_port' in \[server\]"):
        load_config(cfg)
    cfg.write_text(cfg.read_text().replace("listen_port = 7", "") + "\n[tracing]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(cfg)


def test_serve_stops_gracefully_on_sigterm(federation: Federation, tmp_path: Path) -> None:
    cfg = write_config(federation, tmp_path, "factory-1", "factory")
    proc = NodeProcess(cfg, tmp_path / "f.log")
    proc.start()
    assert proc.stop() == 0
    log_text = (tmp_path / "f.log").read_text()
    assert "listening on 127.0.0.1:" in log_text and "node factory-1 stopped" in log_text
    from gateway.audit import verify_log

    audit_path = load_config(cfg).audit.path
    report = verify_log(audit_path, "factory-1")
    assert report.ok, report.reason
    db = sqlite3.connect(audit_path)
    events = [r[0] for r in db.execute("SELECT event FROM events ORDER BY seq")]
    db.close()
    assert events[0] == "node.start" and events[-1] == "node.stop"


def test_ready_file_reports_port(federation: Federation, tmp_path: Path) -> None:
    cfg = write_config(federation, tmp_path, "factory-1", "factory")
    proc = NodeProcess(cfg, tmp_path / "f.log")
    try:
        port = proc.start()
        ready = json.loads(cfg.with_suffix(".ready").read_text())
        assert ready["port"] == port > 0 and ready["node"] == "factory-1"
    finally:
        proc.stop()


def test_transfer_listing_reads_a_page_by_index_not_a_sorted_table(tmp_path: Path) -> None:
    """The console's /transfers (newest first, ``until=`` cursor) walks transfers_created
    instead of sorting every transfer (bench/console_bench.py)."""
    from gateway.catalog import _listing

    cat = Catalog(tmp_path / "c.sqlite")
    try:
        for until in ("", "2026-12-04T00:00:00.000000Z"):
            sql, params = _listing("transfers", {"status": ""}, "", until, 50)
            plan = " | ".join(r[3] for r in cat.query("EXPLAIN QUERY PLAN " + sql, params))
            assert "transfers_created" in plan and "TEMP B-TREE" not in plan, plan
    finally:
        cat.close()


def test_catalog_migrations_and_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    cat = Catalog(path)
    assert cat.schema_version == len(MIGRATIONS) == 4  # 2: batches, 3: index, 4: replicas
    cat.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(CatalogError, match="schema version 99, newer than"):
        Catalog(path)


def test_catalog_extension_migrations(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    cat = Catalog(path)
    cat.extend("hospital_node", ["CREATE TABLE h1 (x INTEGER)"])
    cat.extend("hospital_node", ["CREATE TABLE h1 (x INTEGER)", "CREATE TABLE h2 (y TEXT)"])
    with cat.transaction() as db:
        db.execute("INSERT INTO h2 VALUES ('a')")
    assert [r[0] for r in cat.query("SELECT y FROM h2")] == ["a"]
    with pytest.raises(CatalogError, match="hospital_node schema version 2, newer than"):
        cat.extend("hospital_node", ["CREATE TABLE h1 (x INTEGER)"])
    cat.close()


def test_configuration_changes_are_audited(federation: Federation, tmp_path: Path) -> None:
    cfg = write_config(federation, tmp_path, "factory-1", "factory")
    for _ in range(2):
        InProcessNode(cfg).stop()  # same configuration twice
    cfg.write_text(cfg.read_text().replace("[server]", "[server]\nmax_workers = 9"))
    node = InProcessNode(cfg)
    node.stop()
    from gateway.audit import read_events

    events = read_events(load_config(cfg).audit.path, event="config.loaded")
    flags = [(e.details["first_start"], e.details["changed"]) for e in events]
    assert flags == [(True, False), (False, False), (False, True)]
    assert events[0].details["config_sha256"] != events[2].details["config_sha256"]
