"""ATNA export: PS3.15 A.5 audit messages over RFC 5424 / RFC 5425 syslog-TLS.

A real TLS collector (certificate from the test federation's CA, client
certificates required) parses octet-counted frames and RFC 5424 headers; the
XML is checked against the structure of the DICOM Audit Message Schema
(PS3.15 A.5.1.1: element order, required attributes, enumerated values). The
official schema is RELAX NG Compact; no validator for it ships with our
dependencies, so the rules are restated in :func:`check_schema`.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import sqlite3
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from gateway import atna, audit, pki
from gateway.audit import AuditLog
from gateway.errors import AuditError
from gateway.syslog_tls import AtnaForwarder, SyslogTLSSender, default_state_file
from tests.cluster import Federation

NODE, FED = "hospital-1", "testfed"
SHA = "ab" * 32
HEADER = re.compile(
    rb"<(\d{1,3})>1 (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (\S+) (\S+) (\S+) (\S+) - "
    rb"\xef\xbb\xbf(<\?xml .*)\Z",
    re.DOTALL,
)


# --- a syslog-TLS collector -----------------------------------------------------------------
class Collector:
    """RFC 5425 receiver on 127.0.0.1; requires a client certificate from ``client_ca``."""

    def __init__(self, cert: Path, key: Path, client_ca: Path, port: int = 0) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(client_ca)
        self.messages: list[bytes] = []
        self.errors: list[str] = []
        self.client_subjects: list[str] = []
        self.cond = threading.Condition()
        self.port = port
        self._conns: list[ssl.SSLSocket] = []
        self._stop = threading.Event()
        self.start()

    def start(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen()
        srv.settimeout(0.05)
        self.port, self._srv = srv.getsockname()[1], srv
        self._stop.clear()
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()
        srv.close()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(None)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.errors.append(f"handshake: {exc}")
            raw.close()
            return
        self._conns.append(conn)
        subject = dict(x[0] for x in conn.getpeercert()["subject"])  # type: ignore[index,misc]
        self.client_subjects.append(str(subject.get("commonName")))
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                break
            if not data:
                break
            buf += data
            while m := re.match(rb"([1-9][0-9]{0,8}) ", buf):  # MSG-LEN SP SYSLOG-MSG
                end = m.end() + int(m.group(1))
                if len(buf) < end:
                    break
                with self.cond:
                    self.messages.append(buf[m.end() : end])
                    self.cond.notify_all()
                buf = buf[end:]
            if buf and not re.match(rb"[1-9][0-9]{0,8}( |\Z)", buf):
                self.errors.append(f"bad frame start {buf[:20]!r}")
                break
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._srv.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns.clear()
        time.sleep(0.05)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[bytes]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.messages) >= n, timeout)
            return list(self.messages)


def parse(syslog_msg: bytes) -> tuple[re.Match[bytes], ET.Element]:
    m = HEADER.match(syslog_msg)
    assert m, syslog_msg[:200]
    return m, ET.fromstring(m.group(7))


def audit_seq(root: ET.Element) -> int:
    ids = [p.get("ParticipantObjectID", "") for p in root.iter("ParticipantObjectIdentification")]
    (seq,) = [int(i.rsplit(":", 1)[1]) for i in ids if i.startswith(f"urn:yigong:audit:{NODE}:")]
    return seq


# --- the schema, restated (PS3.15 A.5.1.1) --------------------------------------------------
def check_code(elem: ET.Element, allowed_codes: set[str] | None = None) -> None:
    attrs = set(elem.attrib)
    assert (
        {"csd-code", "codeSystemName", "originalText"}
        <= attrs
        <= {
            "csd-code",
            "codeSystemName",
            "originalText",
            "displayName",
        }
    ), (elem.tag, elem.attrib)
    assert allowed_codes is None or elem.get("csd-code") in allowed_codes


def check_attrs(elem: ET.Element, required: set[str], optional: set[str]) -> None:
    assert required <= set(elem.attrib) <= required | optional, (elem.tag, elem.attrib)


def check_schema(root: ET.Element) -> None:
    assert root.tag == "AuditMessage" and not root.attrib
    order = "".join(
        {
            "EventIdentification": "E",
            "ActiveParticipant": "A",
            "AuditSourceIdentification": "S",
            "ParticipantObjectIdentification": "P",
        }.get(child.tag, "?")
        for child in root
    )
    assert re.fullmatch("EA+SP*", order), order
    ev = root[0]
    check_attrs(ev, {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"})
    assert ev.get("EventActionCode", "E") in set("CRUDE")
    assert ev.get("EventOutcomeIndicator") in {"0", "4", "8", "12"}
    assert datetime.fromisoformat(ev.get("EventDateTime", "")).tzinfo is not None
    tags = ",".join(c.tag for c in ev) + ","
    assert re.fullmatch("EventID,(EventTypeCode,)*(EventOutcomeDescription,)?", tags), tags
    for code in ev:
        if code.tag != "EventOutcomeDescription":
            check_code(code)
    for ap in root.iter("ActiveParticipant"):
        check_attrs(
            ap,
            {"UserID", "UserIsRequestor"},
            {"AlternativeUserID", "UserName", "NetworkAccessPointID", "NetworkAccessPointTypeCode"},
        )
        assert ap.get("UserIsRequestor") in {"true", "false"} and ap.get("UserID")
        assert ap.get("NetworkAccessPointTypeCode", "1") in set("12345")
        assert ("NetworkAccessPointID" in ap.attrib) == ("NetworkAccessPointTypeCode" in ap.attrib)
        assert all(c.tag == "RoleIDCode" for c in ap)
        for code in ap:
            check_code(code)
    (src,) = root.iter("AuditSourceIdentification")
    check_attrs(src, {"AuditSourceID"}, {"AuditEnterpriseSiteID"})
    for code in src:
        assert code.tag == "AuditSourceTypeCode" and code.get("csd-code")
    for po in root.iter("ParticipantObjectIdentification"):
        check_attrs(
            po,
            {"ParticipantObjectID"},
            {
                "ParticipantObjectTypeCode",
                "ParticipantObjectTypeCodeRole",
                "ParticipantObjectDataLifeCycle",
                "ParticipantObjectSensitivity",
            },
        )
        assert po.get("ParticipantObjectTypeCode", "2") in set("1234")
        assert int(po.get("ParticipantObjectTypeCodeRole", "3")) in range(1, 27)
        assert int(po.get("ParticipantObjectDataLifeCycle", "1")) in range(1, 16)
        tags = [c.tag for c in po]
        assert tags[0] == "ParticipantObjectIDTypeCode"
        check_code(po[0])
        assert tags[1] in {"ParticipantObjectName", "ParticipantObjectQuery"}
        rest = "".join(f"{t}," for t in tags[2:])
        assert re.fullmatch("(ParticipantObjectDetail,)*(ParticipantObjectDescription,)*", rest)
        for detail in po.iter("ParticipantObjectDetail"):
            check_attrs(detail, {"type", "value"}, set())
            base64.b64decode(detail.get("value", ""), validate=True)
        if tags[1] == "ParticipantObjectQuery":
            base64.b64decode(po[1].text or "", validate=True)
        # never a patient: no person objects, no patient role
        assert po.get("ParticipantObjectTypeCode") != "1"
        assert po.get("ParticipantObjectTypeCodeRole") != "1"


def event_id(root: ET.Element) -> tuple[str, str, str, list[str]]:
    ev = root[0]
    types = [t.get("csd-code", "") for t in ev.iter("EventTypeCode")]
    return (
        ev[0].get("csd-code", ""),
        ev.get("EventActionCode", ""),
        ev.get("EventOutcomeIndicator", ""),
        types,
    )


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "audit.sqlite"


@pytest.fixture
def audit_log(log_path: Path) -> Iterator[AuditLog]:
    with AuditLog(log_path, NODE) as log:
        yield log


@pytest.fixture
def collector(federation: Federation) -> Iterator[Collector]:
    issued = federation.node("syslog-1", "factory")
    c = Collector(issued.cert_path, issued.key_path, federation.ca)
    yield c
    c.stop()


def make_sender(federation: Federation, port: int, **kw: object) -> SyslogTLSSender:
    me = federation.node(NODE, "hospital")
    return SyslogTLSSender(
        "127.0.0.1",
        port,
        ca=federation.ca,
        cert=me.cert_path,
        key=me.key_path,
        hostname=NODE,
        timeout=3.0,
        **kw,  # type: ignore[arg-type]
    )


def make_forwarder(
    federation: Federation, log_path: Path, port: int, **kw: object
) -> AtnaForwarder:
    return AtnaForwarder(
        log_path,
        NODE,
        FED,
        make_sender(federation, port),
        default_state_file(log_path),
        **kw,  # type: ignore[arg-type]
    )


SCENARIO: list[tuple[str, dict[str, object], tuple[str, str, str, list[str]]]] = [
    (
        audit.NODE_START,
        {"actor": f"node:{NODE}", "details": {"pid": 7}},
        ("110100", "E", "0", ["110120"]),
    ),
    (
        audit.TRANSFER_BEGUN,
        {"actor": f"node:{NODE}", "peer": "factory-1", "object_id": SHA, "transfer_id": "t-1"},
        ("110102", "E", "0", []),
    ),
    (
        audit.TRANSFER_COMPLETED,
        {
            "actor": f"node:{NODE}",
            "peer": "factory-1",
            "object_id": SHA,
            "transfer_id": "t-1",
            "case_id": "case-7",
            "details": {"size": 10},
        },
        ("110104", "R", "0", []),
    ),
    (
        audit.QUERY,
        {
            "actor": "engineer:bob@factory-1",
            "case_id": "case-7",
            "details": {"query": "list_objects", "count": 2},
        },
        ("110112", "E", "0", []),
    ),
    (
        audit.OBJECT_DOWNLOADED,
        {"actor": "engineer:bob@factory-1", "object_id": SHA, "details": {"offset": 0, "size": 10}},
        ("110106", "R", "0", []),
    ),
    (
        audit.AUTH_REFUSED,
        {
            "outcome": "failure",
            "details": {
                "method": "/yigong.v1.Query/ListObjects",
                "remote": "ipv4:127.0.0.1:40000",
                "reason": "UntrustedCertificate",
                "cert_subject": "mallory",
                "cert_serial": "abc",
            },
        },
        ("110113", "E", "8", ["110126"]),
    ),
    (
        audit.AUTHZ_REFUSED,
        {
            "actor": "engineer:eve@factory-1",
            "outcome": "failure",
            "details": {
                "method": "/yigong.v1.Transfer/Push",
                "remote": "ipv6:[::1]:4000",
                "reason": "PermissionDenied",
            },
        },
        ("110113", "E", "8", ["110132"]),
    ),
    (
        audit.SECURITY_ALERT,
        {
            "actor": f"node:{NODE}",
            "outcome": "failure",
            "peer": "factory-1",
            "object_id": SHA,
            "transfer_id": "t-2",
            "details": {"reason": "IdentifiableData", "action": "send refused"},
        },
        ("110113", "E", "8", ["YG002"]),
    ),
]


def record_scenario(log: AuditLog) -> dict[int, tuple[str, str, str, list[str]]]:
    expected = {}
    for kind, fields, want in SCENARIO:
        seq = log.record(kind, **fields)  # type: ignore[arg-type]
        expected[seq] = want
    log.record(audit.TRANSFER_QUEUED, actor="clinician:ann@hospital-1", object_id=SHA)  # skipped
    return expected


# --- the messages ----------------------------------------------------------------------------
def test_scenario_messages_have_the_a5_structure_and_event_ids(audit_log: AuditLog) -> None:
    expected = record_scenario(audit_log)
    events = audit_log.events()
    xmls = list(atna.export(events, node_id=NODE, federation=FED))
    assert len(xmls) == len(expected)  # transfer.queued is skipped
    for xml in xmls:
        assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
        root = ET.fromstring(xml)
        check_schema(root)
        seq = audit_seq(root)
        assert event_id(root) == expected[seq], seq
        (src,) = root.iter("AuditSourceIdentification")
        assert (src.get("AuditSourceID"), src.get("AuditEnterpriseSiteID")) == (NODE, FED)
        assert any(ap.get("UserID") for ap in root.iter("ActiveParticipant"))
    # deterministic
    again = list(atna.export(audit_log.events(), node_id=NODE, federation=FED))
    assert again == xmls
    with pytest.raises(AuditError, match=r"transfer\.queued"):
        atna.to_atna_xml(events[-1], node_id=NODE, federation=FED)


def _one(log: AuditLog, kind: str, **fields: object) -> ET.Element:
    seq = log.record(kind, **fields)  # type: ignore[arg-type]
    (event,) = log.events(after_seq=seq - 1)
    root = ET.fromstring(
        atna.to_atna_xml(
            event, node_id=NODE, federation=FED, peer_addresses={"factory-1": "10.0.0.9:7443"}
        )
    )
    check_schema(root)
    return root


def test_participants_roles_and_objects(audit_log: AuditLog) -> None:
    root = _one(
        audit_log,
        audit.TRANSFER_COMPLETED,
        actor=f"node:{NODE}",
        peer="factory-1",
        object_id=SHA,
        transfer_id="t-9",
        case_id="case-7",
        details={"size": 5},
    )
    aps = {ap.get("UserID"): ap for ap in root.iter("ActiveParticipant")}
    src, dst = aps[f"node:{NODE}"], aps["node:factory-1"]
    assert src.find("RoleIDCode").get("csd-code") == "110153"  # type: ignore[union-attr]
    assert src.get("UserIsRequestor") == "true"
    assert dst.find("RoleIDCode").get("csd-code") == "110152"  # type: ignore[union-attr]
    assert (dst.get("NetworkAccessPointID"), dst.get("NetworkAccessPointTypeCode")) == (
        "10.0.0.9",
        "2",
    )
    objs = {
        po.get("ParticipantObjectID"): po for po in root.iter("ParticipantObjectIdentification")
    }
    obj = objs[f"urn:yigong:object:sha256:{SHA}"]
    assert obj.find("ParticipantObjectIDTypeCode").attrib == {  # type: ignore[union-attr]
        "csd-code": "12",
        "codeSystemName": "RFC-3881",
        "originalText": "URI",
    }
    assert (obj.get("ParticipantObjectTypeCode"), obj.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "3",
    )
    assert {"urn:yigong:transfer:t-9", "urn:yigong:case:case-7"} <= set(objs)
    assert not any(
        o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
        for o in objs.values()
    )


def test_receiver_creates_and_study_uid_only_when_given(audit_log: AuditLog) -> None:
    root = _one(
        audit_log,
        audit.TRANSFER_RECEIVED,
        actor="node:factory-1",
        peer="factory-1",
        object_id=SHA,
        transfer_id="t-3",
        details={"study_instance_uid": "1.2.826.0.1.3680043.2"},
    )
    assert event_id(root)[:2] == ("110104", "C")
    source = [ap for ap in root.iter("ActiveParticipant") if ap.get("UserIsRequestor") == "true"]
    assert [ap.get("UserID") for ap in source] == ["node:factory-1"]
    codes = [
        po.find("ParticipantObjectIDTypeCode").get("csd-code")  # type: ignore[union-attr]
        for po in root.iter("ParticipantObjectIdentification")
    ]
    assert codes.count("110180") == 1


@pytest.mark.parametrize(
    ("kind", "fields", "want"),
    [
        (
            audit.AUTH_REFUSED,
            {
                "outcome": "failure",
                "details": {
                    "cert_kind": "person",
                    "cert_subject": "bob",
                    "remote": "ipv4:10.1.2.3:555",
                },
            },
            ("110114", "E", "8", ["110122"]),
        ),
        (
            audit.RESIDENCY_REFUSED,
            {"outcome": "failure", "peer": "factory-1"},
            ("110113", "E", "8", ["110132"]),
        ),
        (
            audit.TRANSFER_INTEGRITY_FAILED,
            {
                "outcome": "failure",
                "actor": "node:factory-1",
                "object_id": SHA,
                "details": {"where": "chunk 3"},
            },
            ("110113", "E", "8", ["YG001"]),
        ),
        (
            audit.TRANSFER_FAILED,
            {
                "outcome": "failure",
                "peer": "factory-1",
                "object_id": SHA,
                "details": {"error": "PeerUnavailable"},
            },
            ("110104", "R", "4", []),
        ),
        (
            audit.SECURITY_ALERT,
            {"outcome": "failure", "details": {"reason": "audit triggers missing"}},
            ("110113", "E", "12", ["YG002"]),
        ),
        (audit.NODE_STOP, {"actor": f"node:{NODE}"}, ("110100", "E", "0", ["110121"])),
        (
            audit.OBJECT_STORED,
            {
                "actor": "engineer:bob@factory-1",
                "object_id": SHA,
                "details": {"source": "submit", "size": 3},
            },
            ("110104", "C", "0", []),
        ),
    ],
)
def test_mapping_table(
    audit_log: AuditLog, kind: str, fields: dict[str, object], want: tuple[str, str, str, list[str]]
) -> None:
    root = _one(audit_log, kind, **fields)
    assert event_id(root) == want
    if want[0] == "110113":  # every alert subject carries an Alert Description
        for po in root.iter("ParticipantObjectIdentification"):
            types = [d.get("type") for d in po.iter("ParticipantObjectDetail")]
            assert "Alert Description" in types
    if want[2] != "0":
        assert root[0].find("EventOutcomeDescription") is not None


def test_not_exported_types_are_skipped(audit_log: AuditLog) -> None:
    for kind in (
        audit.TRANSFER_QUEUED,
        audit.DEID_APPLIED,
        audit.CASE_RECORD,
        audit.FIDELITY_RESULT,
    ):
        audit_log.record(kind, actor=f"node:{NODE}")
    audit_log.record(audit.OBJECT_STORED, actor="node:factory-1", object_id=SHA)  # receiver side
    assert list(atna.export(audit_log.events(), node_id=NODE, federation=FED)) == []


def test_control_characters_cannot_break_the_xml(audit_log: AuditLog) -> None:
    root = _one(
        audit_log,
        audit.SECURITY_ALERT,
        outcome="failure",
        details={"reason": "bad\x00\x07<tag>&\"'\n", "zpad": "x" * 4000},
    )
    desc = root[0].find("EventOutcomeDescription")
    assert desc is not None and "<tag>&" in (desc.text or "") and len(desc.text or "") <= 1024


# --- syslog framing --------------------------------------------------------------------------
def test_rfc5424_message_and_rfc5425_frame(federation: Federation) -> None:
    sender = make_sender(federation, 1)
    when = datetime.fromisoformat("2025-01-31T08:15:02.123456+00:00")
    msg = sender.format(b"<AuditMessage/>", severity=5, msgid="DICOM+RFC3881", when=when)
    assert msg == (
        f"<85>1 2025-01-31T08:15:02.123456Z {NODE} yigong {os.getpid()} DICOM+RFC3881 - ".encode()
        + b"\xef\xbb\xbf<AuditMessage/>"
    )
    assert sender.frame(msg) == str(len(msg)).encode() + b" " + msg
    for bad in ({"severity": 8}, {"severity": 5, "msgid": "has space"}):
        with pytest.raises(AuditError):
            sender.format(b"<x/>", **bad)  # type: ignore[arg-type]
    with pytest.raises(AuditError, match="HOSTNAME"):
        SyslogTLSSender("h", 1, ca=federation.ca, hostname="a b")


# --- delivery --------------------------------------------------------------------------------
def test_forwarding_over_mutual_tls(
    federation: Federation,
    collector: Collector,
    audit_log: AuditLog,
    log_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = record_scenario(audit_log)
    fwd = make_forwarder(federation, log_path, collector.port)
    assert fwd.forward_once() == len(expected)
    messages = collector.wait_for(len(expected))
    assert len(messages) == len(expected) and not collector.errors
    assert collector.client_subjects == [NODE]  # mutual TLS, one connection reused
    for raw in messages:
        m, root = parse(raw)
        pri, stamp, host, app, procid, msgid = (g.decode() for g in m.groups()[:6])
        seq = audit_seq(root)
        want = expected[seq]
        severity = 5 if want[2] == "0" else 4
        assert int(pri) == 10 * 8 + severity  # authpriv
        assert datetime.fromisoformat(stamp).tzinfo is not None
        assert (host, app, procid, msgid) == (NODE, "yigong", str(os.getpid()), "DICOM+RFC3881")
        check_schema(root)
        assert event_id(root) == want
    assert fwd.forward_once() == 0  # nothing new
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # chain checks pass
    fwd.stop(flush=False)


def test_restart_and_collector_outage_lose_nothing_and_repeat_nothing(
    federation: Federation, collector: Collector, audit_log: AuditLog, log_path: Path
) -> None:
    expected = record_scenario(audit_log)
    first = make_forwarder(federation, log_path, collector.port)
    assert first.forward_once() == len(expected)
    first.stop(flush=False)
    assert len(collector.wait_for(len(expected))) == len(expected)

    collector.stop()  # collector down; the node keeps auditing
    more = [audit_log.record(audit.NODE_STOP, actor=f"node:{NODE}") for _ in range(3)]
    second = make_forwarder(federation, log_path, collector.port)  # restart: state file
    assert second.last_seq == max(expected) + 1  # the skipped transfer.queued counts too
    with pytest.raises(AuditError, match=rf"127\.0\.0\.1:{collector.port}"):
        second.forward_once()
    assert second.last_seq == max(expected) + 1

    collector.start()  # back on the same port
    assert second.forward_once() == len(more)
    seqs = [audit_seq(parse(m)[1]) for m in collector.wait_for(len(expected) + len(more))]
    assert sorted(seqs) == sorted([*expected, *more])  # no loss, no duplicate
    second.stop(flush=False)


def test_background_forwarder_waits_out_an_outage(
    federation: Federation, collector: Collector, audit_log: AuditLog, log_path: Path
) -> None:
    fwd = make_forwarder(
        federation, log_path, collector.port, poll_seconds=0.05, max_backoff_seconds=0.2
    )
    fwd.start()
    audit_log.record(audit.NODE_START, actor=f"node:{NODE}")
    collector.wait_for(1)
    collector.stop()
    for _ in range(5):
        audit_log.record(
            audit.QUERY, actor="officer:olga@hospital-1", details={"query": "list_objects"}
        )
    time.sleep(0.5)  # several failed attempts
    collector.start()
    messages = collector.wait_for(6)
    fwd.stop()
    assert sorted(audit_seq(parse(m)[1]) for m in messages) == list(range(1, 7))


def test_replay_sends_again_after_a_given_seq(
    federation: Federation, collector: Collector, audit_log: AuditLog, log_path: Path
) -> None:
    expected = record_scenario(audit_log)
    fwd = make_forwarder(federation, log_path, collector.port)
    fwd.forward_once()
    assert fwd.replay(max(expected) - 2) == 2  # the last two exported ones
    sender = make_sender(federation, collector.port)
    assert sender.replay(audit_log, 0, federation=FED) == len(expected)
    sender.close()
    assert len(collector.wait_for(2 * len(expected) + 2)) == 2 * len(expected) + 2
    fwd.stop(flush=False)


def test_collector_with_foreign_certificate_is_refused(
    federation: Federation, tmp_path: Path, audit_log: AuditLog, log_path: Path
) -> None:
    other = tmp_path / "other-ca"
    pki.create_ca(other, "otherfed")
    impostor = pki.issue_node_cert(other, "syslog-1", "factory", "cn-east", tmp_path / "imp")
    bad = Collector(impostor.cert_path, impostor.key_path, federation.ca)
    try:
        audit_log.record(audit.NODE_START, actor=f"node:{NODE}")
        fwd = make_forwarder(federation, log_path, bad.port)
        with pytest.raises(AuditError, match=rf"127\.0\.0\.1:{bad.port}.*not trusted"):
            fwd.forward_once()
        assert fwd.last_seq == 0 and bad.messages == []
        fwd.stop(flush=False)
    finally:
        bad.stop()


def test_client_certificate_the_collector_refuses_is_an_error(
    federation: Federation, tmp_path: Path, collector: Collector
) -> None:
    other = tmp_path / "other-ca"
    pki.create_ca(other, "otherfed")
    stranger = pki.issue_node_cert(other, NODE, "hospital", "cn-east", tmp_path / "s")
    sender = SyslogTLSSender(
        "127.0.0.1",
        collector.port,
        ca=federation.ca,
        cert=stranger.cert_path,
        key=stranger.key_path,
        hostname=NODE,
        timeout=3.0,
    )
    with pytest.raises(AuditError, match=rf"127\.0\.0\.1:{collector.port}"):
        sender.deliver(b"<AuditMessage/>", severity=5)
    sender.close()
    assert collector.messages == []


def test_send_queue_never_blocks_and_counts_drops(
    federation: Federation, collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    port = collector.port
    collector.stop()
    sender = make_sender(federation, port, queue_size=2)
    caplog.set_level(logging.WARNING, "gateway.syslog_tls")
    started = time.monotonic()
    results = [sender.send(b"<AuditMessage/>", severity=5) for _ in range(10)]
    assert time.monotonic() - started < 0.5
    assert results.count(False) >= 7 and sender.dropped == results.count(False)
    assert any("dropped" in r.getMessage() for r in caplog.records)
    collector.start()
    assert len(collector.wait_for(results.count(True))) == results.count(True)
    sender.close()


def test_state_file_is_checked(federation: Federation, audit_log: AuditLog, log_path: Path) -> None:
    state = default_state_file(log_path)
    assert state.parent == log_path.parent
    state.write_text("{not json")
    with pytest.raises(AuditError, match="delete it"):
        make_forwarder(federation, log_path, 1)
    state.write_text('{"format": "yigong-atna-state/1", "node_id": "factory-1", "last_seq": 3}')
    with pytest.raises(AuditError, match="factory-1"):
        make_forwarder(federation, log_path, 1)


def test_an_edited_entry_is_still_sent_and_reported(
    federation: Federation,
    collector: Collector,
    audit_log: AuditLog,
    log_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit_log.record(audit.NODE_START, actor=f"node:{NODE}")
    conn = sqlite3.connect(log_path)
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("UPDATE events SET actor = 'node:someone-else' WHERE seq = 1")
    conn.commit()
    conn.close()
    fwd = make_forwarder(federation, log_path, collector.port)
    assert fwd.forward_once() == 1
    assert any("does not match its hash" in r.getMessage() for r in caplog.records)
    fwd.stop(flush=False)
