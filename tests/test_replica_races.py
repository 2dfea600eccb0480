"""Two replicas racing on one PostgreSQL catalog (issue #13): the steps that read and then
write stay correct because their writes are conditional or serialised.

* the quiet period: two hospital replicas tick at once — each quiet study is marked
  ``received`` (and its report stored) by exactly one of them;
* the case stage gate: two replicas append a record at the same position of one case at
  once — exactly one is stored, the other is refused ("not the next"), the chain has no
  fork;
* the confirmation: two replicas record a confirmation of one study for one case and
  destination at once — exactly one is stored.

Each replica is its own ``Catalog`` (its own connections), as each ``yigong serve`` has.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.cases.store import CaseRow, CaseStore
from gateway.catalog import Catalog, iso_utc
from gateway.errors import CatalogError
from gateway.fidelity.series import SliceGeometry
from hospital_node.release_store import Confirmation, ReleaseStore
from hospital_node.studies import InstanceRecord, StudyCatalog
from tests.test_db_contract import _verified

STUDIES = 20


def _race(*calls: Callable[[], Any]) -> list[Any]:
    """Run ``calls`` at the same moment in threads; their results or exceptions."""
    start = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait()
        try:
            out[i] = calls[i]()
        except Exception as exc:  # the refusal is the result under test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _instance(study: int, i: int, at: datetime) -> tuple[InstanceRecord, SliceGeometry]:
    sop, series = f"1.2.3.{study}.{i}", f"1.2.4.{study}"
    rec = InstanceRecord(
        sop_instance_uid=sop, study_uid=f"1.2.5.{study}", series_uid=series,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
        modality="CT", object_id=f"{study:032x}{i:032x}", size=1000, calling_ae="PACS",
        called_ae="YIGONG", received_at=iso_utc(at), instance_number=i + 1,
        geometry_sha256="0" * 64, pixel_sha256="1" * 64, burned_in="NO", duplicate=False,
    )  # fmt: skip
    geometry = SliceGeometry(
        sop_instance_uid=sop, series_uid=series, position=(0.0, 0.0, float(i)),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), pixel_spacing=(0.5, 0.5),
        slice_thickness=1.0, rows=64, columns=64, gantry_tilt=0.0, instance_number=i + 1,
    )  # fmt: skip
    return rec, geometry


def test_two_replicas_ticking_mark_each_quiet_study_once(pg_url: str, tmp_path: Path) -> None:
    a, b = (Catalog.open(pg_url, tmp_path / "unused") for _ in range(2))
    try:
        studies_a, studies_b = StudyCatalog(a), StudyCatalog(b)
        long_ago = datetime.now(UTC) - timedelta(minutes=5)
        for n in range(STUDIES):
            for i in range(3):
                studies_a.add_instance(*_instance(n, i, long_ago))
        now = datetime.now(UTC)
        got_a, got_b = _race(lambda: studies_a.tick(now, 30), lambda: studies_b.tick(now, 30))
        assert not set(got_a) & set(got_b)  # nobody marked a study the other marked
        assert sorted(got_a + got_b) == sorted(f"1.2.5.{n}" for n in range(STUDIES))
        assert {s.status for s in studies_b.list_studies(limit=100)} == {"received"}
    finally:
        a.close()
        b.close()


def test_two_replicas_appending_at_one_position_leave_one_chain(
    pg_url: str, tmp_path: Path
) -> None:
    a, b = (Catalog.open(pg_url, tmp_path / "unused") for _ in range(2))
    try:
        store_a, store_b = CaseStore(a), CaseStore(b)
        store_a.add_case(CaseRow("CASE-R", "hospital-1", "factory-1", "2026-01-01T00:00:00Z", "dr"))
        store_a.append(_verified("CASE-R", 0, "h0", b"e0" * 30), "local", [])
        for seq in range(1, 6):  # five rounds: two different records race for each seq
            rec_a = _verified("CASE-R", seq, f"a{seq}", b"a" * 40)
            rec_b = _verified("CASE-R", seq, f"b{seq}", b"b" * 40)
            one, two = _race(
                lambda r=rec_a: store_a.append(r, "local", []),
                lambda r=rec_b: store_b.append(r, "local", []),
            )
            refused = [r for r in (one, two) if isinstance(r, CatalogError)]
            assert len(refused) == 1 and "is not the next" in str(refused[0]), (one, two)
        records = store_b.records("CASE-R")
        assert [r.seq for r in records] == list(range(6))  # one record per position
    finally:
        a.close()
        b.close()


def test_two_replicas_confirming_one_study_store_one_confirmation(
    pg_url: str, tmp_path: Path
) -> None:
    a, b = (Catalog.open(pg_url, tmp_path / "unused") for _ in range(2))
    try:
        store_a, store_b = ReleaseStore(a), ReleaseStore(b)

        def confirmation(cid: str) -> Confirmation:
            return Confirmation(
                confirmation_id=cid, study_uid="1.2.5.1", case_id="C-1", destination="factory-1",
                actor="clinician:dr@hospital-1", cert_serial="1", cert_fingerprint="f" * 64,
                auto=False, allow_burned_in=False, record="{}", signature=b"s",
                created_at="2026-01-01T00:00:00Z",
            )  # fmt: skip

        one, two = _race(
            lambda: store_a.add(confirmation("ca"), [], releasing=True),
            lambda: store_b.add(confirmation("cb"), [], releasing=True),
        )
        errors = [r for r in (one, two) if isinstance(r, CatalogError)]
        assert len(errors) == 1, (one, two)
        assert len(store_b.confirmations("1.2.5.1")) == 1
    finally:
        a.close()
        b.close()
