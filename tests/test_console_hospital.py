"""The hospital's console pages over real TLS: received studies, the study page and the
clinician's confirmation.

A real hospital node (and the factory it sends to) in process, the console on its own
HTTPS port; browsers are Python ``ssl`` + ``http.client`` with a person certificate
each. The study enters through the hospital's DICOM SCP (pynetdicom C-STORE) and
becomes 'received' after a short quiet period.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.cluster import Federation, InProcessNode, wait_for, write_config
from tests.console_client import enable_console, fetch
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME
from tests.test_hospital_release import push, role, series

CASE = "CASE-2024-0101"
N = 3


@dataclass
class Console:
    federation: Federation
    hospital: InProcessNode
    factory: InProcessNode
    study_uid: str

    def request(
        self, who: str, role_name: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, str]:
        person = self.federation.person(who, role_name, "hospital-1")
        port = self.hospital.node.console_port
        if form is None:
            status, _, body = fetch(port, self.federation.ca, person, path)
        else:
            kind = {"content-type": "application/x-www-form-urlencoded"}
            status, _, body = fetch(
                port, self.federation.ca, person, path, "POST", urlencode(form), kind
            )
        return status, body.decode()


def refusal(body: str) -> str:
    m = re.search(r'id="refusal"[^>]*>([^<]*)<', body)
    return html.unescape(m.group(1)) if m else ""


def csrf_of(body: str) -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', body)
    assert m
    return m.group(1)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp: Path = tmp_path_factory.mktemp("console-hospital")
    federation = Federation(tmp / "federation")
    factory = InProcessNode(write_config(federation, tmp, "factory-1", "factory"))
    cfg = write_config(
        federation,
        tmp,
        "hospital-1",
        "hospital",
        peers={"factory-1": factory.address},
        dicom={"quiet_period_seconds": 0.3},
    )
    enable_console(cfg)
    hospital = InProcessNode(cfg)
    try:
        datasets = series(N)
        uid = str(datasets[0].StudyInstanceUID)
        push(hospital, datasets)
        wait_for(
            lambda: role(hospital).studies.get_study(uid).status == "received",
            30,
            what="study received after the quiet period",
        )
        yield Console(federation, hospital, factory, uid)
    finally:
        hospital.stop()
        factory.stop()


def test_clinician_sees_the_study_and_whom_it_is_of(console: Console) -> None:
    status, body = console.request("dr-web", "clinician", "/studies")
    assert status == 200, refusal(body)
    assert console.study_uid in body and f'href="/studies/{console.study_uid}"' in body
    assert PATIENT_NAME in html.unescape(body) and PATIENT_ID in body
    assert "received" in body and ">Studies</a>" in body
    # The status filter: a received study is not among the receiving ones.
    status, body = console.request("dr-web", "clinician", "/studies?status=receiving")
    assert status == 200 and console.study_uid not in body
    status, body = console.request("dr-web", "clinician", "/studies?status=nonsense")
    assert status == 400 and "status must be" in refusal(body)


def test_officer_sees_the_row_but_not_the_patient(console: Console) -> None:
    status, body = console.request("olga-web", "officer", "/studies")
    assert status == 200, refusal(body)
    assert console.study_uid in body
    assert PATIENT_NAME not in html.unescape(body) and PATIENT_ID not in body
    assert "clinicians only" in body
    status, body = console.request("olga-web", "officer", f"/studies/{console.study_uid}")
    assert status == 200 and PATIENT_NAME not in html.unescape(body)
    assert 'id="confirm-form"' not in body  # officers do not confirm


def test_engineer_is_refused(console: Console) -> None:
    status, body = console.request("ed-web", "engineer", "/studies")
    assert status == 403
    text = refusal(body)
    assert "not allowed to call /console/hospital.studies" in text
    assert "allowed: clinician, officer" in text
    assert console.study_uid not in body


def test_study_page_shows_the_series_report(console: Console) -> None:
    status, body = console.request("dr-web", "clinician", f"/studies/{console.study_uid}")
    assert status == 200, refusal(body)
    assert PATIENT_NAME in html.unescape(body)
    rows = re.findall(r'<tr class="series" data-series="([^"]+)">(.*?)</tr>', body, re.S)
    assert len(rows) == 1
    assert re.search(rf'class="instances">{N}<', rows[0][1])
    assert re.search(rf'class="expected">{N}<', rows[0][1])
    assert "CT" in rows[0][1] and "none" in rows[0][1]  # modality; no gaps
    assert f'<div id="previews" data-study="{console.study_uid}" hx-get=' in body
    assert 'id="not-confirmed"' in body and 'id="confirm-form"' in body
    last8 = console.study_uid[-8:]
    assert f'data-confirm-text="{last8}"' in body and 'data-confirm-button="confirm-button"' in body
    assert '<option value="factory-1">' in body and 'id="nothing-held"' in body
    assert "style=" not in body and "<script>" not in body


def test_confirm_checks_csrf_typed_text_then_confirms(console: Console) -> None:
    uid = console.study_uid
    path = f"/studies/{uid}/confirm"
    good = {"case_id": CASE, "destination": "factory-1", "typed": uid[-8:]}
    status, body = console.request("dr-web", "clinician", path, good)
    assert status == 403 and "CSRF" in refusal(body)

    _, page = console.request("dr-web", "clinician", f"/studies/{uid}")
    token = csrf_of(page)
    status, body = console.request(
        "dr-web", "clinician", path, {**good, "typed": "CONFIRMX", "_csrf": token}
    )
    assert status in (400, 409)
    assert "type the study UID's last 8 characters" in refusal(body)
    assert uid[-8:] in refusal(body)
    releases = role(console.hospital).release_records
    assert releases.confirmations(uid) == []  # nothing confirmed, nothing sent

    # An officer cannot confirm even with a valid token of their own.
    _, officer_page = console.request("olga-web", "officer", f"/studies/{uid}")
    status, body = console.request(
        "olga-web", "officer", path, {**good, "_csrf": csrf_of(officer_page)}
    )
    assert status == 403 and releases.confirmations(uid) == []

    status, body = console.request("dr-web", "clinician", path, {**good, "_csrf": token})
    assert status == 200, refusal(body)
    assert re.search(r'id="case-id">' + CASE + "<", body)
    assert re.search(rf'id="released" class="ok">{N}<', body)
    assert re.search(r'id="held" class="">0<', body)

    # The domain: one confirmation by this clinician, every instance released and queued.
    (c,) = releases.confirmations(uid)
    assert (c.case_id, c.destination, c.actor) == (CASE, "factory-1", "clinician:dr-web@hospital-1")
    rows = releases.releases(c.confirmation_id)
    assert [r.status for r in rows] == ["released"] * N and all(r.transfer_id for r in rows)
    outbound = console.hospital.node.catalog.list_transfers(direction="outbound")
    assert {t.transfer_id for t in outbound} >= {r.transfer_id for r in rows}
    events = console.hospital.node.audit.events(event="case.confirmation")
    assert [(e.actor, e.case_id, e.peer, e.outcome) for e in events] == [
        ("clinician:dr-web@hospital-1", CASE, "factory-1", "success")
    ]

    # The study page now shows the confirmation; the same again is refused (409).
    _, page = console.request("dr-web", "clinician", f"/studies/{uid}")
    assert 'id="confirmations"' in page and CASE in page and f"{N} released" in page
    status, body = console.request("dr-web", "clinician", path, {**good, "_csrf": token})
    assert status in (400, 409) and "already confirmed" in refusal(body)


def test_studies_page_after_a_cursor(console: Console) -> None:
    newer = series(1, patient_name="ROE^RICHARD", patient_id="MRN0099881")
    new_uid = str(newer[0].StudyInstanceUID)
    push(console.hospital, newer)
    studies = role(console.hospital).studies
    wait_for(lambda: studies.get_study(new_uid).status == "received", 30, what="received")
    (first,) = studies.list_studies(limit=1)
    assert first.study_uid == new_uid
    (second,) = studies.list_studies(limit=1, before=(first.last_received_at, first.study_uid))
    assert second.study_uid == console.study_uid
    query = urlencode({"before": first.last_received_at, "before_uid": first.study_uid})
    status, body = console.request("dr-web", "clinician", f"/studies?{query}")
    assert status == 200 and console.study_uid in body and new_uid not in body
