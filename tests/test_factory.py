"""Factory side: DICOM facts in the signed receipt, studies grouped per case, the
suitability check with configurable thresholds, and the Factory query endpoint."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from pydicom import dcmread

from factory_node.role import FactoryRole
from factory_node.studies import StudySummary, SuitabilityRecord
from gateway.fidelity.dicom import geometry_hash, pixel_hash
from gateway.roles import CORE_ONLY
from gateway.rpc.client import NodeClient
from gateway.storage import ObjectStore
from gateway.transfer.model import Announce
from gateway.transfer.receipts import verify_receipt
from hospital_node.deid import Deidentifier, scan_for_identifiers
from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.dicom_factory import SeriesInfo, StudyInfo, ct_series, to_part10
from yigong.v1 import factory_pb2, factory_pb2_grpc
from yigong_node.cli import main as cli_main
from yigong_node.roles import ROLES

CASE = "case-1"
PSEUDONYM = "YG-0123456789AB"
DEID = Deidentifier(b"factory-test-deid-key-0123456789")


CORE_HOSPITAL = ROLES.with_role("hospital", CORE_ONLY)
"""Roles of a hospital node that runs the core only (it sends what these tests give it)."""


@pytest.fixture
def pair(federation: Federation, tmp_path: Path) -> Iterator[tuple[InProcessNode, InProcessNode]]:
    """A running factory node and a hospital node (core only) that knows it as a peer."""
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": factory.address}
        ),
        roles=CORE_HOSPITAL,
    )
    yield hospital, factory
    hospital.stop()
    factory.stop()


def deid_series(n: int, *, thickness: str = "1.0", skip: tuple[int, ...] = ()) -> list[bytes]:
    """A de-identified axial CT series (one new study) as Part-10 bytes."""
    series = SeriesInfo(slice_thickness=thickness)
    study = StudyInfo()
    return [
        DEID.deidentify_bytes(to_part10(ds), PSEUDONYM)
        for i, ds in enumerate(ct_series(n, rows=32, cols=32, study=study, series=series))
        if i not in skip
    ]


def uids(data: bytes) -> tuple[str, str]:
    ds = dcmread(io.BytesIO(data))
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def send(hospital: InProcessNode, blobs: list[bytes], tmp_path: Path, case: str = CASE) -> None:
    """Submit every instance to factory-1 and wait until each receipt is back.

    The hospital sends as the bare core does (built with :data:`CORE_HOSPITAL`): its
    release workflow (clinician confirmation, then only released objects may leave) is
    the hospital's own and is tested there; the instances are de-identified all the same
    and pass its scan.
    """
    tids = []
    with hospital.self_client() as client:
        for data in blobs:
            path = tmp_path / f"{uuid.uuid4().hex}.dcm"
            path.write_bytes(data)
            reply = client.submit(path, ["factory-1"], case_id=case, media_type="application/dicom")
            tids.append(reply.queued[0].transfer_id)

    def all_done() -> bool:
        catalog = hospital.node.catalog
        return all(catalog.get_transfer(t, "outbound").status == "done" for t in tids)

    wait_for(all_done, timeout=60, what="all DICOM transfers done")


def role(node: InProcessNode) -> FactoryRole:
    hooks = node.node.hooks
    assert isinstance(hooks, FactoryRole)
    return hooks


def checked(factory: InProcessNode, case: str, count: int) -> list[StudySummary]:
    """Wait until ``count`` studies of ``case`` have a current suitability result."""

    def ready() -> list[StudySummary] | None:
        studies = role(factory).studies.list_studies(case)
        ok = len(studies) == count and all(s.result_current for s in studies)
        return studies if ok else None

    found: list[StudySummary] = wait_for(ready, timeout=20, what="suitability results")
    return found


def latest(study: StudySummary) -> SuitabilityRecord:
    assert study.latest is not None
    return study.latest


@contextmanager
def stub(
    fed: Federation, node: InProcessNode, person: str, role: str, org: str
) -> Iterator[factory_pb2_grpc.FactoryStub]:
    """A Factory stub on ``node`` with the certificate of ``person`` (``role`` at ``org``)."""
    creds = fed.creds(fed.person(person, role, org))
    client = NodeClient(node.address, creds, node_id=node.node.cfg.node.id)
    try:
        yield factory_pb2_grpc.FactoryStub(client.channel)
    finally:
        client.close()


def test_receipts_carry_dicom_facts_and_studies_are_checked(
    pair: tuple[InProcessNode, InProcessNode], tmp_path: Path
) -> None:
    hospital, factory = pair
    role(factory).monitor.quiet_seconds = 0.2
    good = deid_series(12)
    thick = deid_series(12, thickness="2.0")
    gap = deid_series(12, skip=(5,))
    assert scan_for_identifiers(dcmread(io.BytesIO(good[0])), PSEUDONYM) == []
    blobs = good + thick + gap
    send(hospital, blobs, tmp_path)

    # Every receipt carries the factory's re-parse: equal to our own computation.
    expected = {}
    for data in blobs:
        ds = dcmread(io.BytesIO(data))
        expected[hashlib.sha256(data).hexdigest()] = {
            "dicom.sop_instance_uid": str(ds.SOPInstanceUID),
            "dicom.pixel_sha256": pixel_hash(ds),
            "dicom.geometry_sha256": geometry_hash(ds),
            "dicom.study_uid": str(ds.StudyInstanceUID),
            "dicom.series_uid": str(ds.SeriesInstanceUID),
        }
    outbound = hospital.node.catalog.list_transfers(direction="outbound", case_id=CASE)
    assert len(outbound) == len(blobs)
    for t in outbound:
        body = verify_receipt(t.receipt or b"", hospital.node.trust).body
        assert dict(body.facts) == expected[t.object_id]

    # Grouped per case and study; each study checked once it went quiet.
    studies = {s.study_uid: s for s in checked(factory, CASE, 3)}
    (good_uid, _), (thick_uid, thick_series), (gap_uid, gap_series) = (
        uids(good[0]),
        uids(thick[0]),
        uids(gap[0]),
    )
    assert {u: s.instance_count for u, s in studies.items()} == {
        good_uid: 12,
        thick_uid: 12,
        gap_uid: 11,
    }
    assert all(s.series_count == 1 and s.case_id == CASE for s in studies.values())
    good_r, thick_r, gap_r = (latest(studies[u]) for u in (good_uid, thick_uid, gap_uid))
    assert good_r.passed and good_r.findings == ()
    assert good_r.thresholds["max_slice_thickness_mm"] == 1.0
    assert not thick_r.passed
    assert thick_r.findings == (f"series {thick_series}: slice thickness 2.0 mm > 1.0 mm",)
    assert not gap_r.passed
    assert any(
        f.startswith(f"series {gap_series}: 1 missing slice(s)") and "gap(s) at" in f
        for f in gap_r.findings
    )

    # Each result is audited (UIDs and counts only).
    results = factory.node.audit.events(event="fidelity.result")
    by_study = {e.details["study_uid"]: e for e in results}
    assert by_study[good_uid].outcome == "success" and by_study[good_uid].case_id == CASE
    assert by_study[thick_uid].outcome == "failure"
    assert by_study[gap_uid].details["passed"] is False


def test_query_endpoint_checks_on_demand_and_enforces_roles(
    pair: tuple[InProcessNode, InProcessNode],
    federation: Federation,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hospital, factory = pair
    role(factory).monitor.quiet_seconds = 3600  # only an explicit GetStudy checks
    thick = deid_series(10, thickness="2.0")
    study_uid, series_uid = uids(thick[0])
    send(hospital, thick, tmp_path, case="case-2")

    with stub(federation, factory, "erin", "engineer", "factory-1") as engineer:
        listed = engineer.ListStudies(factory_pb2.ListFactoryStudiesRequest(case_id="case-2"))
        (summary,) = listed.studies
        assert (summary.study_uid, summary.instance_count) == (study_uid, 10)
        assert not summary.HasField("suitability")  # not checked yet
        assert not engineer.ListStudies(
            factory_pb2.ListFactoryStudiesRequest(case_id="case-9")
        ).studies

        study = engineer.GetStudy(factory_pb2.GetFactoryStudyRequest(study_uid=study_uid))
        assert study.case_id == "case-2" and study.series_count == 1
        s = study.suitability
        assert not s.passed and s.current and s.instance_count == 10
        assert s.findings == [f"series {series_uid}: slice thickness 2.0 mm > 1.0 mm"]
        assert s.thresholds.max_slice_thickness_mm == 1.0 and s.thresholds.min_slices == 10
        (series,) = study.series
        assert series.series_uid == series_uid and series.instance_count == 10
        assert list(series.slice_thickness_mm) == [2.0]
        assert series.spacing_median_mm == 2.0 and series.spacing_uniform
        assert series.missing_slices_estimate == 0 and not series.passed
        assert json.loads(series.report)["positions_mm"][:2] == [-80.0, -78.0]
        # Recorded: a second GetStudy does not check again.
        engineer.GetStudy(factory_pb2.GetFactoryStudyRequest(study_uid=study_uid))
        store = role(factory).studies
        assert len(store.results("case-2", study_uid)) == 1

        with pytest.raises(grpc.RpcError) as err:
            engineer.GetStudy(factory_pb2.GetFactoryStudyRequest(study_uid="2.25.1"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    with stub(federation, factory, "otto", "officer", "factory-1") as officer:
        (listed_study,) = officer.ListStudies(factory_pb2.ListFactoryStudiesRequest()).studies
        assert listed_study.suitability.current and not listed_study.suitability.passed

    with stub(federation, factory, "hank", "engineer", "hospital-1") as outsider:
        for call, request in (
            (outsider.ListStudies, factory_pb2.ListFactoryStudiesRequest()),
            (outsider.GetStudy, factory_pb2.GetFactoryStudyRequest(study_uid=study_uid)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(request)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    queries = [e.details.get("query") for e in factory.node.audit.events(event="query")]
    assert "factory.list_studies" in queries and "factory.get_study" in queries

    # The CLI, as the engineer: JSON and the default table.
    person = federation.person("erin", "engineer", "factory-1")
    conn = [
        "--address", factory.address, "--node-id", "factory-1",
        "--cert", str(person.cert_path), "--key", str(person.key_path),
        "--ca", str(federation.ca),
    ]  # fmt: skip
    capsys.readouterr()
    assert cli_main(["factory", "studies", "--case", "case-2", "--json", *conn]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["study_uid"] == study_uid and row["suitability"]["passed"] is False
    assert cli_main(["factory", "study", study_uid, *conn]) == 0
    out = capsys.readouterr().out
    assert "FAILED" in out and "slice thickness 2.0 mm > 1.0 mm" in out and series_uid in out


def test_thresholds_come_from_config(federation: Federation, tmp_path: Path) -> None:
    extra = (
        "[suitability]\nmax_slice_thickness_mm = 3.0\nmin_slices = 5\n\n"
        "[transfer]\nretry_initial_seconds = 0.2\nretry_max_seconds = 1.0"
    )
    config = write_config(federation, tmp_path, "factory-1", "factory", extra=extra)
    factory = InProcessNode(config)
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": factory.address}
        ),
        roles=CORE_HOSPITAL,
    )
    try:
        role(factory).monitor.quiet_seconds = 0.2
        send(hospital, deid_series(6, thickness="2.0"), tmp_path)
        (study,) = checked(factory, CASE, 1)
        result = latest(study)
        assert result.passed, result.findings
        assert result.thresholds["max_slice_thickness_mm"] == 3.0
        assert result.thresholds["min_slices"] == 5
    finally:
        hospital.stop()
        factory.stop()

    # Back to the default thresholds: on start the study is re-checked under them.
    config.write_text(config.read_text().replace("max_slice_thickness_mm = 3.0\n", ""))
    factory = InProcessNode(config)
    try:
        store = role(factory).studies
        uid = study.study_uid
        # (under load the first phase may have checked the study more than once)
        wait_for(
            lambda: (r := store.latest_result(CASE, uid)) is not None
            and r.thresholds["max_slice_thickness_mm"] == 1.0,
            timeout=20,
            what="re-check under the default thresholds",
        )
        again = store.latest_result(CASE, uid)
        assert again is not None
        assert not again.passed and again.thresholds["max_slice_thickness_mm"] == 1.0
        assert any("slice thickness 2.0 mm > 1.0 mm" in f for f in again.findings)
    finally:
        factory.stop()


def _put(store: ObjectStore, data: bytes) -> Announce:
    digest = hashlib.sha256(data).hexdigest()
    store.put_stream(digest, [data])
    return Announce(digest, len(data), "x.dcm", "application/dicom", "case-3")


def test_unparseable_dicom_is_received_and_named_in_the_facts(
    pair: tuple[InProcessNode, InProcessNode],
) -> None:
    _, factory = pair
    hooks = role(factory)
    store = factory.node.store
    facts = hooks.receipt_facts(_put(store, b"not dicom at all " * 64), store)
    assert set(facts) == {"dicom.parse_error"}
    assert "InvalidDicomError" in facts["dicom.parse_error"]
    assert factory.node.audit.events(event="fidelity.result")[-1].outcome == "failure"
    (bad,) = hooks.studies.unparsed("case-3")
    assert bad.parse_error == facts["dicom.parse_error"]
    assert hooks.studies.list_studies("case-3") == []
    # Other media types are not parsed.
    other = _put(store, b"solid cube\nendsolid\n")
    other = Announce(other.object_id, other.size, "part.stl", "model/stl", "case-3")
    assert hooks.receipt_facts(other, store) == {}
    # Truncated instances (pydicom reads them silently) are refused just the same.
    data = deid_series(1)[0]
    header_end = data.rfind(b"\xe0\x7f\x10\x00")  # just before Pixel Data
    assert header_end > 0
    for cut, why in ((len(data) - 10, "truncated"), (header_end, "without pixel data")):
        facts = hooks.receipt_facts(_put(store, data[:cut]), store)
        assert set(facts) == {"dicom.parse_error"} and why in facts["dicom.parse_error"]
    assert set(hooks.receipt_facts(_put(store, data), store)) == {
        "dicom.sop_instance_uid",
        "dicom.pixel_sha256",
        "dicom.geometry_sha256",
        "dicom.study_uid",
        "dicom.series_uid",
    }
