"""The console in a real browser: Debian's Chromium via Playwright for Python, each
person with their own client certificate. Assertions are on what the page shows."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import pki
from tests.browser import Person
from tests.cluster import Federation, InProcessNode
from tests.console_client import console_node, tamper_audit_entry
from tests.test_security import CRL_RELOAD_WAIT


@pytest.fixture()
def factory(federation: Federation, tmp_path: Path) -> Iterator[InProcessNode]:
    with console_node(federation, tmp_path, "factory-1", "factory") as node:
        yield node


@pytest.fixture()
def open_as(
    browser: Any, factory: InProcessNode, federation: Federation, tmp_path: Path
) -> Iterator[Callable[[str, str], Person]]:
    """A browser context for a person of factory-1 (closed after the test)."""
    opened: list[Person] = []

    def open_as(person_id: str, role: str) -> Person:
        who = federation.person(person_id, role, "factory-1")
        opened.append(Person(browser, factory.node.console_port, who, tmp_path / "screenshots"))
        return opened[-1]

    yield open_as
    for person in opened:
        person.close()


def test_officer_verifies_the_chain_and_sees_a_tampered_log_reported(
    open_as: Callable[[str, str], Person], factory: InProcessNode, federation: Federation
) -> None:
    officer = open_as("ofc", "officer")
    officer.open("/audit")
    assert officer.page.title() == "Audit log · yigong console"
    assert officer.page.locator("#audit tr[data-seq]").count() >= 2
    officer.page.click("#verify-chain")
    verdict = officer.page.locator("#verify-verdict")
    verdict.wait_for()
    assert verdict.get_attribute("data-ok") == "1"
    assert verdict.inner_text().startswith("Chain verified:")
    officer.shot("officer-audit-verified")
    tamper_audit_entry(factory.node.cfg.audit.path, 2, "nobody")
    officer.page.click("#verify-chain")
    officer.page.wait_for_selector('#verify-verdict[data-ok="0"]')
    text = officer.page.inner_text("#verify-verdict")
    assert text.startswith("Chain FAILED at entry 2:"), text
    officer.shot("officer-audit-tampered")
    assert officer.errors == []  # no script error, no CSP violation


def test_live_tail_shows_new_entries_without_reload(
    open_as: Callable[[str, str], Person], factory: InProcessNode, federation: Federation
) -> None:
    officer = open_as("ofc", "officer")
    officer.open("/audit")
    before = officer.page.locator("#audit tr[data-seq]").count()
    factory.node.audit.record("security.alert", actor="node:factory-1",
                              details={"what": "browser-tail-test"})  # fmt: skip
    officer.page.wait_for_selector("td.details:has-text('browser-tail-test')", timeout=10_000)
    assert officer.page.locator("#audit tr[data-seq]").count() == before + 1
    assert officer.page.locator("tr.alert:has-text('browser-tail-test')").count() == 1
    assert officer.errors == []


def test_engineer_gets_403_on_an_officer_page(
    open_as: Callable[[str, str], Person], factory: InProcessNode, federation: Federation
) -> None:
    engineer = open_as("ed", "engineer")
    response = engineer.open("/audit")
    assert response is not None and response.status == 403
    assert "allowed: officer" in engineer.page.inner_text("#refusal")
    engineer.shot("engineer-refused")


def test_revoked_certificate_is_refused_in_the_browser(
    open_as: Callable[[str, str], Person], factory: InProcessNode, federation: Federation
) -> None:
    officer = open_as("rhea", "officer")
    who = federation.person("rhea", "officer", "factory-1")
    assert officer.open("/transfers").status == 200
    pki.revoke(federation.ca_dir, who.serial, "key_compromise")
    time.sleep(CRL_RELOAD_WAIT)
    response = officer.open("/transfers")
    assert response is not None and response.status == 401
    assert "was revoked" in officer.page.inner_text("#refusal")
    officer.shot("revoked-refused")


def test_a_request_without_csrf_token_is_refused(
    open_as: Callable[[str, str], Person], factory: InProcessNode, federation: Federation
) -> None:
    officer = open_as("ofc", "officer")
    officer.open("/audit")
    # A form posted by the page itself, its token removed (what a forged page sends).
    officer.page.evaluate("document.querySelector('input[name=_csrf]').remove()")
    officer.page.evaluate("document.querySelector('#verify-chain').closest('form').submit()")
    officer.page.wait_for_selector("#refusal")
    assert "carries no valid CSRF token" in officer.page.inner_text("#refusal")
    officer.shot("csrf-refused")


def test_a_person_signs_in_with_the_pkcs12_issue_person_wrote(
    browser: Any, factory: InProcessNode, federation: Federation, tmp_path: Path
) -> None:
    who = federation.person("p12-olga", "officer", "factory-1")
    p12, password_file = pki.write_person_pkcs12(who)
    assert password_file is not None
    officer = Person(
        browser,
        factory.node.console_port,
        who,
        tmp_path / "screenshots",
        pkcs12=(p12, password_file.read_text().strip()),
    )
    try:
        response = officer.open("/audit")
        assert response is not None and response.status == 200
        assert officer.page.inner_text("header .me").startswith("p12-olga")
    finally:
        officer.close()
