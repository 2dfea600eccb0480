"""The web console's edge over real TLS: browser client certificates, the one gate and
authorization table, CSRF, security headers; the officer's pages (transfers, audit log,
chain verification with a tampered log, live tail)."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import pki
from gateway.audit import read_events
from gateway.web.app import CSP
from tests.cluster import Federation, InProcessNode
from tests.console_client import ConsoleClient, console_node, tamper_audit_entry
from tests.test_security import CRL_RELOAD_WAIT


@pytest.fixture()
def factory(federation: Federation, tmp_path: Path) -> Iterator[InProcessNode]:
    with console_node(federation, tmp_path, "factory-1", "factory") as node:
        yield node


def client(node: InProcessNode, fed: Federation, who: pki.IssuedCert | None) -> ConsoleClient:
    assert node.node.console_port > 0
    return ConsoleClient(node.node.console_port, fed.ca, who)


def test_officer_sees_pages_with_strict_security_headers(
    factory: InProcessNode, federation: Federation
) -> None:
    officer = federation.person("olga-fc", "officer", "factory-1")
    with client(factory, federation, officer) as c:
        for path in ("/", "/transfers", "/audit", "/reconcile"):
            a = c.get(path)
            assert a.status == 200, (path, a.refusal)
            assert a.headers["content-security-policy"] == CSP
            assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP
            assert a.headers["x-frame-options"] == "DENY"
            assert a.headers["cache-control"] == "no-store"
            assert "officer:olga-fc@factory-1" in a.body or "olga-fc" in a.body
        home = c.get("/")
        assert 'href="/audit"' in home.body and 'href="/transfers"' in home.body
        css = c.get("/static/console.css")
        assert css.status == 200 and "table.list" in css.body


def test_engineer_gets_403_on_an_officer_page_and_it_is_audited(
    factory: InProcessNode, federation: Federation
) -> None:
    engineer = federation.person("ed", "engineer", "factory-1")
    with client(factory, federation, engineer) as c:
        a = c.get("/audit")
        assert a.status == 403
        assert a.refusal == (
            "not allowed to call /console/audit on node factory-1: engineer:ed@factory-1 "
            "acts as 'engineer'; allowed: officer"
        )
        assert 'href="/audit"' not in c.get("/").body  # no link to what is refused
    events = read_events(factory.node.cfg.audit.path, event="authz.refused")
    assert any(
        e.actor == "engineer:ed@factory-1" and e.details["method"] == "/console/audit"
        for e in events
    )


def test_a_person_of_another_node_is_refused(
    factory: InProcessNode, federation: Federation
) -> None:
    stranger = federation.person("olaf", "officer", "hospital-1")
    with client(factory, federation, stranger) as c:
        a = c.get("/audit")
    assert a.status == 403
    assert "belongs to node 'hospital-1', not 'factory-1'" in a.refusal


def test_no_client_certificate_is_refused_at_the_handshake_and_audited(
    factory: InProcessNode, federation: Federation
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with client(factory, federation, None) as c:
            c.get("/")
    events = read_events(factory.node.cfg.audit.path, event="auth.refused")
    assert any(e.details.get("refusal") == "no_certificate" for e in events)


def test_revoked_certificate_is_refused_on_the_next_request_of_an_open_connection(
    factory: InProcessNode, federation: Federation
) -> None:
    officer = federation.person("rena", "officer", "factory-1")
    with client(factory, federation, officer) as c:
        assert c.get("/audit").status == 200
        pki.revoke(federation.ca_dir, officer.serial, "key_compromise")
        time.sleep(CRL_RELOAD_WAIT)  # the node re-reads crl.pem when it changes
        a = c.get("/audit")  # the same keep-alive connection
        assert a.status == 401
        assert f"certificate for rena (serial {officer.serial:x}) was revoked at" in a.refusal
        assert "olga-fc" not in a.body and "Audit log" not in a.body  # no page, no navigation
    events = read_events(factory.node.cfg.audit.path, event="auth.refused")
    assert any(e.details.get("reason") == "RevokedCertificate" for e in events)


def test_certificate_expiring_on_an_open_connection_is_refused_on_the_next_request(
    factory: InProcessNode, federation: Federation
) -> None:
    officer = federation.person(
        "brief-officer", "officer", "factory-1", not_after=datetime.now(UTC) + timedelta(seconds=3)
    )
    expires = pki.load_certificate(officer.cert_path).not_valid_after_utc
    with client(factory, federation, officer) as c:
        assert c.get("/transfers").status == 200
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)
        a = c.get("/transfers")  # the same keep-alive connection
    assert a.status == 401
    assert f"certificate for brief-officer (serial {officer.serial:x}) expired at" in a.refusal


def test_state_change_without_csrf_token_is_refused(
    factory: InProcessNode, federation: Federation
) -> None:
    officer = federation.person("olga-fc", "officer", "factory-1")
    with client(factory, federation, officer) as c:
        token = c.get("/audit").csrf
        bare = c.post("/audit/verify", {})
        assert bare.status == 403
        assert bare.refusal == (
            "POST /audit/verify refused: the request carries no valid CSRF token; reload "
            "the page and submit the form again"
        )
        forged = c.post("/audit/verify", {"_csrf": "0" * 40})
        assert forged.status == 403
        other_site = c.post("/audit/verify", {"_csrf": token}, {"origin": "https://evil.example"})
        assert other_site.status == 403 and "is not this console's" in other_site.refusal
        ok = c.post("/audit/verify", {}, {"x-csrf-token": token})
        assert ok.status == 200 and 'data-ok="1"' in ok.body
    other = federation.person("otto", "officer", "factory-1")
    with client(factory, federation, other) as c2:  # a token is bound to its certificate
        assert c2.post("/audit/verify", {"_csrf": token}).status == 403


def test_verify_chain_names_the_first_tampered_entry(
    factory: InProcessNode, federation: Federation
) -> None:
    officer = federation.person("olga-fc", "officer", "factory-1")
    with client(factory, federation, officer) as c:
        token = c.get("/audit").csrf
        good = c.post("/audit/verify", {"_csrf": token})
        assert 'data-ok="1"' in good.body and "Chain verified" in good.body
        tamper_audit_entry(factory.node.cfg.audit.path, 2, "someone-else")
        bad = c.post("/audit/verify", {"_csrf": token})
    assert bad.status == 200
    assert 'data-ok="0"' in bad.body and "Chain FAILED at entry" in bad.body


def test_audit_log_filters_pages_and_tail(factory: InProcessNode, federation: Federation) -> None:
    officer = federation.person("olga-fc", "officer", "factory-1")
    engineer = federation.person("ed", "engineer", "factory-1")
    with client(factory, federation, engineer) as e:
        for _ in range(3):
            e.get("/audit")  # three audited refusals
    with client(factory, federation, officer) as c:
        a = c.get("/audit?event=authz.refused")
        assert a.status == 200
        assert a.body.count('class="event alert') == 3  # refusals are highlighted
        assert a.body.count("engineer:ed@factory-1") == 3
        bad = c.get("/audit?event=no.such")
        assert bad.status == 400 and "unknown audit event 'no.such'" in bad.refusal
        when = c.get("/audit?since=yesterday")
        assert when.status == 400 and "is not a date/time" in when.refusal
        newest = max(e.seq for e in read_events(factory.node.cfg.audit.path))
        tail = c.get(f"/audit/tail?after={newest}")
        assert tail.status == 200 and 'id="audit-tail"' in tail.body and "data-seq" not in tail.body
        tail = c.get(f"/audit/tail?after={newest - 2}")
        assert tail.body.count("data-seq=") == 2
