"""Federation PKI: the CA, node and person certificates, revocation, verification.

A federation has exactly one CA. Its directory (``yigong pki init-ca``) holds::

    ca.crt      CA certificate (public; copied next to every issued certificate)
    ca.key      CA private key, PEM, mode 0600: keep it offline, never on a node
    crl.pem     revocation list signed by the CA (public; every node loads it)
    index.json  what was issued: serial (hex), kind, id, role, region/org,
                validity, revoked flag + reason + time
    index.lock  lock serialising concurrent issue/revoke runs

What each certificate asserts (keys ECDSA P-256, signatures ECDSA-SHA256):

* CA: ``O=<federation>, CN=<federation> federation CA``; CA:true, pathlen 0;
  signs certificates and CRLs only.
* node: ``O=<federation>, CN=<node id>``; URI SANs from
  :func:`gateway.identity.identity_san_uris` (node id, role, region), DNS SAN
  ``<node id>.node.yigong`` plus its hostnames/IPs; serverAuth + clientAuth.
* person (or tool): ``O=<federation>, CN=<person id>``; URI SANs (person id,
  role, organisation node); clientAuth only. :func:`person_pkcs12` packs it with
  its key and the CA into a password-protected PKCS#12 for import into a browser.

:class:`TrustStore` is what a node runs per RPC: issuer + signature, validity
window, revocation, then the identity the certificate asserts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import (
    BadSignature,
    CertificateError,
    ExpiredCertificate,
    PKIError,
    RevokedCertificate,
    UntrustedCertificate,
)
from gateway.identity import Identity, identity_from_certificate, identity_san_uris, node_dns_name

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, CRL_FILE, INDEX_FILE = "ca.crt", "ca.key", "crl.pem", "index.json"
CRL_VALIDITY = timedelta(days=7)
CLOCK_SKEW = timedelta(minutes=5)  # default certificates start this long before now
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    name: x509.ReasonFlags[name]
    for name in (
        "unspecified",
        "key_compromise",
        "ca_compromise",
        "affiliation_changed",
        "superseded",
        "cessation_of_operation",
        "privilege_withdrawn",
    )
}
"""Reasons :func:`revoke` accepts (no certificate_hold: revocation is final)."""
P12_MIN_PASSWORD = 12
"""Shortest password :func:`person_pkcs12` accepts (characters)."""
P12_KDF_ROUNDS = 600_000  # PBKDF2-HMAC-SHA256 iterations (OWASP 2023); about 0.2 s
_CA_SUFFIX = " federation CA"
_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class IssuedCert:
    """Files written for a newly issued certificate."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    serial: int


@dataclass(frozen=True)
class IssuedRecord:
    """One entry of a CA's ``index.json``. Times are ISO 8601 UTC strings."""

    serial: str  # lowercase hex
    kind: Literal["node", "person"]
    id: str
    role: str
    region: str | None  # nodes
    org: str | None  # persons
    not_before: str
    not_after: str
    revoked: bool = False
    revocation_reason: str | None = None
    revoked_at: str | None = None

    @property
    def serial_int(self) -> int:
        return int(self.serial, 16)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- files


def iso(when: datetime) -> str:
    """``2025-01-31T12:00:00Z``: the timestamp format of PKI messages and files."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _utc(when: datetime) -> datetime:
    """``when`` in UTC; a naive datetime is taken to be UTC already."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _describe(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else cert.subject.rfc4514_string() or "<no subject>"
    return f"{name} (serial {cert.serial_number:x})"


def _write_private(path: Path, data: bytes, what: str = "private key") -> None:
    """Create ``path`` with mode 0600 from the start; never overwrite an existing one."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError as exc:
        raise PKIError(f"{path} already exists; will not overwrite a {what}") from exc
    except OSError as exc:
        raise PKIError(f"cannot create {what} file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    """Write ``path`` (0644) via temporary file + rename: readers never see half a file."""
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise PKIError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _mkdir(path: Path, mode: int = 0o755) -> None:
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create directory {path}: {exc.strerror}") from exc


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PKIError(f"{what} {path} does not exist") from exc
    except OSError as exc:
        raise PKIError(f"cannot read {what} {path}: {exc.strerror}") from exc


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    with open(ca_dir / "index.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed
        yield


def load_certificate(path: Path | str) -> x509.Certificate:
    """Load the first PEM certificate in ``path``."""
    path = Path(path)
    data = _read(path, "certificate file")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        what = "a private key" if b"PRIVATE KEY-----" in data else "no PEM certificate"
        raise PKIError(f"{path} holds {what}; expected a PEM certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PKIError(f"{path} holds a malformed PEM certificate: {exc}") from exc


def load_private_key(path: Path | str) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM ECDSA P-256 key; warn if group or others can read it."""
    path = Path(path)
    data = _read(path, "private key file")
    if (mode := stat.S_IMODE(path.stat().st_mode)) & 0o077:
        log.warning(
            "private key %s is readable by group/others (mode %03o); chmod 600 it", path, mode
        )
    if b"PRIVATE KEY-----" not in data:
        what = "a certificate" if b"BEGIN CERTIFICATE" in data else "no PEM private key"
        raise PKIError(f"{path} holds {what}; expected a PEM private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise PKIError(f"private key {path} is encrypted; federation keys are not") from exc
    except ValueError as exc:
        raise PKIError(f"{path} holds a malformed PEM private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise PKIError(f"private key {path} is {type(key).__name__}; expected ECDSA P-256")
    return key


def serial_of_cert_file(path: Path | str) -> int:
    """Serial number of the certificate in ``path`` (to revoke by file)."""
    return load_certificate(path).serial_number


def federation_of(ca_cert: x509.Certificate) -> str:
    """The federation name a federation CA certificate states (its O, else its CN)."""
    if orgs := ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME):
        return str(orgs[0].value)
    cns = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value).removesuffix(_CA_SUFFIX) if cns else ca_cert.subject.rfc4514_string()


# --------------------------------------------------------------------------- CA


def _ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"certificate {_describe(cert)} does not hold an ECDSA key")
    return key


def _make_cert(
    subject_id: str,
    federation: str,
    issuer: x509.Name | None,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    start: datetime,
    end: datetime,
    extra: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """A CA certificate when ``issuer`` is None (self-signed), else an end-entity one."""
    ca = issuer is None
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, subject_id),
        ]
    )
    usage = dict.fromkeys(
        (
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _build_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Sequence[x509.RevokedCertificate],
    number: int,
) -> bytes:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + CRL_VALIDITY)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(_PEM)


def _load_crl(path: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """Load ``path`` and check that ``ca_cert`` signed it."""
    data = _read(path, "revocation list")
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM revocation list: {exc}") from exc
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(_ec_public_key(ca_cert)):
        raise PKIError(
            f"revocation list {path} is not signed by federation CA "
            f"'{federation_of(ca_cert)}'; no certificate is trusted until it is "
            "replaced with the CA's crl.pem"
        )
    return crl


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


def create_ca(ca_dir: Path | str, federation: str, valid_days: int = 3650) -> Path:
    """Create a federation CA in ``ca_dir``; return the path of its ``ca.crt``."""
    ca_dir, federation = Path(ca_dir), federation.strip()
    if not federation or len(federation) > 48 or not federation.isprintable():
        raise PKIError(f"federation name {federation!r} must be 1-48 printable characters")
    if valid_days <= 0:
        raise PKIError(f"CA validity must be at least one day, not {valid_days}")
    for existing in (ca_dir / CA_KEY, ca_dir / CA_CERT):
        if existing.exists():
            raise PKIError(f"{existing} already exists; will not overwrite an existing CA")
    _mkdir(ca_dir, 0o700)
    key, now = ec.generate_private_key(ec.SECP256R1()), _now()
    cert = _make_cert(
        federation + _CA_SUFFIX,
        federation,
        None,
        key.public_key(),
        key,
        now - CLOCK_SKEW,
        now + timedelta(days=valid_days),
    )
    _write_private(ca_dir / CA_KEY, _key_pem(key))
    _write_public(ca_dir / CA_CERT, cert.public_bytes(_PEM))
    _write_public(ca_dir / CRL_FILE, _build_crl(key, cert, [], 1))
    _write_index(ca_dir, [])
    log.info("created federation CA %r in %s (serial %x)", federation, ca_dir, cert.serial_number)
    return ca_dir / CA_CERT


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def read_index(ca_dir: Path | str) -> list[IssuedRecord]:
    """Everything a CA has issued, oldest first."""
    path = Path(ca_dir) / INDEX_FILE
    try:
        return [IssuedRecord(**e) for e in json.loads(_read(path, "CA index"))["certificates"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise PKIError(f"CA index {path} is corrupt: {exc}") from exc


def find_issued(ca_dir: Path | str, serial: int) -> IssuedRecord:
    """The index entry for ``serial``; :class:`PKIError` if this CA never issued it."""
    for record in read_index(ca_dir):
        if record.serial_int == serial:
            return record
    raise PKIError(f"serial {serial:x} was not issued by the CA in {ca_dir} (not in its index)")


def _write_index(ca_dir: Path, records: list[IssuedRecord]) -> None:
    doc = {"version": 1, "certificates": [r.to_json() for r in records]}
    _write_public(ca_dir / INDEX_FILE, (json.dumps(doc, indent=2) + "\n").encode())


def _issue(
    ca_dir: Path,
    out_dir: Path,
    record: IssuedRecord,
    sans: list[x509.GeneralName],
    eku: list[x509.ObjectIdentifier],
    valid_days: int,
    not_before: datetime | None,
    not_after: datetime | None,
) -> IssuedCert:
    ca_cert, ca_key = load_certificate(ca_dir / CA_CERT), load_private_key(ca_dir / CA_KEY)
    key_path, cert_path = out_dir / f"{record.id}.key", out_dir / f"{record.id}.crt"
    if key_path.exists():
        raise PKIError(f"{key_path} already exists; will not overwrite a private key")
    if valid_days <= 0:
        raise PKIError(f"validity must be at least one day, not {valid_days}")
    start = _utc(not_before or _now() - CLOCK_SKEW)
    end = _utc(not_after or _now() + timedelta(days=valid_days))
    if end > ca_cert.not_valid_after_utc:
        log.warning(
            "certificate for %s would outlive the CA; it ends with the CA at %s",
            record.id,
            iso(ca_cert.not_valid_after_utc),
        )
        end = ca_cert.not_valid_after_utc
    if end <= start:
        raise PKIError(
            f"certificate for {record.id} would end ({iso(end)}) before it starts ({iso(start)})"
        )
    key, federation = ec.generate_private_key(ec.SECP256R1()), federation_of(ca_cert)
    cert = _make_cert(
        record.id,
        federation,
        ca_cert.subject,
        key.public_key(),
        ca_key,
        start,
        end,
        [x509.ExtendedKeyUsage(eku), x509.SubjectAlternativeName(sans)],
    )
    _mkdir(out_dir)
    _write_private(key_path, _key_pem(key))
    _write_public(cert_path, cert.public_bytes(_PEM))
    _write_public(out_dir / CA_CERT, ca_cert.public_bytes(_PEM))
    record = dataclasses.replace(
        record, serial=f"{cert.serial_number:x}", not_before=iso(start), not_after=iso(end)
    )
    with _locked(ca_dir):
        _write_index(ca_dir, [*read_index(ca_dir), record])
    log.info(
        "issued %s certificate for %s (serial %x, federation %r, until %s)",
        record.kind,
        record.id,
        cert.serial_number,
        federation,
        record.not_after,
    )
    return IssuedCert(cert_path, key_path, out_dir / CA_CERT, cert.serial_number)


def _host_name(host: str) -> x509.GeneralName:
    with contextlib.suppress(ValueError):
        return x509.IPAddress(ipaddress.ip_address(host))
    if not host or not host.isascii() or any(c.isspace() or c in "/:@" for c in host):
        raise PKIError(f"hostname {host!r} is neither an IP address nor an ASCII DNS name")
    return x509.DNSName(host.lower())


def issue_node_cert(
    ca_dir: Path | str,
    node_id: str,
    role: str,
    region: str,
    out_dir: Path | str,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    valid_days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> IssuedCert:
    """Issue a node (TLS server + client) certificate into ``out_dir``."""
    uris = identity_san_uris("node", node_id, role, region=region)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans.append(x509.DNSName(node_dns_name(node_id)))
    sans += [n for n in dict.fromkeys(map(_host_name, hostnames)) if n not in sans]
    record = IssuedRecord("", "node", node_id, role, region, None, "", "")
    return _issue(
        Path(ca_dir),
        Path(out_dir),
        record,
        sans,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        valid_days,
        not_before,
        not_after,
    )


def issue_person_cert(
    ca_dir: Path | str,
    person_id: str,
    role: str,
    org_node: str,
    out_dir: Path | str,
    valid_days: int = 365,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> IssuedCert:
    """Issue a person/tool (TLS client only) certificate into ``out_dir``."""
    uris = identity_san_uris("person", person_id, role, org_node=org_node)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    record = IssuedRecord("", "person", person_id, role, None, org_node, "", "")
    return _issue(
        Path(ca_dir),
        Path(out_dir),
        record,
        sans,
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        valid_days,
        not_before,
        not_after,
    )


def p12_password_problem(password: bytes) -> str | None:
    """Why ``password`` may not protect a PKCS#12 (too short, not printable ASCII), or None."""
    if not password:
        return "the password is empty"
    if len(password) < P12_MIN_PASSWORD:
        return f"the password has {len(password)} characters; at least {P12_MIN_PASSWORD} needed"
    if not all(0x20 < b < 0x7F for b in password):
        return (
            "the password must be printable ASCII without spaces "
            "(browsers and OpenSSL encode other characters differently)"
        )
    return None


def person_pkcs12(
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    password: bytes,
    name: str,
) -> bytes:
    """PKCS#12 (DER) of a person's certificate, its key and the federation CA, for a browser.

    ``name`` becomes the friendly name of the certificate and key. Key and certificates
    are encrypted with PBES2 (PBKDF2-HMAC-SHA256, ``P12_KDF_ROUNDS``, AES-256-CBC) and
    the file is MACed with HMAC-SHA256: what Chromium/NSS, Firefox and OpenSSL 3 import
    (not the legacy RC2/3DES-SHA1 format). The password must be printable ASCII of at
    least ``P12_MIN_PASSWORD`` characters: tools disagree on how to encode other ones.
    """
    if problem := p12_password_problem(password):
        raise PKIError(f"PKCS#12 password refused: {problem}")
    if _ec_public_key(cert).public_numbers() != key.public_key().public_numbers():
        raise PKIError(f"the private key does not belong to certificate {_describe(cert)}")
    if cert.issuer != ca_cert.subject:
        raise PKIError(f"certificate {_describe(cert)} was not issued by {_describe(ca_cert)}")
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(P12_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password)
    )
    return pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca_cert], encryption)


def pkcs12_paths(
    out_dir: Path | str, person_id: str, generate_password: bool
) -> tuple[Path, Path | None]:
    """Where :func:`write_person_pkcs12` writes next to ``<id>.crt``: ``<id>.p12`` and,
    when it generates the password, ``<id>.p12.password``. :class:`PKIError` if one of
    them exists (nothing is overwritten): call it before issuing to fail early."""
    p12 = Path(out_dir) / f"{person_id}.p12"
    password = p12.with_name(p12.name + ".password") if generate_password else None
    for path in (p12, password):
        if path is not None and path.exists():
            raise PKIError(f"{path} already exists; will not overwrite it")
    return p12, password


def write_person_pkcs12(
    issued: IssuedCert, password: bytes | None = None
) -> tuple[Path, Path | None]:
    """Write ``<id>.p12`` (mode 0600) next to an issued person certificate.

    The friendly name is the person's label (``engineer:alice@factory-1``), what a
    browser's certificate list shows. Without ``password`` a random one
    (``secrets.token_urlsafe(18)``, 144 bits) is generated and written to
    ``<id>.p12.password`` (mode 0600). Returns the two paths (the second None when
    ``password`` was given). Never overwrites an existing file.
    """
    cert = load_certificate(issued.cert_path)
    ident = identity_from_certificate(cert)
    if ident.is_node:
        raise PKIError(f"{issued.cert_path} is a node certificate; only people get a .p12")
    p12_path, password_path = pkcs12_paths(
        issued.cert_path.parent, ident.subject_id, generate_password=password is None
    )
    if password is None:
        password = secrets.token_urlsafe(18).encode()
    data = person_pkcs12(
        cert,
        load_private_key(issued.key_path),
        load_certificate(issued.ca_path),
        password,
        ident.label(),
    )
    if password_path is not None:
        _write_private(password_path, password + b"\n", "password")
    _write_private(p12_path, data, "PKCS#12")
    log.info("wrote PKCS#12 %s for %s", p12_path, _describe(cert))
    return p12_path, password_path


def refresh_crl(ca_dir: Path | str) -> Path:
    """Re-sign the CA's CRL with the same entries and a new validity (``CRL_VALIDITY``).

    A CRL expires (its next-update time); a node that loads an expired one trusts no
    certificate. Run this (``yigong pki crl``) before that and copy the file to every node.
    """
    ca_dir = Path(ca_dir)
    ca_cert, ca_key = load_certificate(ca_dir / CA_CERT), load_private_key(ca_dir / CA_KEY)
    with _locked(ca_dir):
        crl = _load_crl(ca_dir / CRL_FILE, ca_cert)
        _write_public(
            ca_dir / CRL_FILE, _build_crl(ca_key, ca_cert, list(crl), _crl_number(crl) + 1)
        )
    return ca_dir / CRL_FILE


def crl_info(path: Path | str, ca_cert_path: Path | str) -> tuple[int, datetime]:
    """Entries and next-update time of the CRL at ``path``, after checking the CA signed it."""
    crl = _load_crl(Path(path), load_certificate(ca_cert_path))
    next_update = crl.next_update_utc
    if next_update is None:
        raise PKIError(f"revocation list {path} has no next-update time")
    return len(list(crl)), next_update


def revoke(ca_dir: Path | str, serial: int, reason: str = "unspecified") -> Path:
    """Revoke ``serial``: add it to the CA's CRL (re-signed), mark the index; return the CRL."""
    ca_dir = Path(ca_dir)
    flag = REVOCATION_REASONS.get(reason.replace("-", "_").lower())
    if flag is None:
        raise PKIError(
            f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}"
        )
    ca_cert, ca_key = load_certificate(ca_dir / CA_CERT), load_private_key(ca_dir / CA_KEY)
    with _locked(ca_dir):
        record = find_issued(ca_dir, serial)
        if record.revoked:
            raise PKIError(
                f"serial {serial:x} ({record.kind} {record.id}) was already revoked "
                f"at {record.revoked_at}"
            )
        crl, now = _load_crl(ca_dir / CRL_FILE, ca_cert), _now()
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
        if flag is not x509.ReasonFlags.unspecified:  # RFC 5280: omit rather than unspecified
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        new_crl = _build_crl(ca_key, ca_cert, [*crl, entry.build()], _crl_number(crl) + 1)
        _write_public(ca_dir / CRL_FILE, new_crl)
        _write_index(
            ca_dir,
            [
                dataclasses.replace(
                    r, revoked=True, revocation_reason=flag.name, revoked_at=iso(now)
                )
                if r.serial_int == serial
                else r
                for r in read_index(ca_dir)
            ],
        )
    log.info(
        "revoked %s certificate %s (serial %x, reason %s)",
        record.kind,
        record.id,
        serial,
        flag.name,
    )
    return ca_dir / CRL_FILE


# --------------------------------------------------------------------------- signatures


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-SHA256 signature (DER) of ``data``."""
    return private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify_signature(cert: x509.Certificate, data: bytes, signature: bytes) -> None:
    """Check ``signature`` over ``data`` was made with ``cert``'s key, else BadSignature."""
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise BadSignature(f"certificate {_describe(cert)} has no ECDSA key to verify with")
    try:
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise BadSignature(
            f"signature does not verify against certificate {_describe(cert)}"
        ) from exc


# --------------------------------------------------------------------------- trust store

_Stamp = tuple[int, int, int]  # (mtime_ns, size, inode) of a CRL file


@dataclass(frozen=True)
class _CrlState:
    stamp: _Stamp | None
    number: int
    revoked: dict[int, tuple[datetime, str]]  # serial -> (revocation date, reason)
    error: str | None = None  # set while the CRL on disk cannot be trusted


class TrustStore:
    """Verifies peer certificates against the federation CA and its CRL.

    Thread-safe. :meth:`verify_pem`/:meth:`verify_der` cache parsed,
    signature-checked certificates by their bytes but check validity and
    revocation on every call. The CRL file is re-read when it changes (looked
    at once per ``crl_check_interval`` seconds). A CRL that is missing, not
    signed by the CA, or older than the one loaded makes every verification
    fail with :class:`PKIError` until a good one is in place.
    """

    def __init__(
        self,
        ca_cert_path: Path | str,
        crl_path: Path | str | None = None,
        *,
        cache_size: int = 1024,
        crl_check_interval: float = 1.0,
    ) -> None:
        self.ca_cert = load_certificate(ca_cert_path)
        try:
            is_ca = self.ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise PKIError(f"{ca_cert_path} is not a CA certificate")
        _ec_public_key(self.ca_cert)
        self.federation_name = federation_of(self.ca_cert)
        self.crl_path = Path(crl_path) if crl_path is not None else None
        self._cache: dict[bytes, tuple[x509.Certificate, Identity]] = {}
        self._cache_size, self._cache_lock = cache_size, threading.Lock()
        self._crl_lock, self._interval = threading.Lock(), crl_check_interval
        self._next_check = time.monotonic() + crl_check_interval
        self._crl = _CrlState(None, 0, {})
        if self.crl_path is not None:
            self._crl = self._read_crl(self.crl_path, self._stamp(self.crl_path), quiet=True)
            if self._crl.error:  # raised, not also logged: the caller reports it once
                raise PKIError(
                    f"{self._crl.error} ([tls] crl): put the federation's crl.pem there; "
                    f"'yigong pki crl --ca-dir CA --out {self.crl_path}' writes a fresh one"
                )

    @staticmethod
    def _stamp(path: Path) -> _Stamp | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_crl(self, path: Path, stamp: _Stamp | None, quiet: bool = False) -> _CrlState:
        old = self._crl
        try:
            crl = _load_crl(path, self.ca_cert)
            if _crl_number(crl) < old.number:
                raise PKIError(
                    f"revocation list {path} has number {_crl_number(crl)}, older than "
                    f"the loaded {old.number}; refusing a rolled-back CRL"
                )
        except PKIError as exc:
            if not quiet:
                log.error("%s", exc)
            return _CrlState(stamp, old.number, old.revoked, str(exc))
        if crl.next_update_utc is not None and crl.next_update_utc < datetime.now(UTC):
            log.warning(
                "revocation list %s was due for renewal at %s; using it anyway",
                path,
                iso(crl.next_update_utc),
            )
        revoked: dict[int, tuple[datetime, str]] = {}
        for entry in crl:
            try:
                why = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
            except x509.ExtensionNotFound:
                why = "unspecified"
            revoked[entry.serial_number] = (entry.revocation_date_utc, why)
        log.info(
            "loaded revocation list %s (number %d, %d revoked)",
            path,
            _crl_number(crl),
            len(revoked),
        )
        return _CrlState(stamp, _crl_number(crl), revoked)

    def reload_crl(self, force: bool = False) -> None:
        """Re-read the CRL file now if it changed (or in any case with ``force``)."""
        if self.crl_path is None:
            return
        with self._crl_lock:
            stamp = self._stamp(self.crl_path)
            if force or stamp != self._crl.stamp:
                self._crl = self._read_crl(self.crl_path, stamp)
            self._next_check = time.monotonic() + self._interval

    def _check_time(self, cert: x509.Certificate, at: datetime | None) -> None:
        when = datetime.now(UTC) if at is None else _utc(at)
        for c, what in ((self.ca_cert, "federation CA certificate"), (cert, "certificate for")):
            if when < c.not_valid_before_utc:
                raise ExpiredCertificate(
                    f"{what} {_describe(c)} is not valid before "
                    f"{iso(c.not_valid_before_utc)} (now {iso(when)})"
                )
            if when > c.not_valid_after_utc:
                raise ExpiredCertificate(
                    f"{what} {_describe(c)} expired at "
                    f"{iso(c.not_valid_after_utc)} (now {iso(when)})"
                )

    def _check_time_and_revocation(self, cert: x509.Certificate, at: datetime | None) -> None:
        self._check_time(cert, at)
        if self.crl_path is not None and time.monotonic() >= self._next_check:
            self.reload_crl()
        state = self._crl
        if state.error:
            raise PKIError(state.error)
        if (hit := state.revoked.get(cert.serial_number)) is not None:
            raise RevokedCertificate(
                f"certificate for {_describe(cert)} was revoked at {iso(hit[0])} (reason: {hit[1]})"
            )

    def verify(self, cert: x509.Certificate, at: datetime | None = None) -> Identity:
        """The identity ``cert`` asserts, if the federation accepts it at ``at`` (default now)."""
        self._check_issuer(cert)
        self._check_time_and_revocation(cert, at)
        return identity_from_certificate(cert)

    def _check_issuer(self, cert: x509.Certificate) -> None:
        try:
            cert.verify_directly_issued_by(self.ca_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise UntrustedCertificate(
                f"certificate for {_describe(cert)} was not issued by "
                f"federation CA '{self.federation_name}'"
            ) from exc
        if cert == self.ca_cert:
            raise UntrustedCertificate(
                f"{_describe(cert)} is the federation CA itself, not a node or person certificate"
            )

    def check_issued(self, cert: x509.Certificate, at: datetime | None = None) -> None:
        """What a TLS handshake checks: issued by the federation CA and inside its validity
        window (raises :class:`UntrustedCertificate` or :class:`ExpiredCertificate`).
        Revocation and identity are :meth:`verify`'s, run on every call."""
        self._check_issuer(cert)
        self._check_time(cert, at)

    def _verify_cached(
        self, raw: bytes, parse: Callable[[bytes], x509.Certificate], at: datetime | None
    ) -> Identity:
        with self._cache_lock:
            hit = self._cache.get(raw)
        if hit is not None:
            self._check_time_and_revocation(hit[0], at)
            return hit[1]
        try:
            cert = parse(raw)
        except ValueError as exc:
            raise CertificateError(f"peer certificate cannot be parsed: {exc}") from exc
        identity = self.verify(cert, at)
        with self._cache_lock:
            while len(self._cache) >= max(self._cache_size, 1):
                del self._cache[next(iter(self._cache))]  # oldest first
            self._cache[raw] = (cert, identity)
        return identity

    def verify_pem(self, pem: bytes, at: datetime | None = None) -> Identity:
        """:meth:`verify` for a PEM certificate (what gRPC's auth context holds)."""
        return self._verify_cached(pem, x509.load_pem_x509_certificate, at)

    def verify_der(self, der: bytes, at: datetime | None = None) -> Identity:
        """:meth:`verify` for a DER certificate."""
        return self._verify_cached(der, x509.load_der_x509_certificate, at)
