"""One node on several machines (#13): replicas on one PostgreSQL and one S3 bucket behind HAProxy.

Three ``yigong serve`` replicas of factory-1 share one PostgreSQL database and one S3
bucket, behind HAProxy in TCP mode (mTLS end to end).

Hospitals are single processes (their own SQLite) whose peer address for factory-1 is
HAProxy's gRPC frontend. Each scenario proves, from both nodes' own records at the end:

- every object arrived exactly once: one done inbound transfer per outbound transfer,
  one catalogued object per distinct payload, nothing else in the bucket;
- bit-identical: the SHA-256 of every object in the S3 bucket is its name, and it is the
  SHA-256 of the file the hospital sent;
- one receipt per transfer, held by both sides byte for byte;
- the load went through HAProxy to more than one replica (HAProxy's own log).

A replica SIGKILLed at a seeded random point of the run (two seeds) must change none of
that: HAProxy's health check takes it out, the hospital's outbox retries on another
replica, the killed replica restarts on its ports and rejoins.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.catalog import Catalog
from gateway.config import load_config
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.outbound_files import clean_pdf
from tests.replicas import ReplicaSet, haproxy_bin
from tests.s3server import S3Server, new_bucket_name, remove_bucket

OBJECTS = 50
REPLICAS = 3
FACTORY = "factory-1"
PACE = "max_bytes_per_second = 4000000\n"  # a Push lasts long enough for a kill to land in it
HOSPITAL_TRANSFER = (
    "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0\n"
    "connect_timeout_seconds = 3\n" + PACE
)


def payloads(rng: random.Random, n: int, tag: str) -> list[bytes]:
    """``n`` distinct clean PDFs (what a hospital may send) of 20-200 KB."""
    return [
        clean_pdf(rng.randbytes(rng.randint(20_000, 200_000)), text=f"{tag} {i}") for i in range(n)
    ]


def hospital_node(
    federation: Federation, tmp_path: Path, node_id: str, factory: ReplicaSet
) -> InProcessNode:
    return InProcessNode(
        write_config(
            federation,
            tmp_path / node_id,
            node_id,
            "hospital",
            peers={FACTORY: factory.address},
            extra=HOSPITAL_TRANSFER,
        )
    )


def send_all(hospital: InProcessNode, files: list[bytes], where: Path) -> dict[str, str]:
    """Submit every file to factory-1; {transfer id: SHA-256 of the file}."""
    where.mkdir(parents=True, exist_ok=True)
    sent: dict[str, str] = {}
    with hospital.self_client() as client:
        for i, data in enumerate(files):
            src = where / f"doc-{i:03d}.pdf"
            src.write_bytes(data)
            tid = client.submit(src, [FACTORY], case_id="case-replicas").queued[0].transfer_id
            sent[tid] = hashlib.sha256(data).hexdigest()
    return sent


def outbound_done(hospital: InProcessNode) -> int:
    rows = hospital.node.catalog.list_transfers(direction="outbound", limit=10_000)
    return sum(1 for t in rows if t.status == "done")


def wait_delivered(hospital: InProcessNode, n: int, factory: ReplicaSet, timeout: float) -> None:
    try:
        wait_for(lambda: outbound_done(hospital) >= n, timeout=timeout, interval=0.1,
                 what=f"{n} transfers done at {hospital.node.cfg.node.id}")  # fmt: skip
    except AssertionError:
        rows = hospital.node.catalog.list_transfers(direction="outbound", limit=10_000)
        late = [(t.transfer_id, t.status, t.attempts, t.last_error) for t in rows
                if t.status != "done"]  # fmt: skip
        raise AssertionError(f"not delivered: {late[:5]}\n{factory.logs()}") from None


def check_exchange(
    factory: ReplicaSet,
    s3: S3Server,
    bucket: str,
    hospitals: list[tuple[InProcessNode, dict[str, str]]],
    *,
    spools_empty: bool = True,
) -> None:
    """The end state from both sides' own records (see the module docstring).

    ``spools_empty``: no replica keeps a spool file. Not asked after a kill: a transfer cut
    there and finished by another replica leaves its verified prefix in the killed
    replica's spool if that one restarts while the transfer is still open: its janitor
    keeps the spool files of open transfers at start, and expires only open ones later,
    so the file stays until that replica's next start."""
    for cfg in factory.configs:  # the replicas' catalog is PostgreSQL, not a file of theirs
        data_dir = load_config(cfg).data_dir
        assert not (data_dir / "catalog.sqlite").exists()
        if spools_empty:
            assert [p for p in (data_dir / "spool").rglob("*") if p.is_file()] == []
    catalog = Catalog.for_config(load_config(factory.configs[0]))
    try:
        inbound = catalog.list_transfers(direction="inbound", limit=10_000)
        objects = catalog.list_objects(limit=10_000)
    finally:
        catalog.close()
    by_tid = Counter(t.transfer_id for t in inbound)
    assert [tid for tid, n in by_tid.items() if n > 1] == [], "a transfer recorded twice"
    inbound_by_tid = {t.transfer_id: t for t in inbound}
    expected_objects: set[str] = set()
    for hospital, sent in hospitals:
        hid = hospital.node.cfg.node.id
        outbound = {
            t.transfer_id: t
            for t in hospital.node.catalog.list_transfers(direction="outbound", limit=10_000)
        }
        assert set(outbound) == set(sent)
        for tid, digest in sent.items():
            out, got = outbound[tid], inbound_by_tid.get(tid)
            assert out.status == "done" and out.object_id == digest
            assert got is not None, f"{tid} of {hid} unknown at the factory"
            assert got.status == "done" and got.peer_node == hid and got.object_id == digest
            assert out.receipt and got.receipt == out.receipt, f"{tid}: receipts differ"
        expected_objects |= set(sent.values())
    assert set(inbound_by_tid) == {tid for _, sent in hospitals for tid in sent}
    ids = [o.object_id for o in objects]
    assert sorted(ids) == sorted(expected_objects), "catalogued objects != sent payloads"
    assert bucket_objects(s3, bucket) == expected_objects, "bucket != the payloads sent"


def bucket_objects(s3: S3Server, bucket: str) -> set[str]:
    """The bucket's keys, each checked to be the SHA-256 of its bytes (bit-identical)."""
    client = s3.client()
    names = {o.object_name or "" for o in client.list_objects(bucket, recursive=True)}
    for name in names:
        obj = client.get_object(bucket, name)
        try:
            assert hashlib.sha256(obj.read()).hexdigest() == name
        finally:
            obj.close()
            obj.release_conn()
    return names


def served_by(factory: ReplicaSet) -> Counter[str]:
    """Connections HAProxy's log shows per replica (tcplog: ``grpc grpc_replicas/r1``)."""
    assert factory.haproxy_log is not None
    return Counter(re.findall(r"grpc_replicas/(r\d+)", factory.haproxy_log.read_text()))


@pytest.fixture
def factory_replicas(
    pg_url: str, s3_server: S3Server, replica_set: Callable[..., ReplicaSet]
) -> Iterator[tuple[ReplicaSet, str]]:
    """factory-1 as three replicas on a fresh PostgreSQL database and S3 bucket (the
    replicas stop before the database is dropped and the bucket removed)."""
    bucket = new_bucket_name()
    rs = replica_set(
        FACTORY, "factory", database_url=pg_url, s3=s3_server, bucket=bucket, count=REPLICAS
    )
    yield rs, bucket
    rs.stop()
    remove_bucket(s3_server, bucket)


def test_three_factory_replicas_behind_haproxy_receive_each_object_once(
    federation: Federation,
    tmp_path: Path,
    factory_replicas: tuple[ReplicaSet, str],
    s3_server: S3Server,
) -> None:
    """50 objects through HAProxy to three factory replicas: each arrives once, bit-identical.

    One hospital, one PostgreSQL catalog, one S3 bucket; one receipt per transfer held by
    both sides byte for byte; more than one replica took connections."""
    factory, bucket = factory_replicas
    hospital = hospital_node(federation, tmp_path, "hospital-1", factory)
    try:
        sent = send_all(hospital, payloads(random.Random(1), OBJECTS, "a"), tmp_path / "out")
        wait_delivered(hospital, OBJECTS, factory, timeout=60)
        check_exchange(factory, s3_server, bucket, [(hospital, sent)])
    finally:
        hospital.stop()
    assert len(served_by(factory)) > 1, served_by(factory)


@pytest.mark.parametrize("seed", [20261204, 413])
def test_replica_killed_mid_run_changes_nothing(
    federation: Federation,
    tmp_path: Path,
    factory_replicas: tuple[ReplicaSet, str],
    s3_server: S3Server,
    seed: int,
) -> None:
    """A replica SIGKILLed mid-run with a transfer on it: still each object once, bit-identical.

    The kill comes when a seeded random number of transfers are done, on a replica HAProxy
    has a connection open to; it must cut a transfer; the replica restarts a moment later."""
    factory, bucket = factory_replicas
    rng = random.Random(seed)
    kill_at = rng.randint(OBJECTS // 10, OBJECTS * 7 // 10)
    hospital = hospital_node(federation, tmp_path, "hospital-1", factory)
    try:
        files = payloads(rng, OBJECTS, f"b{seed}")
        sender = threading.Thread(
            target=lambda: sent.update(send_all(hospital, files, tmp_path / "out")), daemon=True
        )
        sent: dict[str, str] = {}
        sender.start()
        wait_for(lambda: outbound_done(hospital) >= kill_at, timeout=60, interval=0.01,
                 what=f"{kill_at} transfers done")  # fmt: skip
        # a replica with a connection open through HAProxy right now (a transfer on it)
        busy = wait_for(
            lambda: [i for i, n in enumerate(factory.sessions()) if n],
            timeout=10,
            interval=0.005,
            what="a replica with an open connection",
        )
        victim = rng.choice(busy)
        factory.kill(victim)
        killed_at = outbound_done(hospital)
        time.sleep(rng.uniform(0.5, 2.0))
        factory.restart(victim)
        sender.join(60)
        assert not sender.is_alive()
        wait_delivered(hospital, OBJECTS, factory, timeout=90)
        assert killed_at < OBJECTS, "the kill came after the run"
        cut = [
            (t.transfer_id, h.detail)
            for t in hospital.node.catalog.list_transfers(direction="outbound", limit=10_000)
            for h in hospital.node.catalog.history(t.transfer_id, "outbound")
            if h.kind == "attempt_failed"
        ]
        assert cut, f"the kill of replica {victim} at {killed_at} done cut no transfer"
        check_exchange(factory, s3_server, bucket, [(hospital, sent)], spools_empty=False)
    finally:
        hospital.stop()


def test_two_hospitals_send_at_once_to_the_replicated_factory(
    federation: Federation,
    tmp_path: Path,
    factory_replicas: tuple[ReplicaSet, str],
    s3_server: S3Server,
) -> None:
    """Two hospitals send at once, 5 of 25 objects the same bytes: each distinct object stored once.

    The replicas race on the same object ids in one catalog and bucket; each transfer
    still arrives once with its own receipt, held by both sides."""
    factory, bucket = factory_replicas
    rng = random.Random(7)
    shared = payloads(rng, 5, "shared")
    files = {
        "hospital-1": shared + payloads(rng, 20, "h1"),
        "hospital-2": shared + payloads(rng, 20, "h2"),
    }
    hospitals = {h: hospital_node(federation, tmp_path, h, factory) for h in files}
    sent: dict[str, dict[str, str]] = {}
    try:
        threads = [
            threading.Thread(
                target=lambda h=h: sent.__setitem__(
                    h, send_all(hospitals[h], files[h], tmp_path / f"out-{h}")
                ),
                daemon=True,
            )
            for h in files
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for h, node in hospitals.items():
            wait_delivered(node, len(files[h]), factory, timeout=60)
        check_exchange(factory, s3_server, bucket, [(hospitals[h], sent[h]) for h in files])
    finally:
        for node in hospitals.values():
            node.stop()


def test_hospital_replicas_take_dicom_through_haproxy(
    pg_url: str, s3_server: S3Server, replica_set: Callable[..., ReplicaSet]
) -> None:
    """A PACS's associations through HAProxy's DICOM frontend reach both hospital replicas.

    Two replicas of hospital-1 on one PostgreSQL database and one bucket; C-ECHO."""
    from pynetdicom import AE

    bucket = new_bucket_name()
    hospital = replica_set(
        "hospital-1",
        "hospital",
        database_url=pg_url,
        s3=s3_server,
        bucket=bucket,
        count=2,
        # health-check connections linger as associations until the ACSE timeout, and a
        # graceful stop waits for them (see docs/scale-out.md): short here
        dicom={"idle_timeout_seconds": 2.0},
    )
    try:
        assert hospital.dicom_address is not None
        host, port = hospital.dicom_address.rsplit(":", 1)
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        for _ in range(4):
            assoc = ae.associate(host, int(port), ae_title="YIGONG")
            assert assoc.is_established, hospital.logs()
            assert assoc.send_c_echo().Status == 0
            assoc.release()
        assert hospital.haproxy_log is not None
        seen = Counter(re.findall(r"dicom_replicas/(r\d+)", hospital.haproxy_log.read_text()))
        assert set(seen) == {"r0", "r1"}, seen
    finally:
        hospital.stop()
        remove_bucket(s3_server, bucket)


def test_push_cut_while_the_replica_stores_ends_with_one_receipt(
    federation: Federation,
    tmp_path: Path,
    factory_replicas: tuple[ReplicaSet, str],
    s3_server: S3Server,
) -> None:
    """A Push cut after its last byte, while the replica stores it: both sides end with one receipt.

    HAProxy cuts the hospital's connection (runtime API ``shutdown sessions``) the moment
    a replica's spool holds the whole object; that replica goes on storing and signs,
    while the sender's retry may land on another replica and push it again."""
    factory, bucket = factory_replicas
    hospital = hospital_node(federation, tmp_path, "hospital-1", factory)
    try:
        data = clean_pdf(random.Random(5).randbytes(12 * 1024 * 1024))
        sent = send_all(hospital, [data], tmp_path / "out")
        (tid,) = sent
        parts = [
            load_config(cfg).data_dir / "spool" / "inbound" / f"{tid}.part"
            for cfg in factory.configs
        ]

        def full() -> int | None:
            for i, part in enumerate(parts):
                with contextlib.suppress(OSError):
                    if part.stat().st_size >= len(data):
                        return i + 1
            return None

        receiving = wait_for(full, timeout=60, interval=0.002, what="the whole object spooled")
        factory.haproxy_command(f"shutdown sessions server grpc_replicas/r{receiving - 1}")
        wait_delivered(hospital, 1, factory, timeout=60)
        time.sleep(2)  # the cut replica may still be finishing
        check_exchange(factory, s3_server, bucket, [(hospital, sent)], spools_empty=False)
    finally:
        hospital.stop()


def test_the_documented_haproxy_configuration_is_valid_and_sends_proxy_headers() -> None:
    """docs/haproxy.cfg.example passes HAProxy's own check, and every server line sends
    the PROXY v2 header the replicas read (server/dicom.proxy_protocol_from)."""
    exe = haproxy_bin()
    if exe is None:
        pytest.skip("HAProxy is not installed: apt-get install haproxy (.ci/run does)")
    example = Path(__file__).parent.parent / "docs" / "haproxy.cfg.example"
    check = subprocess.run([str(exe), "-c", "-f", str(example)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    servers = [line for line in example.read_text().splitlines() if "default-server" in line]
    assert len(servers) == 2 and all("send-proxy-v2" in line for line in servers)


STUDY_INSTANCES = 100


@pytest.mark.skipif(not Path("/usr/bin/storescu").exists(), reason="dcmtk storescu missing")
def test_a_study_and_objects_through_two_kills_arrive_once_and_both_audit_logs_agree(
    federation: Federation,
    tmp_path: Path,
    factory_replicas: tuple[ReplicaSet, str],
    s3_server: S3Server,
) -> None:
    """The issue's proof: a 100-instance study (pushed by dcmtk storescu, confirmed by a
    clinician, sent as one batch) and 50 objects go to three factory replicas while a
    replica is SIGKILLed twice at seeded random points: every object arrives once,
    bit-identical; every transfer and the batch have one receipt both sides hold; the
    factory's one audit chain on PostgreSQL verifies; reconciliation finds nothing."""
    from tests.study_harness import storescu, write_study
    from yigong.v1 import hospital_pb2, hospital_pb2_grpc

    factory, bucket = factory_replicas
    rng = random.Random(1204)
    hospital = InProcessNode(
        write_config(
            federation, tmp_path / "hospital-1", "hospital-1", "hospital",
            peers={FACTORY: factory.address}, extra=HOSPITAL_TRANSFER,
            dicom={"quiet_period_seconds": 0.5},
        )
    )  # fmt: skip
    try:
        study = write_study(tmp_path / "study", STUDY_INSTANCES, rows=128, cols=128)
        storescu(hospital.node.hooks._dicom.port, study)  # type: ignore[attr-defined]
        studies = hospital.node.hooks.studies  # type: ignore[attr-defined]

        def received() -> bool:
            hospital.settle()
            return bool(studies.list_studies(status="received", limit=10))

        wait_for(received, 60, what="the study received at the hospital")
        files = payloads(rng, OBJECTS, "study-kill")
        sent: dict[str, str] = {}
        sender = threading.Thread(
            target=lambda: sent.update(send_all(hospital, files, tmp_path / "out")), daemon=True
        )
        sender.start()
        clinician = federation.person("dr-replicas", "clinician", "hospital-1")
        request = hospital_pb2.ConfirmStudyRequest(
            study_uid=study.study_uid, case_id="case-study-kill", destination=FACTORY
        )

        def confirm() -> None:
            with hospital.client(federation.creds(clinician)) as dr:
                hospital_pb2_grpc.HospitalStub(dr.channel).ConfirmStudy(request, timeout=300)

        confirming = threading.Thread(target=confirm, daemon=True)
        confirming.start()  # the release sends while it de-identifies: kill meanwhile
        for _ in range(2):  # two kills at random points, each of a busy replica
            time.sleep(rng.uniform(0.3, 1.5))
            busy = wait_for(
                lambda: [i for i, n in enumerate(factory.sessions()) if n], timeout=20,
                interval=0.005, what="a replica with an open connection",
            )  # fmt: skip
            victim = rng.choice(busy)
            factory.kill(victim)
            time.sleep(rng.uniform(0.3, 1.0))
            factory.restart(victim)
        sender.join(90)
        confirming.join(300)
        assert not sender.is_alive() and not confirming.is_alive()
        wait_delivered(hospital, OBJECTS + STUDY_INSTANCES, factory, timeout=180)
        cat = hospital.node.catalog
        failed = [
            h for t in cat.list_transfers(direction="outbound", limit=10_000)
            for h in cat.history(t.transfer_id, "outbound") if h.kind == "attempt_failed"
        ] + [
            h for b in cat.list_batches(direction="outbound", limit=10)
            for h in cat.history(b.batch_id, "outbound") if "fail" in h.kind
        ]  # fmt: skip
        assert failed, "neither kill cut a transfer or the batch: the test proved nothing"
        (batch,) = hospital.node.catalog.list_batches(direction="outbound", limit=10)
        wait_for(lambda: hospital.node.catalog.get_batch(batch.batch_id, "outbound").status
                 == "done", 60, what="the study's batch done")  # fmt: skip
        ours = hospital.node.catalog.get_batch(batch.batch_id, "outbound")
        factory_cat = Catalog.for_config(load_config(factory.configs[0]))
        try:
            theirs = factory_cat.get_batch(batch.batch_id, "inbound")
            assert theirs.status == "done" and theirs.receipt == ours.receipt and ours.receipt
            inbound = factory_cat.list_transfers(direction="inbound", limit=10_000)
            assert (
                len(inbound) == len({t.transfer_id for t in inbound}) == OBJECTS + STUDY_INSTANCES
            )
            study_objects = {t.object_id for t in inbound if t.batch_id == batch.batch_id}
            assert len(study_objects) == STUDY_INSTANCES
        finally:
            factory_cat.close()
        # each once, bit-identical, nothing else
        assert bucket_objects(s3_server, bucket) == study_objects | set(sent.values())
    finally:
        hospital.stop()
    for config in (factory.configs[0], hospital.config):
        verify = subprocess.run(
            [sys.executable, "-m", "yigong_node", "audit", "verify", "--config", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert verify.stdout.startswith("OK: ")
    hospital = InProcessNode(hospital.config)  # reconcile asks the factory through HAProxy
    try:
        rec = subprocess.run(
            [sys.executable, "-m", "yigong_node", "audit", "reconcile", "--config",
             str(hospital.config)], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert rec.returncode == 0, rec.stdout + rec.stderr
    finally:
        hospital.stop()
