"""Data residency (invariant 3): a peer or a store outside the policy's regions is refused
before anything moves, and every refusal is audited as a security alert."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ResidencyViolation
from gateway.storage import S3Store
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.outbound_files import clean_pdf
from tests.s3server import S3Server, new_bucket_name
from yigong_node.compose import build_node


def _pair(
    fed: Federation, tmp: Path, factory_region: str, policy: str = ""
) -> tuple[InProcessNode, InProcessNode]:
    factory = InProcessNode(
        write_config(fed, tmp, f"factory-{factory_region}", "factory", region=factory_region)
    )
    hospital = InProcessNode(
        write_config(
            fed,
            tmp,
            "hospital-1",
            "hospital",
            peers={f"factory-{factory_region}": factory.address},
            extra="[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n" + policy,
        )
    )
    return hospital, factory


def test_peer_in_forbidden_region_refused_before_anything_moves(
    federation: Federation, tmp_path: Path
) -> None:
    hospital, factory = _pair(federation, tmp_path, "eu-west")
    try:
        src = tmp_path / "design-input.bin"
        src.write_bytes(clean_pdf(os.urandom(4096)))  # what a hospital may send
        with hospital.self_client() as client:
            tid = client.submit(src, ["factory-eu-west"]).queued[0].transfer_id
        rec = wait_for(
            lambda: (
                (t := hospital.node.catalog.get_transfer(tid, "outbound")).status == "failed" and t
            ),
            what="the transfer refused",
        )
        assert "certified for region 'eu-west'" in rec.last_error
        assert "allows only cn-east" in rec.last_error and "Nothing was sent" in rec.last_error
        # The factory never saw the object: not even its announcement.
        assert factory.node.catalog.list_transfers() == []
        refused = hospital.node.audit.events(event="residency.refused")
        alerts = hospital.node.audit.events(event="security.alert")
        assert [e.transfer_id for e in refused] == [tid] == [e.transfer_id for e in alerts]
        # Refused for good: no retry loop.
        assert hospital.node.catalog.get_transfer(tid, "outbound").attempts == 1
    finally:
        hospital.stop()
        factory.stop()


def test_peer_region_allowed_by_policy(federation: Federation, tmp_path: Path) -> None:
    hospital, factory = _pair(
        federation,
        tmp_path,
        "eu-west",
        '\n[residency]\nallowed_peer_regions = ["cn-east", "eu-west"]',
    )
    try:
        src = tmp_path / "x.bin"
        src.write_bytes(clean_pdf(b"allowed" * 100))
        with hospital.self_client() as client:
            tid = client.submit(src, ["factory-eu-west"]).queued[0].transfer_id
        wait_for(lambda: hospital.node.catalog.get_transfer(tid, "outbound").status == "done")
    finally:
        hospital.stop()
        factory.stop()


def test_storage_in_forbidden_region_refused_at_startup(
    federation: Federation, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("YIGONG_TEST_S3_SECRET", s3_server.secret_key)
    bucket = new_bucket_name()
    S3Store(
        s3_server.endpoint,
        bucket,
        s3_server.access_key,
        s3_server.secret_key,
        secure=False,
        region="eu-central-1",
        create=True,
    ).check()
    extra = (
        '[storage]\nbackend = "s3"\n\n[storage.s3]\n'
        f'endpoint = "{s3_server.endpoint}"\nbucket = "{bucket}"\n'
        f'access_key = "{s3_server.access_key}"\nsecret_key_env = "YIGONG_TEST_S3_SECRET"\n'
        "secure = false\n"
    )
    cfg = write_config(federation, tmp_path, "factory-1", "factory", extra=extra)
    with pytest.raises(ResidencyViolation) as err:
        build_node(load_config(cfg))
    assert "is in region 'eu-central-1'" in str(err.value)
    assert "allowed_storage_regions allows only cn-east" in str(err.value)
    from gateway.audit import verify_log

    audit_path = load_config(cfg).audit.path
    assert verify_log(audit_path, "factory-1").ok
    import sqlite3

    db = sqlite3.connect(audit_path)
    events = [r[0] for r in db.execute("SELECT event FROM events ORDER BY seq")]
    db.close()
    assert events[:2] == ["residency.refused", "security.alert"]


def test_bucket_not_created_in_a_forbidden_region(
    federation: Federation, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """create_bucket with a region the policy forbids: refused before the bucket exists."""
    monkeypatch.setenv("YIGONG_TEST_S3_SECRET", s3_server.secret_key)
    bucket = new_bucket_name()
    extra = (
        '[storage]\nbackend = "s3"\n\n[storage.s3]\n'
        f'endpoint = "{s3_server.endpoint}"\nbucket = "{bucket}"\n'
        f'access_key = "{s3_server.access_key}"\nsecret_key_env = "YIGONG_TEST_S3_SECRET"\n'
        'secure = false\ncreate_bucket = true\nregion = "eu-central-1"\n'
    )
    cfg = write_config(federation, tmp_path, "factory-1", "factory", extra=extra)
    with pytest.raises(ResidencyViolation) as err:
        build_node(load_config(cfg))
    assert "create_bucket would create it in region 'eu-central-1'" in str(err.value)
    assert "allowed_storage_regions allows only cn-east; nothing was created" in str(err.value)
    assert not s3_server.client().bucket_exists(bucket)
    from gateway.audit import AuditLog

    log = AuditLog(load_config(cfg).audit.path, "factory-1")
    try:
        refusals = [(e.event, e.details.get("region")) for e in log.events(limit=10)]
    finally:
        log.close()
    assert refusals[:2] == [
        ("residency.refused", "eu-central-1"),
        ("security.alert", "eu-central-1"),
    ]


def test_unknown_region_in_policy_is_a_config_error(federation: Federation, tmp_path: Path) -> None:
    from gateway.errors import ConfigError

    cfg = write_config(
        federation,
        tmp_path,
        "factory-1",
        "factory",
        extra='[residency]\nallowed_peer_regions = ["Not A Region"]',
    )
    with pytest.raises(ConfigError, match=r"\[residency\]"):
        load_config(cfg)
