"""The console in a real browser: Debian's Chromium via Playwright for Python, each
person with their own client certificate. Assertions are on what the page shows."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import pki
from tests.browser import Person
from tests.cluster import Federation, InProcessNode, write_config
from tests.console_client import enable_console
from tests.test_security import CRL_RELOAD_WAIT


@pytest.fixture()
def factory(federation: Federation, tmp_path: Path) -> Iterator[InProcessNode]:
    cfg = write_config(federation, tmp_path, "factory-1", "factory")
    enable_console(cfg)
    node = InProcessNode(cfg)
    try:
        yield node
    finally:
        node.stop()


def person(browser: Any, node: InProcessNode, who: pki.IssuedCert, tmp_path: Path) -> Person:
    return Person(browser, node.node.console_port, who, tmp_path / "screenshots")


def _tamper(audit_path: Path, seq: int) -> None:
    db = sqlite3.connect(audit_path)
    try:  # an insider with file access edits an entry (dropping the append-only triggers)
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
            db.execute(f"DROP TRIGGER {name}")
        db.execute("UPDATE events SET actor = 'nobody' WHERE seq = ?", (seq,))
        db.commit()
    finally:
        db.close()


def test_officer_verifies_the_chain_and_sees_a_tampered_log_reported(
    browser: Any,
    factory: InProcessNode,
    federation: Federation,
    tmp_path: Path,
) -> None:
    officer = person(browser, factory, federation.person("ofc", "officer", "factory-1"), tmp_path)
    try:
        officer.open("/audit")
        assert officer.page.title() == "Audit log · yigong console"
        assert officer.page.locator("#audit tr[data-seq]").count() >= 2
        officer.page.click("#verify-chain")
        verdict = officer.page.locator("#verify-verdict")
        verdict.wait_for()
        assert verdict.get_attribute("data-ok") == "1"
        assert verdict.inner_text().startswith("Chain verified:")
        officer.shot("officer-audit-verified")
        _tamper(factory.node.cfg.audit.path, 2)
        officer.page.click("#verify-chain")
        officer.page.wait_for_selector('#verify-verdict[data-ok="0"]')
        text = officer.page.inner_text("#verify-verdict")
        assert text.startswith("Chain FAILED at entry 2:"), text
        officer.shot("officer-audit-tampered")
        assert officer.errors == []  # no script error, no CSP violation
    finally:
        officer.close()


def test_live_tail_shows_new_entries_without_reload(
    browser: Any,
    factory: InProcessNode,
    federation: Federation,
    tmp_path: Path,
) -> None:
    officer = person(browser, factory, federation.person("ofc", "officer", "factory-1"), tmp_path)
    try:
        officer.open("/audit")
        before = officer.page.locator("#audit tr[data-seq]").count()
        factory.node.audit.record("security.alert", actor="node:factory-1",
                                  details={"what": "browser-tail-test"})  # fmt: skip
        officer.page.wait_for_selector("td.details:has-text('browser-tail-test')", timeout=10_000)
        assert officer.page.locator("#audit tr[data-seq]").count() == before + 1
        assert officer.page.locator("tr.alert:has-text('browser-tail-test')").count() == 1
        assert officer.errors == []
    finally:
        officer.close()


def test_engineer_gets_403_on_an_officer_page(
    browser: Any,
    factory: InProcessNode,
    federation: Federation,
    tmp_path: Path,
) -> None:
    engineer = person(browser, factory, federation.person("ed", "engineer", "factory-1"), tmp_path)
    try:
        response = engineer.open("/audit")
        assert response is not None and response.status == 403
        assert "allowed: officer" in engineer.page.inner_text("#refusal")
        engineer.shot("engineer-refused")
    finally:
        engineer.close()


def test_revoked_certificate_is_refused_in_the_browser(
    browser: Any,
    factory: InProcessNode,
    federation: Federation,
    tmp_path: Path,
) -> None:
    who = federation.person("rhea", "officer", "factory-1")
    officer = person(browser, factory, who, tmp_path)
    try:
        assert officer.open("/transfers").status == 200
        pki.revoke(federation.ca_dir, who.serial, "key_compromise")
        time.sleep(CRL_RELOAD_WAIT)
        response = officer.open("/transfers")
        assert response is not None and response.status == 401
        assert "was revoked" in officer.page.inner_text("#refusal")
        officer.shot("revoked-refused")
    finally:
        officer.close()


def test_a_request_without_csrf_token_is_refused(
    browser: Any,
    factory: InProcessNode,
    federation: Federation,
    tmp_path: Path,
) -> None:
    officer = person(browser, factory, federation.person("ofc", "officer", "factory-1"), tmp_path)
    try:
        officer.open("/audit")
        # A form posted by the page itself, its token removed (what a forged page sends).
        officer.page.evaluate("document.querySelector('input[name=_csrf]').remove()")
        officer.page.evaluate("document.querySelector('#verify-chain').closest('form').submit()")
        officer.page.wait_for_selector("#refusal")
        assert "carries no valid CSRF token" in officer.page.inner_text("#refusal")
        officer.shot("csrf-refused")
    finally:
        officer.close()
