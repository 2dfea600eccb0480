"""Tests of the federation PKI (gateway.pki) and the ``yigong pki`` commands."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import pki
from gateway.errors import (
    BadSignature,
    CertificateError,
    ExpiredCertificate,
    PKIError,
    RevokedCertificate,
    UntrustedCertificate,
)
from gateway.identity import node_dns_name
from yigong_node.cli import main

FED = "testfed"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ca"
    pki.create_ca(d, FED)
    return d


@pytest.fixture
def node(ca_dir: Path, tmp_path: Path) -> pki.IssuedCert:
    return pki.issue_node_cert(ca_dir, "hospital-1", "hospital", "cn-east", tmp_path / "h1")


def store(ca_dir: Path, **kwargs: float) -> pki.TrustStore:
    return pki.TrustStore(ca_dir / "ca.crt", ca_dir / "crl.pem", **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- CA


def test_create_ca_writes_layout(ca_dir: Path) -> None:
    assert {p.name for p in ca_dir.iterdir()} >= {"ca.crt", "ca.key", "crl.pem", "index.json"}
    assert mode_of(ca_dir / "ca.key") == 0o600
    cert = pki.load_certificate(ca_dir / "ca.crt")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        f"{FED} federation CA"
    )
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert len(crl) == 0
    assert crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
    assert json.loads((ca_dir / "index.json").read_text())["certificates"] == []
    assert pki.TrustStore(ca_dir / "ca.crt").federation_name == FED


def test_create_ca_refuses_to_overwrite(ca_dir: Path) -> None:
    key_before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(PKIError) as err:
        pki.create_ca(ca_dir, "other")
    assert str(ca_dir / "ca.key") in str(err.value)
    assert "will not overwrite" in str(err.value)
    assert (ca_dir / "ca.key").read_bytes() == key_before


def test_ca_key_is_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        pki.create_ca(tmp_path / "ca", FED)
        issued = pki.issue_person_cert(
            tmp_path / "ca", "bob", "officer", "hospital-1", tmp_path / "bob"
        )
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "ca" / "ca.key") == 0o600
    assert mode_of(issued.key_path) == 0o600


# ----------------------------------------------------------------------------- issuing


def test_node_files_modes_and_no_ca_key_copied(ca_dir: Path, node: pki.IssuedCert) -> None:
    out = node.cert_path.parent
    assert {p.name for p in out.iterdir()} == {"hospital-1.crt", "hospital-1.key", "ca.crt"}
    assert mode_of(node.key_path) == 0o600
    assert node.ca_path.read_bytes() == (ca_dir / "ca.crt").read_bytes()
    ca_key = (ca_dir / "ca.key").read_bytes()
    for f in out.iterdir():
        assert f.read_bytes() != ca_key
    assert b"PRIVATE KEY" not in node.ca_path.read_bytes()
    assert pki.load_certificate(node.cert_path).serial_number == node.serial


def test_issue_refuses_to_overwrite_key(ca_dir: Path, node: pki.IssuedCert) -> None:
    before = node.key_path.read_bytes()
    with pytest.raises(PKIError, match="will not overwrite") as err:
        pki.issue_node_cert(ca_dir, "hospital-1", "hospital", "cn-east", node.key_path.parent)
    assert str(node.key_path) in str(err.value)
    assert node.key_path.read_bytes() == before
    assert len(pki.read_index(ca_dir)) == 1


def test_node_identity_round_trip(ca_dir: Path, node: pki.IssuedCert) -> None:
    cert = pki.load_certificate(node.cert_path)
    ident = store(ca_dir).verify(cert)
    assert (ident.kind, ident.subject_id, ident.role) == ("node", "hospital-1", "hospital")
    assert (ident.region, ident.org_node, ident.serial) == ("cn-east", "hospital-1", node.serial)
    assert ident.label() == "node:hospital-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [node_dns_name("hospital-1"), "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == FED
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-1"
    [record] = pki.read_index(ca_dir)
    assert (record.serial_int, record.kind, record.id, record.region) == (
        node.serial,
        "node",
        "hospital-1",
        "cn-east",
    )


def test_person_identity_round_trip(ca_dir: Path, tmp_path: Path) -> None:
    issued = pki.issue_person_cert(ca_dir, "alice", "engineer", "factory-1", tmp_path / "a")
    cert = pki.load_certificate(issued.cert_path)
    ident = store(ca_dir).verify_pem(issued.cert_path.read_bytes())
    assert (ident.kind, ident.subject_id, ident.role, ident.org_node, ident.region) == (
        "person",
        "alice",
        "engineer",
        "factory-1",
        None,
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.read_index(ca_dir)[0].org == "factory-1"


def test_hostnames_and_bad_input(ca_dir: Path, tmp_path: Path) -> None:
    issued = pki.issue_node_cert(
        ca_dir,
        "factory-1",
        "factory",
        "cn-south",
        tmp_path / "f",
        hostnames=["gw.example.org", "::1", "10.0.0.7"],
    )
    san = (
        pki.load_certificate(issued.cert_path)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert san.get_values_for_type(x509.DNSName) == ["factory-1.node.yigong", "gw.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ip_address("::1"), ip_address("10.0.0.7")]
    with pytest.raises(PKIError, match="bad host"):
        pki.issue_node_cert(ca_dir, "n2", "factory", "r", tmp_path / "n2", hostnames=["bad host"])
    with pytest.raises(CertificateError, match="node role"):
        pki.issue_node_cert(ca_dir, "n3", "clinician", "r", tmp_path / "n3")
    with pytest.raises(CertificateError, match="Bad_Id"):
        pki.issue_person_cert(ca_dir, "Bad_Id", "clinician", "hospital-1", tmp_path / "p")


def test_certificate_never_outlives_ca(tmp_path: Path) -> None:
    pki.create_ca(tmp_path / "ca", FED, valid_days=30)
    issued = pki.issue_node_cert(tmp_path / "ca", "n1", "factory", "r1", tmp_path / "n1")
    ca = pki.load_certificate(tmp_path / "ca" / "ca.crt")
    assert pki.load_certificate(issued.cert_path).not_valid_after_utc == ca.not_valid_after_utc


# ----------------------------------------------------------------------------- trust store


def test_refuses_certificate_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    # Same federation name, different key: the name matches, the signature does not.
    pki.create_ca(tmp_path / "evil", FED)
    rogue = pki.issue_node_cert(
        tmp_path / "evil", "hospital-1", "hospital", "cn-east", tmp_path / "rogue"
    )
    with pytest.raises(UntrustedCertificate) as err:
        store(ca_dir).verify_pem(rogue.cert_path.read_bytes())
    msg = str(err.value)
    assert "hospital-1" in msg and f"{rogue.serial:x}" in msg
    assert f"not issued by federation CA '{FED}'" in msg


def test_refuses_the_ca_certificate_itself(ca_dir: Path) -> None:
    with pytest.raises(UntrustedCertificate, match="federation CA itself"):
        store(ca_dir).verify(pki.load_certificate(ca_dir / "ca.crt"))


def test_refuses_expired_and_not_yet_valid(ca_dir: Path, tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    day = timedelta(days=1)
    old = pki.issue_node_cert(
        ca_dir,
        "old-node",
        "factory",
        "r1",
        tmp_path / "o",
        not_before=now - 10 * day,
        not_after=now - day,
    )
    new = pki.issue_node_cert(
        ca_dir,
        "new-node",
        "factory",
        "r1",
        tmp_path / "n",
        not_before=now + day,
        not_after=now + 9 * day,
    )
    ts = store(ca_dir)
    with pytest.raises(ExpiredCertificate) as err:
        ts.verify(pki.load_certificate(old.cert_path))
    assert "old-node" in str(err.value) and f"{old.serial:x}" in str(err.value)
    assert f"expired at {pki.iso(now - timedelta(days=1))}" in str(err.value)
    with pytest.raises(ExpiredCertificate) as err:
        ts.verify_pem(new.cert_path.read_bytes())
    assert "new-node" in str(err.value)
    assert f"not valid before {pki.iso(now + timedelta(days=1))}" in str(err.value)
    # the same certificate is fine at an instant inside its window
    assert ts.verify_pem(new.cert_path.read_bytes(), at=now + timedelta(days=2)).subject_id == (
        "new-node"
    )


def test_validity_rechecked_on_every_cached_call(ca_dir: Path, node: pki.IssuedCert) -> None:
    ts, pem = store(ca_dir), node.cert_path.read_bytes()
    ident = ts.verify_pem(pem)
    assert ts.verify_pem(pem) is ident  # cached
    with pytest.raises(ExpiredCertificate, match="hospital-1"):
        ts.verify_pem(pem, at=ident.not_after + timedelta(seconds=1))


def test_refuses_revoked_after_crl_reload(ca_dir: Path, node: pki.IssuedCert) -> None:
    ts = store(ca_dir, crl_check_interval=0)
    pem = node.cert_path.read_bytes()
    der = pki.load_certificate(node.cert_path).public_bytes(serialization.Encoding.DER)
    assert ts.verify_pem(pem).subject_id == "hospital-1"
    assert ts.verify_der(der).subject_id == "hospital-1"
    assert pki.revoke(ca_dir, node.serial, "key_compromise") == ca_dir / "crl.pem"
    for call in (lambda: ts.verify_pem(pem), lambda: ts.verify_der(der)):
        with pytest.raises(RevokedCertificate) as err:
            call()
        assert f"{node.serial:x}" in str(err.value) and "was revoked at" in str(err.value)
        assert "key_compromise" in str(err.value)
    [record] = pki.read_index(ca_dir)
    assert record.revoked and record.revocation_reason == "key_compromise" and record.revoked_at
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(node.serial) is not None
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)


def test_crl_change_noticed_at_most_once_per_interval(ca_dir: Path, node: pki.IssuedCert) -> None:
    ts = store(ca_dir, crl_check_interval=3600)
    pem = node.cert_path.read_bytes()
    ts.verify_pem(pem)
    pki.revoke(ca_dir, node.serial)
    ts.verify_pem(pem)  # not looked at the file yet
    ts.reload_crl()
    with pytest.raises(RevokedCertificate, match=f"{node.serial:x}"):
        ts.verify_pem(pem)


def test_revoke_errors(ca_dir: Path, node: pki.IssuedCert) -> None:
    with pytest.raises(PKIError, match="serial abc123 was not issued"):
        pki.revoke(ca_dir, 0xABC123)
    with pytest.raises(PKIError, match="unknown revocation reason"):
        pki.revoke(ca_dir, node.serial, "because")
    pki.revoke(ca_dir, node.serial, "superseded")
    with pytest.raises(PKIError, match=f"{node.serial:x}.*already revoked"):
        pki.revoke(ca_dir, node.serial)
    assert pki.serial_of_cert_file(node.cert_path) == node.serial


def test_crl_not_signed_by_ca_is_refused_and_keeps_refusing(
    ca_dir: Path, node: pki.IssuedCert, tmp_path: Path
) -> None:
    pki.create_ca(tmp_path / "evil", FED)  # same issuer name, other key
    good_crl = (ca_dir / "crl.pem").read_bytes()
    forged = (tmp_path / "evil" / "crl.pem").read_bytes()
    ts = store(ca_dir, crl_check_interval=0)
    pem = node.cert_path.read_bytes()
    ts.verify_pem(pem)
    (ca_dir / "crl.pem").write_bytes(forged)
    for _ in range(2):
        with pytest.raises(PKIError, match="not signed by federation CA") as err:
            ts.verify_pem(pem)
        assert not isinstance(err.value, RevokedCertificate)
    (ca_dir / "crl.pem").write_bytes(good_crl + b"\n")  # a verified CRL again: recovers
    assert ts.verify_pem(pem).subject_id == "hospital-1"
    (ca_dir / "crl.pem").write_bytes(forged)
    with pytest.raises(PKIError, match=re.escape(str(ca_dir / "crl.pem"))):
        store(ca_dir)


def test_rolled_back_crl_does_not_unrevoke(ca_dir: Path, node: pki.IssuedCert) -> None:
    ts, pem = store(ca_dir, crl_check_interval=0), node.cert_path.read_bytes()
    before = (ca_dir / "crl.pem").read_bytes()
    pki.revoke(ca_dir, node.serial)
    with pytest.raises(RevokedCertificate):
        ts.verify_pem(pem)
    (ca_dir / "crl.pem").write_bytes(before)  # validly signed, but older
    with pytest.raises(PKIError, match="number 1, older than the loaded 2") as err:
        ts.verify_pem(pem)
    assert not isinstance(err.value, RevokedCertificate)


def test_tampered_crl_bytes_are_refused(ca_dir: Path) -> None:
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    der = bytearray(crl.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_crl(bytes(der)).public_bytes(serialization.Encoding.PEM)
    (ca_dir / "crl.pem").write_bytes(tampered)
    with pytest.raises(PKIError, match="not signed by federation CA"):
        store(ca_dir)


def test_missing_crl(ca_dir: Path, node: pki.IssuedCert) -> None:
    ts = store(ca_dir, crl_check_interval=0)
    (ca_dir / "crl.pem").unlink()
    with pytest.raises(PKIError, match="does not exist"):
        ts.verify_pem(node.cert_path.read_bytes())
    with pytest.raises(PKIError, match=re.escape(str(ca_dir / "crl.pem"))):
        store(ca_dir)


def test_certificate_without_yigong_sans_is_refused(ca_dir: Path) -> None:
    ca_cert = pki.load_certificate(ca_dir / "ca.crt")
    ca_key = pki.load_private_key(ca_dir / "ca.key")
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(0x5EED)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
    )
    bare = builder.sign(ca_key, hashes.SHA256())
    dns_only = builder.add_extension(
        x509.SubjectAlternativeName([x509.DNSName("plain.example")]), critical=False
    ).sign(ca_key, hashes.SHA256())
    ts = store(ca_dir)
    with pytest.raises(CertificateError, match="5eed has no subjectAltName"):
        ts.verify(bare)
    with pytest.raises(CertificateError, match="5eed must name exactly one node or person"):
        ts.verify(dns_only)


def test_verify_der_garbage_and_bounded_cache(ca_dir: Path, tmp_path: Path) -> None:
    ts = pki.TrustStore(ca_dir / "ca.crt", ca_dir / "crl.pem", cache_size=2)
    with pytest.raises(CertificateError, match="cannot be parsed"):
        ts.verify_der(b"not a certificate")
    for i in range(4):
        issued = pki.issue_person_cert(ca_dir, f"p{i}", "clinician", "hospital-1", tmp_path / "p")
        assert ts.verify_pem(issued.cert_path.read_bytes()).subject_id == f"p{i}"
    assert len(ts._cache) <= 2


def test_concurrent_verification(ca_dir: Path, node: pki.IssuedCert) -> None:
    ts, pem, errors = store(ca_dir, crl_check_interval=0), node.cert_path.read_bytes(), []

    def work() -> None:
        try:
            for _ in range(100):
                ts.verify_pem(pem)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ----------------------------------------------------------------------------- files, signatures


def test_load_errors_name_the_file(
    ca_dir: Path, node: pki.IssuedCert, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(PKIError, match=re.escape(f"{tmp_path / 'nope.crt'} does not exist")):
        pki.load_certificate(tmp_path / "nope.crt")
    with pytest.raises(PKIError, match=re.escape(f"{node.key_path} holds a private key")):
        pki.load_certificate(node.key_path)
    with pytest.raises(PKIError, match=re.escape(f"{node.cert_path} holds a certificate")):
        pki.load_private_key(node.cert_path)
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(PKIError, match=r"junk\.pem holds no PEM certificate"):
        pki.load_certificate(tmp_path / "junk.pem")
    node.key_path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="gateway.pki"):
        pki.load_private_key(node.key_path)
    assert any(
        str(node.key_path) in r.getMessage() and "644" in r.getMessage() for r in caplog.records
    )


def test_sign_and_verify(ca_dir: Path, node: pki.IssuedCert, tmp_path: Path) -> None:
    key = pki.load_private_key(node.key_path)
    cert = pki.load_certificate(node.cert_path)
    sig = pki.sign(key, b"receipt")
    pki.verify_signature(cert, b"receipt", sig)
    with pytest.raises(BadSignature) as err:
        pki.verify_signature(cert, b"receipt!", sig)
    assert "hospital-1" in str(err.value) and f"{node.serial:x}" in str(err.value)
    other = pki.issue_node_cert(ca_dir, "factory-1", "factory", "r", tmp_path / "f")
    with pytest.raises(BadSignature, match="factory-1"):
        pki.verify_signature(pki.load_certificate(other.cert_path), b"receipt", sig)
    with pytest.raises(BadSignature):
        pki.verify_signature(cert, b"receipt", b"\x00garbage")


# ----------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert main(["pki", "init-ca", "--dir", str(ca), "--federation", FED]) == 0
    out = capsys.readouterr().out
    assert f"wrote {ca / 'ca.crt'}" in out and f"wrote {ca / 'ca.key'}" in out

    assert main(["pki", "init-ca", "--dir", str(ca), "--federation", FED]) == 2
    assert "will not overwrite" in capsys.readouterr().err

    assert (
        main(
            [
                "pki",
                "issue-node",
                "--ca-dir",
                str(ca),
                "--id",
                "hospital-1",
                "--role",
                "hospital",
                "--region",
                "cn-east",
                "--out",
                str(tmp_path / "h1"),
                "--hostname",
                "gw.example.org",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'h1' / 'hospital-1.key'}" in out
    san = (
        pki.load_certificate(tmp_path / "h1" / "hospital-1.crt")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert "localhost" not in san.get_values_for_type(x509.DNSName)

    assert (
        main(
            [
                "pki",
                "issue-person",
                "--ca-dir",
                str(ca),
                "--id",
                "alice",
                "--role",
                "engineer",
                "--org",
                "factory-1",
                "--out",
                str(tmp_path / "alice"),
                "--days",
                "30",
            ]
        )
        == 0
    )
    assert f"wrote {tmp_path / 'alice' / 'alice.crt'}" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # argparse choices
        main(
            [
                "pki",
                "issue-person",
                "--ca-dir",
                str(ca),
                "--id",
                "bob",
                "--role",
                "hospital",
                "--org",
                "h",
                "--out",
                str(tmp_path / "bob"),
            ]
        )
    capsys.readouterr()

    assert main(["pki", "list", "--ca-dir", str(ca), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["kind"], e["id"], e["role"], e["revoked"]) for e in listed] == [
        ("node", "hospital-1", "hospital", False),
        ("person", "alice", "engineer", False),
    ]
    alice_serial = listed[1]["serial"]

    assert main(["pki", "revoke", "--ca-dir", str(ca), "--serial", alice_serial]) == 1
    captured = capsys.readouterr()
    assert "would revoke" in captured.out and alice_serial in captured.out
    assert "alice" in captured.out and "--yes" in captured.err
    assert not pki.read_index(ca)[1].revoked

    assert (
        main(
            [
                "pki",
                "revoke",
                "--ca-dir",
                str(ca),
                "--cert",
                str(tmp_path / "alice" / "alice.crt"),
                "--reason",
                "privilege_withdrawn",
                "--yes",
            ]
        )
        == 0
    )
    assert f"wrote {ca / 'crl.pem'}" in capsys.readouterr().out
    assert main(["pki", "revoke", "--ca-dir", str(ca), "--serial", alice_serial, "--yes"]) == 2
    assert "already revoked" in capsys.readouterr().err
    assert main(["pki", "revoke", "--ca-dir", str(ca), "--serial", "dead:beef", "--yes"]) == 2
    assert "serial deadbeef was not issued" in capsys.readouterr().err

    assert main(["pki", "list", "--ca-dir", str(ca)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["SERIAL", "KIND", "ID", "ROLE", "REGION/ORG", "EXPIRES", "REVOKED"]
    assert alice_serial in table[2] and "privilege_withdrawn" in table[2]
    assert main(["pki", "list", "--ca-dir", str(ca), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["revoked"] is True

    with pytest.raises(RevokedCertificate, match=alice_serial):
        store(ca).verify_pem((tmp_path / "alice" / "alice.crt").read_bytes())

    assert main(["pki", "show", str(tmp_path / "h1" / "hospital-1.crt"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["kind"], shown["id"], shown["role"], shown["region"], shown["status"]) == (
        "node",
        "hospital-1",
        "hospital",
        "cn-east",
        "valid",
    )
    assert main(["pki", "show", str(tmp_path / "alice" / "alice.crt")]) == 0
    assert "engineer:alice@factory-1" in capsys.readouterr().out
    assert main(["pki", "show", str(ca / "ca.crt"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["kind"], shown["federation"]) == ("ca", FED)


# ----------------------------------------------------------------------------- browser PKCS#12

P12_ENV = "YIGONG_P12_PASSWORD"


def issue_alice(ca: Path, out: Path, *extra: str) -> int:
    """``yigong pki issue-person`` for engineer alice of factory-1, through the real CLI."""
    argv = ["pki", "issue-person", "--ca-dir", str(ca), "--id", "alice", "--role", "engineer"]
    return main([*argv, "--org", "factory-1", "--out", str(out), *extra])


def check_p12(out: Path, ca: Path, password: bytes) -> None:
    """``out/alice.p12`` opens with ``password`` and holds alice's cert, its key, the CA."""
    p12 = pkcs12.load_pkcs12((out / "alice.p12").read_bytes(), password)
    assert p12.cert is not None and p12.key is not None
    assert p12.cert.certificate == pki.load_certificate(out / "alice.crt")
    assert p12.cert.friendly_name == b"engineer:alice@factory-1"
    assert isinstance(p12.key, ec.EllipticCurvePrivateKey)
    assert p12.key.public_key() == p12.cert.certificate.public_key()
    assert p12.key.private_numbers() == pki.load_private_key(out / "alice.key").private_numbers()
    assert [c.certificate for c in p12.additional_certs] == [pki.load_certificate(ca / "ca.crt")]
    assert mode_of(out / "alice.p12") == 0o600


def test_issue_person_writes_a_browser_p12_with_a_generated_password(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """issue-person writes <id>.p12 (cert, key, CA, label as friendly name; 0600).

    Its password is generated, kept in <id>.p12.password (0600) and never printed."""
    monkeypatch.delenv(P12_ENV, raising=False)
    out = tmp_path / "alice"
    assert issue_alice(ca_dir, out) == 0
    printed = capsys.readouterr()
    password_file = out / "alice.p12.password"
    password = password_file.read_bytes().rstrip(b"\n")
    assert len(password) >= 24 and mode_of(password_file) == 0o600
    assert f"wrote {out / 'alice.p12'}" in printed.out
    assert f"wrote {password_file}" in printed.out
    assert password.decode() not in printed.out + printed.err
    check_p12(out, ca_dir, password)
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12((out / "alice.p12").read_bytes(), b"not-the-password")

    # a second run into the same folder is refused before the CA issues anything
    (out / "alice.key").unlink()
    assert issue_alice(ca_dir, out) == 2
    assert f"{out / 'alice.p12'} already exists" in capsys.readouterr().err
    assert [r.id for r in pki.read_index(ca_dir)] == ["alice"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl on this machine")
def test_openssl_reads_the_p12_and_it_uses_pbes2_aes256_hmac_sha256(
    ca_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL's CLI opens the .p12 with the password file: PBES2/AES-256-CBC, SHA-256 MAC."""
    monkeypatch.delenv(P12_ENV, raising=False)
    out = tmp_path / "alice"
    assert issue_alice(ca_dir, out) == 0
    passin = f"file:{out / 'alice.p12.password'}"
    run = subprocess.run(
        ["openssl", "pkcs12", "-in", str(out / "alice.p12"), "-nokeys", "-info", "-passin", passin],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    info = run.stdout + run.stderr
    assert "AES-256-CBC" in info and "hmacWithSHA256" in info and "MAC: sha256" in info
    assert "friendlyName: engineer:alice@factory-1" in info
    assert info.count("BEGIN CERTIFICATE") == 2  # alice's and the CA's


def test_issue_person_p12_password_from_file_or_environment(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The .p12 password comes from --p12-password-file, else YIGONG_P12_PASSWORD.

    The file's first line counts and wins over the variable; no .p12.password is written."""
    monkeypatch.setenv(P12_ENV, "from-the-environment-1")
    pw_file = tmp_path / "pw.txt"
    pw_file.write_text("correct-horse-battery\nsecond line ignored\n")
    out = tmp_path / "by-file"
    assert issue_alice(ca_dir, out, "--p12-password-file", str(pw_file)) == 0
    assert f"password from --p12-password-file {pw_file}" in capsys.readouterr().out
    check_p12(out, ca_dir, b"correct-horse-battery")
    assert not (out / "alice.p12.password").exists()

    out = tmp_path / "by-env"
    assert issue_alice(ca_dir, out) == 0
    assert f"password from environment variable {P12_ENV}" in capsys.readouterr().out
    check_p12(out, ca_dir, b"from-the-environment-1")
    assert not (out / "alice.p12.password").exists()


def test_issue_person_refuses_an_empty_or_short_p12_password(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty, short (< 12) or non-ASCII password is refused naming its option.

    The CA issues nothing then."""
    monkeypatch.delenv(P12_ENV, raising=False)
    pw_file, out = tmp_path / "pw.txt", tmp_path / "alice"
    for content, problem in [
        ("short-pw\n", "the password has 8 characters; at least 12 needed"),
        ("\nsecond-line-is-ignored\n", "the password is empty"),
        ("", "the password is empty"),
        ("pässwörter-sind-hübsch", "the password must be printable ASCII"),
    ]:
        pw_file.write_text(content)
        assert issue_alice(ca_dir, out, "--p12-password-file", str(pw_file)) == 2
        assert f"error: --p12-password-file {pw_file}: {problem}" in capsys.readouterr().err
    assert issue_alice(ca_dir, out, "--p12-password-file", str(tmp_path / "nope")) == 2
    assert f"--p12-password-file {tmp_path / 'nope'}: cannot read it" in capsys.readouterr().err
    for value, problem in [("", "is empty"), ("eleven-char", "has 11 characters")]:
        monkeypatch.setenv(P12_ENV, value)
        assert issue_alice(ca_dir, out) == 2
        assert f"error: environment variable {P12_ENV}: the password {problem}" in (
            capsys.readouterr().err
        )
    assert pki.read_index(ca_dir) == [] and not out.exists()


def test_issue_person_no_p12(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--no-p12 writes no .p12 and no password; it cannot be combined with a password file."""
    monkeypatch.delenv(P12_ENV, raising=False)
    out = tmp_path / "alice"
    assert issue_alice(ca_dir, out, "--no-p12") == 0
    assert ".p12" not in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["alice.crt", "alice.key", "ca.crt"]
    with pytest.raises(SystemExit):
        issue_alice(ca_dir, tmp_path / "b", "--no-p12", "--p12-password-file", "x")
    assert "not allowed with argument" in capsys.readouterr().err


def test_person_pkcs12_checks_its_inputs(
    ca_dir: Path, node: pki.IssuedCert, tmp_path: Path
) -> None:
    """person_pkcs12 refuses a short password, a foreign key or CA, a node certificate."""
    alice = pki.issue_person_cert(ca_dir, "alice", "engineer", "factory-1", tmp_path / "a")
    cert, key = pki.load_certificate(alice.cert_path), pki.load_private_key(alice.key_path)
    ca_cert = pki.load_certificate(ca_dir / "ca.crt")
    data = pki.person_pkcs12(cert, key, ca_cert, b"a-long-enough-pw", "alice")
    assert pkcs12.load_pkcs12(data, b"a-long-enough-pw").cert.friendly_name == b"alice"  # type: ignore[union-attr]
    with pytest.raises(PKIError, match="at least 12 needed"):
        pki.person_pkcs12(cert, key, ca_cert, b"short", "alice")
    with pytest.raises(PKIError, match="does not belong"):
        pki.person_pkcs12(
            cert, pki.load_private_key(node.key_path), ca_cert, b"a-long-enough-pw", "x"
        )
    other_ca = pki.create_ca(tmp_path / "other", "other")
    with pytest.raises(PKIError, match="not issued by"):
        pki.person_pkcs12(cert, key, pki.load_certificate(other_ca), b"a-long-enough-pw", "x")
    with pytest.raises(PKIError, match="node certificate"):
        pki.write_person_pkcs12(node, b"a-long-enough-pw")
    path, password_path = pki.write_person_pkcs12(alice)
    assert password_path is not None and mode_of(path) == mode_of(password_path) == 0o600
