"""The console's case pages over real TLS and in real Chromium.

The list, the verified chain, a record form with inline validation, a record signed by
the person (the same bytes the prepare page gave, signature r||s as WebCrypto makes
it), and the clinician's 3D design review signed in the browser with their own key file.

Two real nodes (hospital and factory, built by the composition root, consoles on), a
real study released for each case (:meth:`tests.test_cases.Env.release`).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from gateway.pki import IssuedCert, load_private_key
from tests.browser import Person
from tests.cluster import Federation, write_config
from tests.console_client import Answer, ConsoleClient, enable_console
from tests.test_cases import (
    FACTORY,
    HOSPITAL,
    CaseNode,
    Env,
    _point,
    _start,
    advance,
    order,
)

ORDERED = "CC-ORDER-1"  # at stage order: the clinician signs the order through the form
DESIGN = "CC-DESIGN-1"  # at stage design_confirmation: the clinician reviews the design
PEOPLE = {
    "clinician": ("cc-dr-li", "clinician", HOSPITAL),
    "clinician2": ("cc-dr-wang", "clinician", HOSPITAL),
    "engineer": ("cc-erin", "engineer", FACTORY),
    "officer": ("cc-oscar", "officer", HOSPITAL),
}


class ConsoleEnv(Env):
    def person(self, who: str) -> IssuedCert:
        return self.fed.person(*PEOPLE[who])

    def client(self, who: str) -> ConsoleClient:
        node = self.factory if who == "engineer" else self.hospital
        return ConsoleClient(node.node.console_port, self.fed.ca, self.person(who))


E = TypeVar("E", bound=Env)


@contextmanager
def console_pair(
    tmp: Path, make: Callable[[Federation, CaseNode, CaseNode, Path], E]
) -> Iterator[E]:
    """A hospital and a factory that know each other, both with their console on."""
    fed = Federation(tmp / "federation")
    unset = "127.0.0.1:9"
    configs = []
    for node_id, role, peer in ((HOSPITAL, "hospital", FACTORY), (FACTORY, "factory", HOSPITAL)):
        cfg = write_config(fed, tmp, node_id, role, peers={peer: unset})
        enable_console(cfg)
        configs.append(cfg)
    hospital = _start(configs[0])
    factory = _start(configs[1])
    _point(hospital.node, FACTORY, factory.address)
    _point(factory.node, HOSPITAL, hospital.address)
    try:
        yield make(fed, hospital, factory, tmp)
    finally:
        hospital.stop()
        factory.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleEnv]:
    with console_pair(tmp_path_factory.mktemp("console-cases"), ConsoleEnv) as e:
        advance(e, ORDERED, "order")
        advance(e, DESIGN, "design_confirmation")
        yield e


def flat(data: dict[str, Any], prefix: str = "data") -> dict[str, str]:
    """A record's data as the form posts it (nested objects as ``data.a.b``)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}.{key}"))
        elif isinstance(value, list):
            out[f"{prefix}.{key}"] = "\n".join(map(str, value))
        else:
            out[f"{prefix}.{key}"] = str(value)
    return out


def text(answer: Answer) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", answer.body))


def prepared_bytes(answer: Answer) -> bytes:
    found = re.search(r'id="case-sign" data-record="([^"]+)"', answer.body)
    assert found, answer.body[-2000:]
    return base64.b64decode(found.group(1))


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """What WebCrypto gives: 64 bytes r||s, base64."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()


def test_list_and_case_pages_for_each_role(env: ConsoleEnv) -> None:
    with env.client("clinician") as c:
        page = c.get("/cases")
        assert page.status == 200, page.body
        rows = text(page)
        assert ORDERED in rows and DESIGN in rows
        assert f"{HOSPITAL} → {FACTORY}" in rows
        assert 'class="case mine" data-case="CC-ORDER-1"' in page.body  # the clinician's turn
        case = c.get(f"/cases/{DESIGN}")
        assert case.status == 200
        body = text(case)
        assert "design_confirmation" in case.body and "It is your turn" in body
        assert "§5.3.3 the design output" in body and "verified: 4 records" in body
        assert f"/cases/{DESIGN}/designs/" in case.body  # the design review link
        assert "records/new?type=design_confirmation" in case.body
    with env.client("engineer") as c:
        page = c.get("/cases")
        assert page.status == 200 and DESIGN in page.body
        case = c.get(f"/cases/{DESIGN}")
        assert "It is your turn" in text(case)  # the production side is open too
        assert "engineer:cc-erin@factory-1" in text(case)
        assert c.get(f"/cases/{ORDERED}").body.count("It is your turn") == 0
    with env.client("officer") as c:
        case = c.get(f"/cases/{DESIGN}")
        assert case.status == 200 and "records/new" not in case.body  # officers do not sign
        assert c.get(f"/cases/{DESIGN}/records/new").status == 403


def test_order_form_validates_inline_then_the_person_signed_record_is_appended(
    env: ConsoleEnv,
) -> None:
    pseudonym = env.release(ORDERED).pseudonym
    fields = {"type": "order", **flat(order(pseudonym=pseudonym))}
    with env.client("clinician") as c:
        form = c.get(f"/cases/{ORDERED}/records/new?type=order")
        assert form.status == 200 and 'name="data.patient.age"' in form.body
        csrf = form.csrf
        bad = c.post(
            f"/cases/{ORDERED}/records/prepare",
            {**fields, "data.patient.age": "forty", "data.risks": "", "_csrf": csrf},
        )
        assert bad.status == 400
        assert 'data-field="patient.age">data.patient.age must be an integer 0-150' in bad.body
        assert 'data-field="risks">data.risks is required' in bad.body
        assert 'value="forty"' in bad.body  # the form is kept
        assert "Ti6Al4V ELI powder" in bad.body

        assert c.post(f"/cases/{ORDERED}/records/prepare", fields).status == 403  # no _csrf

        ready = c.post(f"/cases/{ORDERED}/records/prepare", {**fields, "_csrf": csrf})
        assert ready.status == 200, text(ready)
        assert "Your private key stays in this browser" in ready.body
        raw = prepared_bytes(ready)
        assert b'"seq":1' in raw and b'"id":"cc-dr-li"' in raw

        other = load_private_key(env.person("clinician2").key_path)
        refused = c.post(
            f"/cases/{ORDERED}/records",
            {"record": base64.b64encode(raw).decode(), "signature": raw_signature(other, raw),
             "_csrf": csrf},
        )  # fmt: skip
        assert refused.status in (400, 409), refused.body
        assert "does not verify against the certificate of clinician:cc-dr-li" in refused.refusal
        assert prepared_bytes(refused) == raw  # the sign step again, to pick the right key
        assert len(env.hospital.cases.view(ORDERED).records) == 1

        own = load_private_key(env.person("clinician").key_path)
        signed = {"record": base64.b64encode(raw).decode(), "signature": raw_signature(own, raw)}
        assert c.post(f"/cases/{ORDERED}/records", signed).status == 403  # no _csrf
        done = c.post(f"/cases/{ORDERED}/records", {**signed, "_csrf": csrf})
        assert done.status == 303 and done.headers["location"] == f"/cases/{ORDERED}?signed=1"
    with env.client("engineer") as c:  # someone else's signed record is not theirs to submit
        csrf = c.get("/cases").csrf
        theirs = c.post(f"/cases/{ORDERED}/records", {**signed, "_csrf": csrf})
        assert theirs.status == 403
        assert "a person submits only records they signed" in theirs.refusal
    view = env.hospital.cases.view(ORDERED)
    assert [r.type for r in view.records] == ["data_confirmation", "order"]
    assert view.ok and view.stage == "design_input_review"
    assert view.records[1].author == "clinician:cc-dr-li@hospital-1"


def test_clinician_reviews_the_design_in_3d_and_signs_the_approval_in_chromium(
    env: ConsoleEnv, browser: Any, tmp_path: Path
) -> None:
    who = env.person("clinician")
    clinician = Person(browser, env.hospital.node.console_port, who, tmp_path / "screenshots")
    try:
        page = clinician.page
        clinician.open(f"/cases/{DESIGN}")
        clinician.shot("case-design-confirmation")
        page.click("a.design-link")
        page.wait_for_selector(".mesh-viewer[data-mesh-viewer-state=ready] canvas", timeout=20000)
        facts = page.inner_text("#mesh-facts")
        assert "triangles" in facts and "4" in facts, facts
        clinician.shot("case-design-review")
        page.click("#approve")
        page.wait_for_selector("#case-sign")
        assert "Your private key stays in this browser" in page.inner_text("#case-sign")
        assert '"decision": "confirmed"' in page.inner_text("#record-preview")
        page.set_input_files("#key-file", str(who.key_path))
        clinician.shot("case-sign")
        page.click("#sign-button")
        page.wait_for_url(f"**/cases/{DESIGN}?signed=1", timeout=20000)
        row = page.locator("#records tr[data-type=design_confirmation]")
        assert "clinician:cc-dr-li@hospital-1" in row.inner_text()
        assert "appended to the chain" in page.inner_text("#signed")
        clinician.shot("case-design-confirmed")
        assert clinician.errors == []
    finally:
        clinician.close()
    view = env.hospital.cases.view(DESIGN)
    record = view.records[-1]
    assert record.type == "design_confirmation" and record.ok
    assert '"side":"clinical"' in record.record_json
