"""Whole console scenarios in real Chromium, one person at a time, a screenshot a step.

- An engineer uploads an STL in the factory console, signs the design output naming it
  in the record form with their key file; the clinician reviews it in 3D at the
  hospital and signs the approval.
- A clinician rejects a design: without a reason the form refuses it, naming the
  field; with a reason the rejection is signed and the chain carries it.
- An engineer's certificate on a clinician's page of the hospital console: 403, the
  refusal on the page, no Studies in the navigation.
- The officer reconciles with the peer from the browser.

Two real nodes (hospital and factory, built by the composition root, consoles on), a
real study released for each case (:meth:`tests.test_cases.Env.release`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trimesh

from gateway.pki import IssuedCert
from tests.browser import Person
from tests.cluster import wait_for
from tests.test_cases import FACTORY, HOSPITAL, Env, advance
from tests.test_console_cases import console_pair

UPLOADED = "SC-UPLOAD-1"  # at design_output: the engineer uploads and signs in the console
REJECTED = "SC-REJECT-1"  # at design_confirmation: the clinician rejects the design
PEOPLE = {
    "clinician": ("sc-dr-li", "clinician", HOSPITAL),
    "engineer": ("sc-erin", "engineer", FACTORY),
    "officer": ("sc-oscar", "officer", HOSPITAL),
    "hospital-engineer": ("sc-hugo", "engineer", HOSPITAL),
}
REFUSED_PAGE = "Failed to load resource: the server responded with a status of {}"
"""What Chromium logs as a console error for a page answered with an error status (the
refusals these scenarios expect; every other console error fails the scenario)."""
REASON = "the stem plate is 2 mm too prominent over the ulnar side"


class ScenarioEnv(Env):
    def person(self, who: str) -> IssuedCert:
        return self.fed.person(*PEOPLE[who])

    def browse(self, who: str, shots: Path) -> Person:
        """``who`` in Chromium at their own node's console (the factory's for the
        factory engineer, the hospital's for everyone else)."""
        node = self.factory if who == "engineer" else self.hospital
        return Person(self.browser, node.node.console_port, self.person(who), shots)

    browser: Any = None


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[ScenarioEnv]:
    with console_pair(tmp_path_factory.mktemp("console-scenarios"), ScenarioEnv) as e:
        e.browser = browser
        advance(e, UPLOADED, "design_output")
        advance(e, REJECTED, "design_confirmation")
        yield e


def _review_design(person: Person, case_id: str, triangles: str = "") -> None:
    """From the case page, "Review in 3D" until the viewer has drawn the mesh."""
    page = person.page
    person.open(f"/cases/{case_id}")
    assert "It is your turn" in page.inner_text("main")
    page.click("a.design-link")
    page.wait_for_selector(".mesh-viewer[data-mesh-viewer-state=ready] canvas", timeout=20000)
    facts = page.inner_text("#mesh-facts")
    assert "Number of triangles" in facts, facts
    if triangles:
        shown = page.locator("#mesh-facts dt:text-is('Number of triangles') + dd").inner_text()
        assert shown == triangles, facts


def _sign_in_browser(person: Person, case_id: str, key: Path, shot: str) -> None:
    """On the sign page: pick the key file, sign, back at the case page."""
    page = person.page
    page.wait_for_selector("#case-sign")
    assert "Your private key stays in this browser" in page.inner_text("#case-sign")
    page.set_input_files("#key-file", str(key))
    person.shot(shot)
    page.click("#sign-button")
    page.wait_for_url(f"**/cases/{case_id}?signed=1", timeout=20000)
    assert "appended to the chain" in page.inner_text("#signed")


def test_engineer_uploads_an_stl_and_the_clinician_approves_it_in_3d(
    env: ScenarioEnv, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=12.0)
    stl = tmp_path / "radius-implant-v1.stl"
    stl.write_bytes(bytes(mesh.export(file_type="stl")))
    triangles = str(len(mesh.faces))  # 320
    object_id = hashlib.sha256(stl.read_bytes()).hexdigest()

    engineer = env.browse("engineer", shots)
    try:
        page = engineer.page
        engineer.open(f"/factory/cases/{UPLOADED}/designs")
        assert HOSPITAL in page.inner_text("main")  # where the design will go
        engineer.shot("scenario-engineer-upload-form")
        page.set_input_files('input[name="file"]', str(stl))
        page.select_option('select[name="format"]', "model/stl")
        page.click("form.filters button")
        page.wait_for_selector("#upload-ok")
        done = page.inner_text("#upload-ok")
        assert object_id in done and "radius-implant-v1.stl" in done and HOSPITAL in done
        facts = page.inner_text("#mesh-facts")
        assert "Triangles" in facts and triangles in facts and "Watertight" in facts, facts
        engineer.shot("scenario-engineer-uploaded")
        queued = env.factory.node.catalog.list_transfers(object_id=object_id, direction="outbound")
        assert [t.peer_node for t in queued] == [HOSPITAL]
        assert queued[0].transfer_id in done
        catalog = env.hospital.node.catalog
        wait_for(lambda: catalog.find_object(object_id), 30, what="the design at the hospital")

        # the design output naming the uploaded file, through the record form
        engineer.open(f"/cases/{UPLOADED}/records/new?type=design_output")
        assert "the design output" in page.inner_text("main")
        files = [{"object_id": object_id, "name": stl.name, "kind": "model"}]
        page.fill("#f-files", json.dumps(files))
        page.fill("#f-parameters", json.dumps({"resection_length_mm": 62.0, "porosity": 0.65}))
        page.fill(
            "#f-safety_features",
            json.dumps([{"feature": "stem-plate junction", "requirement": "fillet >= 2 mm"}]),
        )
        engineer.shot("scenario-engineer-design-output-form")
        page.click("#record-form button")
        preview = page.inner_text("#record-preview")
        assert object_id in preview and "(design_output)" in preview, preview
        _sign_in_browser(
            engineer, UPLOADED, env.person("engineer").key_path, "scenario-engineer-sign"
        )
        row = page.locator("#records tr[data-type=design_output]")
        assert f"engineer:{PEOPLE['engineer'][0]}@{FACTORY}" in row.inner_text()
        engineer.shot("scenario-engineer-design-output-signed")
        assert engineer.errors == []
    finally:
        engineer.close()
    env.synced(UPLOADED)

    clinician = env.browse("clinician", shots)
    try:
        page = clinician.page
        _review_design(clinician, UPLOADED, triangles)
        assert object_id in page.inner_text("#mesh-facts")
        clinician.shot("scenario-clinician-review-uploaded")
        page.click("#approve")
        assert '"decision": "confirmed"' in page.inner_text("#record-preview")
        _sign_in_browser(
            clinician, UPLOADED, env.person("clinician").key_path, "scenario-clinician-sign"
        )
        row = page.locator("#records tr[data-type=design_confirmation]")
        assert f"clinician:{PEOPLE['clinician'][0]}@{HOSPITAL}" in row.inner_text()
        clinician.shot("scenario-clinician-approved")
        assert clinician.errors == []
    finally:
        clinician.close()

    view = env.hospital.cases.view(UPLOADED)
    assert view.ok
    output, confirmation = view.records[-2], view.records[-1]
    assert output.type == "design_output" and output.author.startswith("engineer:sc-erin@")
    assert json.loads(output.record_json)["data"]["files"] == files
    assert confirmation.type == "design_confirmation" and confirmation.ok
    data = json.loads(confirmation.record_json)["data"]
    assert data == {"side": "clinical", "decision": "confirmed",
                    "design_hash": output.record_hash}  # fmt: skip


def test_clinician_rejects_a_design_only_with_a_reason(env: ScenarioEnv, tmp_path: Path) -> None:
    clinician = env.browse("clinician", tmp_path / "screenshots")
    try:
        page = clinician.page
        _review_design(clinician, REJECTED)
        page.click("#reject")  # no reason given
        page.wait_for_selector("#form-errors")
        assert "1 field(s) to correct" in page.inner_text("#form-errors")
        refused = page.inner_text('.field-error[data-field="reason"]')
        assert refused == "data.reason is required when data.decision is 'rejected'", refused
        assert page.locator("#case-sign").count() == 0  # not at the signing step
        clinician.shot("scenario-clinician-reject-without-reason")
        assert page.input_value("#f-decision") == "rejected"  # the form is kept
        assert clinician.errors == [REFUSED_PAGE.format("400 (Bad Request)")]
        clinician.errors.clear()

        page.fill("#f-reason", REASON)
        page.click("#record-form button")
        preview = page.inner_text("#record-preview")
        assert '"decision": "rejected"' in preview and REASON in preview, preview
        _sign_in_browser(
            clinician, REJECTED, env.person("clinician").key_path, "scenario-clinician-reject-sign"
        )
        row = page.locator("#records tr[data-type=design_confirmation]")
        assert f"clinician:{PEOPLE['clinician'][0]}@{HOSPITAL}" in row.inner_text()
        clinician.shot("scenario-clinician-rejected")
        assert clinician.errors == []
    finally:
        clinician.close()
    view = env.hospital.cases.view(REJECTED)
    record = view.records[-1]
    assert view.ok and record.type == "design_confirmation" and record.ok
    data = json.loads(record.record_json)["data"]
    assert (data["side"], data["decision"], data["reason"]) == ("clinical", "rejected", REASON)
    assert view.stage == "design_output"  # back to the engineer


def test_engineer_certificate_is_refused_on_the_clinicians_pages(
    env: ScenarioEnv, tmp_path: Path
) -> None:
    study = env.release(UPLOADED).original  # a study held at the hospital
    person = env.browse("hospital-engineer", tmp_path / "screenshots")
    try:
        page = person.page
        for path in ("/studies", f"/studies/{study}"):
            answer = person.open(path)
            assert answer.status == 403, path
            refusal = page.inner_text("#refusal")
            assert "acts as 'engineer'; allowed: clinician, officer" in refusal, refusal
            person.shot("scenario-engineer-refused" + ("-study" if "." in path else ""))
            assert person.errors == [REFUSED_PAGE.format("403 (Forbidden)")], person.errors
            person.errors.clear()
        assert person.open("/").status == 200
        links = page.locator("nav a").all_inner_texts()
        assert links and "Studies" not in links, links
        assert page.locator('nav a[href="/studies"]').count() == 0
        person.shot("scenario-engineer-home")
        assert person.errors == []
    finally:
        person.close()


def test_officer_reconciles_with_the_factory_in_the_browser(
    env: ScenarioEnv, tmp_path: Path
) -> None:
    officer = env.browse("officer", tmp_path / "screenshots")
    try:
        page = officer.page
        officer.open("/reconcile")
        officer.shot("scenario-officer-reconcile")
        page.click("#reconcile-run")
        peer = page.locator(f"section.peer[data-peer={FACTORY}]")
        peer.wait_for()
        text = peer.inner_text()
        assert f"{HOSPITAL} ↔ {FACTORY}: records agree" in text, text
        line = f"{HOSPITAL} <-> {FACTORY}: "
        assert line + "audit log matches" in text or line + f"{FACTORY} has witnessed" in text
        assert "INCOMPLETE" not in text and "FAILED" not in text, text
        officer.shot("scenario-officer-reconciled")
        assert officer.errors == []
    finally:
        officer.close()
