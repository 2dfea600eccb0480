"""Audit events as IHE ATNA / DICOM PS3.15 Annex A.5 audit messages (XML).

One yigong audit event becomes at most one ``AuditMessage`` in the DICOM Audit
Message Schema (PS3.15 A.5.1.1: ``csd-code``/``codeSystemName``/``originalText``
coded values, elements in schema order, no namespace). The mapping table, the
identifiers used and the deliberate deviations are in ``docs/atna.md``; in short:

* every message has the reporting node as ``AuditSourceID`` (enterprise site =
  federation) and one participant object ``urn:yigong:audit:<node>:<seq>`` that
  carries the audit entry's hash, so each ATNA copy can be matched to the signed
  local log (and a collector can drop duplicates after a replay);
* objects, transfers and cases are identified by URIs (``urn:yigong:object:sha256:
  <hex>``, ``urn:yigong:transfer:<id>``, ``urn:yigong:case:<id>``) with the ID type
  code (12, RFC-3881, "URI"); (110180, DCM, "Study Instance UID") is used only for
  an explicit ``study_instance_uid`` detail;
* NO patient participant object is ever written. Our audit entries carry no
  patient data (design invariant 2), so the patient participant that some A.5.3
  messages require is omitted on purpose.

Output is deterministic: the same event gives the same bytes.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

from gateway import audit
from gateway.audit import AuditEvent, Scalar, canonical_json
from gateway.errors import AuditError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, ``codeSystemName``, ``originalText``."""

    code: str
    system: str
    text: str


def _dcm(code: str, text: str) -> Code:
    return Code(code, "DCM", text)


LOCAL_SCHEME: Final = "99YIGONG"  # DICOM private coding schemes start with "99"

# EventID (PS3.15 A.5.3)
APPLICATION_ACTIVITY: Final = _dcm("110100", "Application Activity")
BEGIN_TRANSFERRING: Final = _dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_TRANSFERRED: Final = _dcm("110104", "DICOM Instances Transferred")
EXPORT: Final = _dcm("110106", "Export")
QUERY: Final = _dcm("110112", "Query")
SECURITY_ALERT: Final = _dcm("110113", "Security Alert")
USER_AUTHENTICATION: Final = _dcm("110114", "User Authentication")
# EventTypeCode
APPLICATION_START: Final = _dcm("110120", "Application Start")
APPLICATION_STOP: Final = _dcm("110121", "Application Stop")
LOGIN: Final = _dcm("110122", "Login")
NODE_AUTHENTICATION: Final = _dcm("110126", "Node Authentication")
SECURITY_CONFIGURATION: Final = _dcm("110129", "Security Configuration")
USE_OF_RESTRICTED_FUNCTION: Final = _dcm("110132", "Use of Restricted Function")
INTEGRITY_FAILURE: Final = Code("YG001", LOCAL_SCHEME, "Transfer Integrity Failure")
GATEWAY_ALERT: Final = Code("YG002", LOCAL_SCHEME, "Gateway Security Alert")
# RoleIDCode
APPLICATION: Final = _dcm("110150", "Application")
APPLICATION_LAUNCHER: Final = _dcm("110151", "Application Launcher")
DESTINATION: Final = _dcm("110152", "Destination Role ID")
SOURCE: Final = _dcm("110153", "Source Role ID")
DESTINATION_MEDIA: Final = _dcm("110154", "Destination Media")
# ParticipantObjectIDTypeCode
STUDY_INSTANCE_UID: Final = _dcm("110180", "Study Instance UID")
NODE_ID: Final = _dcm("110182", "Node ID")
URI: Final = Code("12", "RFC-3881", "URI")

AUDIT_SOURCE_TYPE: Final = "4"  # application server process tier (PS3.15 A.5.1.2.1)
SEVERITY: Final = {"0": 5, "4": 4, "8": 4, "12": 2}
"""Syslog severity per EventOutcomeIndicator: notice, warning, warning, critical."""
MAX_TEXT: Final = 1024
_QUERY_RPC: Final = {
    "list_objects": "ListObjects",
    "list_transfers": "ListTransfers",
    "get_object": "GetObject",
}
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_UID_RE: Final = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_XML_BAD: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass
class _Participant:
    user_id: str
    requestor: bool
    role: Code | None = None
    nap: str | None = None  # NetworkAccessPointID source: peer address or gRPC peer string
    user_name: str | None = None


@dataclass
class _Object:
    object_id: str
    id_type: Code
    role: str | None
    name: str | None = None
    query: str | None = None
    details: list[tuple[str, str]] = field(default_factory=list)
    lifecycle: str | None = None


@dataclass
class _Message:
    event_id: Code
    action: str
    types: list[Code]
    participants: list[_Participant]
    objects: list[_Object]
    outcome: str | None = None  # overrides the default for the event's outcome


@dataclass(frozen=True)
class AtnaMessage:
    """One rendered message and what a transport needs to know about it."""

    seq: int
    event: str
    event_id: str
    outcome: str
    severity: int
    xml: bytes


# --- small helpers ---------------------------------------------------------------------------
def _clean(text: str) -> str:
    return _XML_BAD.sub("\ufffd", text)


def _urn(kind: str, value: str) -> str:
    return f"urn:yigong:{kind}:{quote(value, safe='-._~:@!$&()*+,;=/')}"


def _object_uri(object_id: str) -> str:
    if _SHA256_RE.fullmatch(object_id):
        return f"urn:yigong:object:sha256:{object_id}"
    return _urn("object", object_id)


def _describe(ev: AuditEvent) -> str:
    """Free text for alert / outcome descriptions (details hold no patient data)."""
    parts = [f"{k}={v}" for k, v in sorted(ev.details.items())]
    text = f"{ev.event} ({ev.outcome})" + (": " + ", ".join(parts) if parts else "")
    return text[:MAX_TEXT]


def _nap_attrs(value: str | None) -> tuple[str, str] | None:
    """(NetworkAccessPointID, TypeCode) from ``host:port``, ``ipv4:a.b.c.d:p`` or
    ``ipv6:[::1]:p`` (gRPC peer strings); type 2 = IP address, 1 = host name, 5 = URI."""
    if not value:
        return None
    if value.startswith("unix:"):
        return value, "5"
    rest = value.split(":", 1)[1] if value.startswith(("ipv4:", "ipv6:")) else value
    if rest.startswith("["):
        host = rest[1 : rest.find("]")] if "]" in rest else rest[1:]
    elif rest.count(":") == 1:
        host = rest.rsplit(":", 1)[0]
    else:
        host = rest
    try:
        return str(ipaddress.ip_address(host)), "2"
    except ValueError:
        return (host, "1") if host and " " not in host else None


def _str(details: Mapping[str, Scalar], key: str) -> str | None:
    value = details.get(key)
    return None if value is None or value == "" else str(value)


# --- mapping ---------------------------------------------------------------------------------
EXPORTED: Final[frozenset[str]] = frozenset({
    audit.NODE_START, audit.NODE_STOP, audit.CONFIG_LOADED, audit.AUTH_REFUSED,
    audit.AUTHZ_REFUSED, audit.TRANSFER_BEGUN, audit.TRANSFER_COMPLETED, audit.TRANSFER_FAILED,
    audit.TRANSFER_RECEIVED, audit.TRANSFER_INTEGRITY_FAILED, audit.OBJECT_STORED, audit.QUERY,
    audit.OBJECT_DOWNLOADED, audit.RESIDENCY_REFUSED, audit.DICOM_ASSOCIATION_REFUSED,
    audit.DICOM_INSTANCE_RECEIVED, audit.SECURITY_ALERT,
})  # fmt: skip
"""Event types with an ATNA message; ``object.stored`` only for ``source=submit``."""


def is_exported(event: AuditEvent) -> bool:
    """Whether ``event`` becomes an ATNA message (see the table in docs/atna.md)."""
    if event.event == audit.OBJECT_STORED:
        return event.details.get("source") == "submit"
    return event.event in EXPORTED


def _data_objects(ev: AuditEvent, lifecycle: str | None = None) -> list[_Object]:
    objs: list[_Object] = []
    if study := _str(ev.details, "study_instance_uid"):
        if _UID_RE.fullmatch(study):
            objs.append(_Object(study, STUDY_INSTANCE_UID, "3", study, lifecycle=lifecycle))
    if ev.object_id:
        size = _str(ev.details, "size")
        obj = _Object(_object_uri(ev.object_id), URI, "3", ev.object_id, lifecycle=lifecycle)
        obj.details = [("size", size)] if size else []
        objs.append(obj)
    if ev.transfer_id:
        objs.append(_Object(_urn("transfer", ev.transfer_id), URI, "20", ev.transfer_id))
    if ev.case_id:
        objs.append(_Object(_urn("case", ev.case_id), URI, "20", ev.case_id))
    return objs


def _transfer(ev: AuditEvent, me: str, peers: Mapping[str, str], incoming: bool) -> _Message:
    peer = f"node:{ev.peer}" if ev.peer else (ev.actor or "unknown")  # a node, person or AE
    nap = peers.get(ev.peer) if ev.peer else _str(ev.details, "remote")
    remote, local = _Participant(peer, incoming, None, nap), _Participant(me, not incoming)
    src, dst = (remote, local) if incoming else (local, remote)
    src.role, dst.role = SOURCE, DESTINATION
    if ev.event == audit.TRANSFER_BEGUN:
        event_id, action = BEGIN_TRANSFERRING, "E"
    else:  # Create at the receiver, Read at the sender (PS3.15 A.5.3.7)
        event_id, action = INSTANCES_TRANSFERRED, "C" if incoming else "R"
    outcome = "4" if ev.event == audit.TRANSFER_FAILED else None  # will be retried
    return _Message(event_id, action, [], [src, dst], _data_objects(ev), outcome)


def _alert(ev: AuditEvent, me: str, federation: str, type_code: Code) -> _Message:
    remote = _str(ev.details, "remote")
    parts = [_Participant(me, True)]
    performer = ev.actor or _str(ev.details, "cert_subject") or (remote and f"remote {remote}")
    if performer and performer != me:
        parts.append(_Participant(performer, False, nap=remote))
    subjects = _data_objects(ev)
    if ev.event in {audit.AUTH_REFUSED, audit.DICOM_ASSOCIATION_REFUSED}:
        nap = _nap_attrs(remote)
        who = nap[0] if nap else _str(ev.details, "cert_subject") or "unknown"
        subjects.insert(0, _Object(who, NODE_ID, "13", _str(ev.details, "cert_subject")))
    if method := _str(ev.details, "method"):
        subjects.insert(0, _Object(_urn("rpc", method.lstrip("/")), URI, "13", method))
    if ev.peer:
        subjects.append(_Object(f"{ev.peer}@{federation}", NODE_ID, "13", ev.peer))
    if not subjects:
        node = me.removeprefix("node:")
        subjects.append(_Object(f"{node}@{federation}", NODE_ID, "13", node))
    outcome = None
    if ev.outcome == "failure" and ev.details.get("reason") == "audit triggers missing":
        outcome = "12"  # the audit log itself was tampered with: mitigation may have failed
    return _Message(SECURITY_ALERT, "E", [type_code], parts, subjects, outcome)


def _message(
    ev: AuditEvent, node_id: str, federation: str, peers: Mapping[str, str]
) -> _Message | None:
    me, kind, details = f"node:{node_id}", ev.event, ev.details
    if kind in {audit.NODE_START, audit.NODE_STOP}:
        app = _Participant(me, False, APPLICATION, user_name="yigong-gateway")
        parts = [app]
        if ev.actor and ev.actor != me:
            parts.append(_Participant(ev.actor, True, APPLICATION_LAUNCHER))
        type_code = APPLICATION_START if kind == audit.NODE_START else APPLICATION_STOP
        return _Message(APPLICATION_ACTIVITY, "E", [type_code], parts, [])
    if kind in {audit.TRANSFER_BEGUN, audit.TRANSFER_COMPLETED, audit.TRANSFER_FAILED}:
        return _transfer(ev, me, peers, incoming=False)
    if kind in {audit.TRANSFER_RECEIVED, audit.DICOM_INSTANCE_RECEIVED, audit.OBJECT_STORED}:
        return _transfer(ev, me, peers, incoming=True) if is_exported(ev) else None
    if kind == audit.QUERY:
        what = _str(details, "query") or "query"
        rpc = f"yigong.v1.Query/{_QUERY_RPC.get(what, what)}"
        criteria = {k: v for k, v in details.items() if k != "count"}  # not the response
        for key, value in (("case_id", ev.case_id), ("object_id", ev.object_id)):
            if value:
                criteria[key] = value
        query = _Object(_urn("rpc", rpc), URI, "3", query=canonical_json(criteria)[:MAX_TEXT])
        issuer = _Participant(ev.actor or "unknown", True, SOURCE, _str(details, "remote"))
        parts = [issuer, _Participant(me, False, DESTINATION)]
        return _Message(QUERY, "E", [], parts, [query, *_data_objects(ev)])
    if kind == audit.OBJECT_DOWNLOADED:
        remote = _str(details, "remote")
        channel = _urn("rpc", "yigong.v1.Query/ReadObject")
        parts = [
            _Participant(ev.actor or "unknown", True, DESTINATION, remote),
            _Participant(me, False, SOURCE),
            _Participant(channel, False, DESTINATION_MEDIA, remote),
        ]
        return _Message(EXPORT, "R", [], parts, _data_objects(ev, lifecycle="10"))
    if kind == audit.AUTH_REFUSED and details.get("cert_kind") == "person":
        person = _str(details, "cert_subject") or "unknown"
        parts = [_Participant(person, True, nap=_str(details, "remote")), _Participant(me, False)]
        return _Message(USER_AUTHENTICATION, "E", [LOGIN], parts, [])
    alert_types = {
        audit.AUTH_REFUSED: NODE_AUTHENTICATION,
        audit.DICOM_ASSOCIATION_REFUSED: NODE_AUTHENTICATION,
        audit.AUTHZ_REFUSED: USE_OF_RESTRICTED_FUNCTION,
        audit.RESIDENCY_REFUSED: USE_OF_RESTRICTED_FUNCTION,
        audit.TRANSFER_INTEGRITY_FAILED: INTEGRITY_FAILURE,
        audit.CONFIG_LOADED: SECURITY_CONFIGURATION,
        audit.SECURITY_ALERT: GATEWAY_ALERT,
    }
    if kind in alert_types:
        return _alert(ev, me, federation, alert_types[kind])
    return None


# --- rendering -------------------------------------------------------------------------------
def _code(parent: ET.Element, tag: str, code: Code) -> None:
    attrs = {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.text}
    ET.SubElement(parent, tag, attrs)


def _render(ev: AuditEvent, msg: _Message, node_id: str, federation: str) -> tuple[str, bytes]:
    outcome = "0" if ev.outcome == "success" else (msg.outcome or "8")
    root = ET.Element("AuditMessage")
    attrs = {"EventActionCode": msg.action, "EventDateTime": ev.time}
    attrs["EventOutcomeIndicator"] = outcome
    ident = ET.SubElement(root, "EventIdentification", attrs)
    _code(ident, "EventID", msg.event_id)
    for type_code in msg.types:
        _code(ident, "EventTypeCode", type_code)
    if outcome != "0":
        ET.SubElement(ident, "EventOutcomeDescription").text = _clean(_describe(ev))
    for p in msg.participants:
        attrs = {"UserID": _clean(p.user_id)}
        if p.user_name:
            attrs["UserName"] = p.user_name
        attrs["UserIsRequestor"] = "true" if p.requestor else "false"
        if nap := _nap_attrs(p.nap):
            attrs["NetworkAccessPointID"] = _clean(nap[0])
            attrs["NetworkAccessPointTypeCode"] = nap[1]
        elem = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _code(elem, "RoleIDCode", p.role)
    attrs = {"AuditEnterpriseSiteID": federation, "AuditSourceID": node_id}
    source = ET.SubElement(root, "AuditSourceIdentification", attrs)
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_TYPE})
    entry = _Object(f"urn:yigong:audit:{node_id}:{ev.seq}", URI, "13", f"{node_id}#{ev.seq}")
    entry.details = [("yigong-event", ev.event), ("entry_hash", ev.entry_hash)]
    alert = _describe(ev) if msg.event_id == SECURITY_ALERT else None
    for obj in (*msg.objects, entry):
        attrs = {"ParticipantObjectID": _clean(obj.object_id), "ParticipantObjectTypeCode": "2"}
        if obj.role:
            attrs["ParticipantObjectTypeCodeRole"] = obj.role
        if obj.lifecycle:
            attrs["ParticipantObjectDataLifeCycle"] = obj.lifecycle
        elem = ET.SubElement(root, "ParticipantObjectIdentification", attrs)
        _code(elem, "ParticipantObjectIDTypeCode", obj.id_type)
        if obj.query is not None:
            b64 = base64.b64encode(obj.query.encode()).decode()
            ET.SubElement(elem, "ParticipantObjectQuery").text = b64
        else:  # the schema wants a name or a query
            ET.SubElement(elem, "ParticipantObjectName").text = _clean(obj.name or obj.object_id)
        pairs = [("Alert Description", alert)] if alert else []
        for key, value in (*pairs, *obj.details):
            b64 = base64.b64encode(value.encode()).decode()
            ET.SubElement(elem, "ParticipantObjectDetail", {"type": key, "value": b64})
    body = ET.tostring(root, encoding="unicode", short_empty_elements=True)
    return outcome, ('<?xml version="1.0" encoding="UTF-8"?>' + body).encode("utf-8")


def to_atna_message(
    event: AuditEvent,
    *,
    node_id: str,
    federation: str,
    peer_addresses: Mapping[str, str] | None = None,
) -> AtnaMessage | None:
    """The ATNA message for ``event``, or None when its type is not exported."""
    msg = _message(event, node_id, federation, peer_addresses or {})
    if msg is None:
        return None
    outcome, xml = _render(event, msg, node_id, federation)
    return AtnaMessage(event.seq, event.event, msg.event_id.code, outcome, SEVERITY[outcome], xml)


def to_atna_xml(
    event: AuditEvent,
    *,
    node_id: str,
    federation: str,
    peer_addresses: Mapping[str, str] | None = None,
) -> bytes:
    """``event`` as a UTF-8 DICOM PS3.15 A.5 ``AuditMessage``; deterministic.

    Raises :class:`AuditError` for event types that are not exported (see
    :func:`is_exported`)."""
    message = to_atna_message(
        event, node_id=node_id, federation=federation, peer_addresses=peer_addresses
    )
    if message is None:
        raise AuditError(f"audit event type {event.event!r} is not exported as ATNA (docs/atna.md)")
    return message.xml


def export(
    events: Iterable[AuditEvent],
    *,
    node_id: str,
    federation: str,
    peer_addresses: Mapping[str, str] | None = None,
) -> Iterator[bytes]:
    """ATNA XML for each exported event of ``events``, in order; others are skipped."""
    for event in events:
        message = to_atna_message(
            event, node_id=node_id, federation=federation, peer_addresses=peer_addresses
        )
        if message is not None:
            yield message.xml
