"""Security model over real sockets: every refusal, its gRPC status and its message.

Two gates: the TLS handshake (client certificate required, chain to the federation
CA, validity at handshake time) and the gatekeeper interceptor, which on *every*
call re-checks issuer, validity and revocation and asks gateway.authz.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway import pki
from gateway.audit import AUTH_REFUSED, AUTHZ_REFUSED
from gateway.errors import AuthenticationError, PermissionDenied, PKIError, YigongError
from gateway.identity import node_dns_name
from gateway.rpc.channel import ClientCredentials, open_channel
from gateway.rpc.client import NodeClient
from gateway.rpc.status import error_from_rpc
from tests.cluster import Federation, InProcessNode, write_config
from tests.outbound_files import binary_stl
from yigong.v1 import query_pb2, query_pb2_grpc, transfer_pb2, transfer_pb2_grpc

Pair = tuple[InProcessNode, InProcessNode]
UNAVAILABLE, UNAUTHENTICATED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
CRL_RELOAD_WAIT = 1.2  # the trust store looks at the CRL file at most once per second


def _channel(node: InProcessNode, creds: ClientCredentials | grpc.ChannelCredentials) -> Any:
    """A channel to ``node`` that pins its node id, presenting ``creds``."""
    node_id = node.node.cfg.node.id
    if isinstance(creds, ClientCredentials):
        return open_channel(node.address, creds, peer_node_id=node_id)
    options = [("grpc.ssl_target_name_override", node_dns_name(node_id))]
    return grpc.secure_channel(node.address, creds, options=options)


def _health(ch: grpc.Channel) -> int:
    req = health_pb2.HealthCheckRequest()
    return health_pb2_grpc.HealthStub(ch).Check(req, timeout=5).status


def _list_objects(ch: grpc.Channel) -> query_pb2.ListObjectsResponse:
    return query_pb2_grpc.QueryStub(ch).ListObjects(query_pb2.ListObjectsRequest(), timeout=5)


def _refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _events(node: InProcessNode, event: str) -> list[Any]:
    return node.node.audit.events(event=event)


def _expired(federation: Federation) -> ClientCredentials:
    past = datetime.now(UTC) - timedelta(days=2)
    issued = federation.person(
        "sec-old", "engineer", "factory-1", not_before=past, not_after=past + timedelta(days=1)
    )
    return federation.creds(issued)


def _foreign(federation: Federation, tmp_path: Path) -> ClientCredentials:
    """Trusts our CA (so it accepts the node) but presents a certificate of another CA
    that has the same federation name and issued the same kind of identity."""
    other = Federation(tmp_path / "other-federation")
    issued = other.person("sec-eve", "engineer", "factory-1")
    cert, key = issued.cert_path.read_bytes(), issued.key_path.read_bytes()
    return ClientCredentials(federation.ca.read_bytes(), cert, key)


def _handshake_creds(case: str, federation: Federation, tmp_path: Path) -> Any:
    if case == "no-certificate":
        return grpc.ssl_channel_credentials(root_certificates=federation.ca.read_bytes())
    return _foreign(federation, tmp_path) if case == "other-ca" else _expired(federation)


# --------------------------------------------------------------------------- TLS handshake


@pytest.mark.parametrize("case", ["no-certificate", "other-ca", "expired"])
def test_handshake_refuses_missing_foreign_or_expired_client_certificate(
    pair: Pair, federation: Federation, tmp_path: Path, case: str
) -> None:
    """The handshake ends the connection before any handler runs, and is audited.

    The node's TLS terminator refuses it (tests/test_handshake_audit.py: each kind).
    With TLS 1.3 the client only sees the socket close: UNAVAILABLE '... Socket closed'."""
    _, factory = pair
    with _channel(factory, _handshake_creds(case, federation, tmp_path)) as ch:
        err = _refused(lambda: _health(ch))
    assert err.code() == UNAVAILABLE
    assert "Socket closed" in err.details()
    events = _events(factory, AUTH_REFUSED)
    assert events and all(e.details["stage"] == "tls_handshake" for e in events)
    assert "method" not in events[0].details  # refused before any handler ran


@pytest.mark.parametrize(
    ("case", "hint"),
    [
        ("no-certificate", "client certificate"),
        ("other-ca", "federation CA"),
        ("expired", "expired"),
    ],
)
def test_handshake_refusal_translated_to_authentication_error(
    pair: Pair, federation: Federation, tmp_path: Path, case: str, hint: str
) -> None:
    _, factory = pair
    with _channel(factory, _handshake_creds(case, federation, tmp_path)) as ch:
        err = _refused(lambda: _health(ch))
    translated = error_from_rpc(err, f"node factory-1 at {factory.address}")
    assert isinstance(translated, AuthenticationError)
    assert hint in str(translated)


def test_client_of_another_federation_refuses_our_node(pair: Pair, tmp_path: Path) -> None:
    """The mirror case: a client trusting another CA refuses the node's certificate."""
    _, factory = pair
    other = Federation(tmp_path / "other-federation")
    with _channel(factory, other.creds(other.person("sec-eve", "engineer", "factory-1"))) as ch:
        err = _refused(lambda: _health(ch))
    assert err.code() == UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in err.details()
    translated = error_from_rpc(err, "node factory-1")
    assert isinstance(translated, AuthenticationError)
    assert "not trusted by our federation CA" in str(translated)


def test_client_pinning_another_node_id_refuses_the_server(
    pair: Pair, federation: Federation
) -> None:
    """factory-1's certificate does not pass for hospital-1: no impersonation by address."""
    _, factory = pair
    creds = federation.creds(federation.person("sec-pin", "engineer", "factory-1"))
    with open_channel(factory.address, creds, peer_node_id="hospital-1") as ch:
        err = _refused(lambda: _list_objects(ch))
    assert err.code() == UNAVAILABLE
    assert "Hostname Verification Check failed" in err.details()
    with open_channel(factory.address, creds, peer_node_id="factory-1") as ch:
        _list_objects(ch)  # same certificate, right pin: accepted


def test_wrong_node_pin_translated_to_authentication_error(
    pair: Pair, federation: Federation
) -> None:
    _, factory = pair
    creds = federation.creds(federation.person("sec-pin", "engineer", "factory-1"))
    with NodeClient(factory.address, creds, node_id="hospital-1", timeout=5) as client:
        with pytest.raises(YigongError) as err:
            client.list_objects()
    assert isinstance(err.value, AuthenticationError)
    assert "hospital-1" in str(err.value) and "certificate" in str(err.value)


# --------------------------------------------------------------------------- per-call checks


def test_certificate_expiring_mid_connection_is_refused_per_call(
    pair: Pair, federation: Federation
) -> None:
    """TLS checked validity once, at the handshake; the gatekeeper checks it every call."""
    _, factory = pair
    issued = federation.person(
        "sec-brief", "engineer", "factory-1", not_after=datetime.now(UTC) + timedelta(seconds=3)
    )
    expires = pki.load_certificate(issued.cert_path).not_valid_after_utc
    with _channel(factory, federation.creds(issued)) as ch:
        _list_objects(ch)
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.3)
        err = _refused(lambda: _list_objects(ch))  # same channel, same TLS connection
    assert err.code() == UNAUTHENTICATED
    assert f"certificate for sec-brief (serial {issued.serial:x}) expired at" in err.details()
    assert pki.iso(expires) in err.details()
    assert isinstance(error_from_rpc(err, "node factory-1"), AuthenticationError)
    (event,) = _events(factory, AUTH_REFUSED)
    assert event.outcome == "failure" and event.details["reason"] == "ExpiredCertificate"


def _revoke_while_connected(
    factory: InProcessNode, federation: Federation, person: str
) -> tuple[grpc.RpcError, int]:
    issued = federation.person(person, "engineer", "factory-1")
    with _channel(factory, federation.creds(issued)) as ch:
        _list_objects(ch)
        pki.revoke(federation.ca_dir, issued.serial, "key_compromise")
        time.sleep(CRL_RELOAD_WAIT)
        return _refused(lambda: _list_objects(ch)), issued.serial


def test_revoked_certificate_refused_on_open_connection_and_audited(
    pair: Pair, federation: Federation
) -> None:
    _, factory = pair
    err, serial = _revoke_while_connected(factory, federation, "sec-revoked")
    assert err.code() == UNAUTHENTICATED
    assert f"certificate for sec-revoked (serial {serial:x}) was revoked at" in err.details()
    assert "(reason: key_compromise)" in err.details()
    # gRPC has no CRL option: a new connection gets through TLS, then the gatekeeper refuses it
    issued = federation.person("sec-revoked", "engineer", "factory-1")
    with _channel(factory, federation.creds(issued)) as ch:
        again = _refused(lambda: _health(ch))
    assert again.code() == UNAUTHENTICATED and "was revoked" in again.details()
    events = _events(factory, AUTH_REFUSED)
    assert [e.details["reason"] for e in events] == ["RevokedCertificate"] * 2
    assert events[0].details["method"] == "/yigong.v1.Query/ListObjects"
    assert events[1].details["method"] == "/grpc.health.v1.Health/Check"
    assert all(e.outcome == "failure" and e.details["remote"] for e in events)


def test_auth_refusal_audit_names_the_refused_certificate(
    pair: Pair, federation: Federation
) -> None:
    _, factory = pair
    _, serial = _revoke_while_connected(factory, federation, "sec-revoked-2")
    (event,) = _events(factory, AUTH_REFUSED)
    assert f"{serial:x}" in f"{event.actor} {event.details}"


# --------------------------------------------------------------------------- authorization


def test_role_and_organisation_refusals(pair: Pair, federation: Federation) -> None:
    hospital, factory = pair
    officer = federation.creds(federation.person("sec-olga", "officer", "factory-1"))
    engineer = federation.creds(federation.person("sec-eng", "engineer", "factory-1"))
    hospital2 = federation.creds(federation.node("hospital-2", "hospital"))

    with _channel(factory, officer) as ch:
        req = query_pb2.ReadObjectRequest(object_id="0" * 64)
        err = _refused(lambda: list(query_pb2_grpc.QueryStub(ch).ReadObject(req, timeout=5)))
    assert err.code() == DENIED
    assert err.details() == (
        "not allowed to call /yigong.v1.Query/ReadObject on node factory-1: "
        "officer:sec-olga@factory-1 acts as 'officer'; allowed: clinician, engineer, self"
    )
    assert isinstance(error_from_rpc(err, "node factory-1"), PermissionDenied)

    with _channel(hospital, engineer) as ch:
        err = _refused(lambda: _list_objects(ch))
    assert err.code() == DENIED
    assert err.details() == (
        "not allowed to call /yigong.v1.Query/ListObjects on node hospital-1: "
        "engineer:sec-eng@factory-1 belongs to node 'factory-1', not 'hospital-1'; "
        "use a certificate issued for this node's organisation"
    )

    with _channel(hospital, hospital2) as ch:
        offer = transfer_pb2.OfferRequest(transfer_id="t-1")
        err = _refused(lambda: transfer_pb2_grpc.TransferStub(ch).Offer(offer, timeout=5))
    assert err.code() == DENIED
    assert err.details() == (
        "not allowed to call /yigong.v1.Transfer/Offer on node hospital-1: "
        "node:hospital-2 is a hospital node; hospital nodes exchange data only with factory nodes"
    )

    with _channel(factory, engineer) as ch:
        err = _refused(lambda: transfer_pb2_grpc.TransferStub(ch).Push(iter([]), timeout=5))
    assert err.code() == DENIED
    assert err.details() == (
        "not allowed to call /yigong.v1.Transfer/Push on node factory-1: "
        "engineer:sec-eng@factory-1 acts as 'engineer'; allowed: peer"
    )

    def refusals(node: InProcessNode) -> list[tuple[str | None, object]]:
        return [(e.actor, e.details["method"]) for e in _events(node, AUTHZ_REFUSED)]

    assert refusals(factory) == [
        ("officer:sec-olga@factory-1", "/yigong.v1.Query/ReadObject"),
        ("engineer:sec-eng@factory-1", "/yigong.v1.Transfer/Push"),
    ]
    assert refusals(hospital) == [
        ("engineer:sec-eng@factory-1", "/yigong.v1.Query/ListObjects"),
        ("node:hospital-2", "/yigong.v1.Transfer/Offer"),
    ]
    assert _events(factory, AUTH_REFUSED) == _events(hospital, AUTH_REFUSED) == []


def test_allowed_calls_succeed(pair: Pair, federation: Federation, tmp_path: Path) -> None:
    hospital, factory = pair
    engineer = federation.creds(federation.person("sec-eng", "engineer", "factory-1"))
    with factory.client(engineer) as client:
        assert client.list_objects() == []
    src = tmp_path / "design.stl"
    src.write_bytes(binary_stl())  # typed and mesh-checked from its content
    with hospital.self_client() as client:
        reply = client.submit(src, [])
    assert reply.object.size == src.stat().st_size and list(reply.queued) == []

    # health: any valid federation certificate, even one refused everywhere else
    hospital2 = federation.creds(federation.node("hospital-2", "hospital"))
    for creds in (engineer, hospital2):
        with _channel(hospital, creds) as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING

    with _channel(factory, engineer) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([ask]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert {"yigong.v1.Transfer", "yigong.v1.Query", "yigong.v1.Exchange"} <= names
    assert _events(factory, AUTHZ_REFUSED) == _events(hospital, AUTHZ_REFUSED) == []


# --------------------------------------------------------------------------- revocation list


@pytest.fixture
def crl_node(federation: Federation, tmp_path: Path) -> Any:
    """factory-1 reading its own copy of the federation CRL (tampered with by the test)."""
    crl = tmp_path / "node-crl.pem"
    crl.write_bytes(federation.crl.read_bytes())
    config = write_config(federation, tmp_path / "crl-node", "factory-1", "factory")
    config.write_text(config.read_text().replace(str(federation.crl), str(crl)))
    node = InProcessNode(config)
    yield node, crl, config
    node.stop()


def test_tampered_crl_fails_closed(
    crl_node: tuple[InProcessNode, Path, Path], federation: Federation, tmp_path: Path
) -> None:
    node, crl, config = crl_node
    good = crl.read_bytes()
    creds = federation.creds(federation.person("sec-eng", "engineer", "factory-1"))
    other = Federation(tmp_path / "other-federation")
    with _channel(node, creds) as ch:
        _list_objects(ch)
        crl.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
        time.sleep(CRL_RELOAD_WAIT)
        garbage = _refused(lambda: _list_objects(ch))
        crl.write_bytes(other.crl.read_bytes())  # well-formed, signed by another CA
        time.sleep(CRL_RELOAD_WAIT)
        foreign = _refused(lambda: _health(ch))
        crl.write_bytes(good)
        time.sleep(CRL_RELOAD_WAIT)
        _list_objects(ch)  # the CA's CRL is back: accepted again
    assert garbage.code() == foreign.code() == UNAVAILABLE  # PKIError: fail closed, retry later
    for err in (garbage, foreign):  # callers learn which node is at fault, not its files
        assert err.details() == (
            "node factory-1 cannot check certificate revocation: its revocation list is "
            "unusable; calls are refused until its operator installs the federation CA's "
            "current crl.pem"
        )
    reasons = [e.details["reason"] for e in _events(node, AUTH_REFUSED)]
    assert reasons == ["NotReady", "NotReady"]
    crl.write_bytes(b"garbage")
    with pytest.raises(PKIError, match="is not a PEM revocation list"):
        InProcessNode(config)  # and a node does not start on an unusable CRL


def test_unusable_crl_refusal_names_the_node_not_its_files(
    crl_node: tuple[InProcessNode, Path, Path], federation: Federation
) -> None:
    node, crl, _ = crl_node
    creds = federation.creds(federation.person("sec-eng", "engineer", "factory-1"))
    crl.write_bytes(b"garbage")
    time.sleep(CRL_RELOAD_WAIT)
    with _channel(node, creds) as ch:
        err = _refused(lambda: _list_objects(ch))
    assert "node factory-1" in err.details() and "revocation" in err.details()
    assert str(crl) not in err.details()
