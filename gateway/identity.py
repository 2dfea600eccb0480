"""Who a peer is, read from its certificate and nothing else.

A federation certificate asserts identity in URI subject-alternative names:

========================  ==========================================
``urn:yigong:node:ID``     the holder is node ``ID`` (nodes only)
``urn:yigong:person:ID``   the holder is person or tool ``ID``
``urn:yigong:role:ROLE``   hospital | factory | clinician | engineer | officer
``urn:yigong:region:R``    data-residency region (nodes only)
``urn:yigong:org:ID``      the node a person belongs to (persons only)
========================  ==========================================

Exactly one of ``node``/``person`` and exactly one ``role`` must be present.
The certificate must have been issued by the federation CA (checked in
:mod:`gateway.pki`); this module only reads what it asserts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.errors import CertificateError

URN_PREFIX = "urn:yigong:"
NODE_ROLES = frozenset({"hospital", "factory"})
PERSON_ROLES = frozenset({"clinician", "engineer", "officer"})
ALL_ROLES = NODE_ROLES | PERSON_ROLES

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
"""Node, person and region ids: lowercase DNS-label-like, 1-63 chars."""


def validate_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid id, else raise :class:`CertificateError`."""
    if not _ID_RE.match(value):
        raise CertificateError(
            f"invalid {what} {value!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def node_dns_name(node_id: str) -> str:
    """DNS name every node certificate carries; clients pin the peer's id with it."""
    return f"{node_id}.node.yigong"


@dataclass(frozen=True)
class Identity:
    """What a verified certificate says about its holder."""

    kind: Literal["node", "person"]
    subject_id: str
    role: str
    region: str | None
    org_node: str
    serial: int
    not_before: datetime
    not_after: datetime
    fingerprint: str

    @property
    def is_node(self) -> bool:
        return self.kind == "node"

    def label(self) -> str:
        """Short printable form for logs and audit: ``engineer:alice@factory-1``."""
        if self.is_node:
            return f"node:{self.subject_id}"
        return f"{self.role}:{self.subject_id}@{self.org_node}"

    def valid_at(self, when: datetime | None = None) -> bool:
        now = when or datetime.now(UTC)
        return self.not_before <= now <= self.not_after


def identity_san_uris(
    kind: Literal["node", "person"],
    subject_id: str,
    role: str,
    *,
    region: str | None = None,
    org_node: str | None = None,
) -> list[str]:
    """URI SANs that encode an identity (used by the CA when issuing)."""
    validate_id(subject_id, f"{kind} id")
    if kind == "node":
        if role not in NODE_ROLES:
            raise CertificateError(f"node role must be one of {sorted(NODE_ROLES)}, not {role!r}")
        if not region:
            raise CertificateError(f"node {subject_id!r} needs a residency region")
        validate_id(region, "region")
        return [
            f"{URN_PREFIX}node:{subject_id}",
            f"{URN_PREFIX}role:{role}",
            f"{URN_PREFIX}region:{region}",
        ]
    if role not in PERSON_ROLES:
        raise CertificateError(f"person role must be one of {sorted(PERSON_ROLES)}, not {role!r}")
    if not org_node:
        raise CertificateError(f"person {subject_id!r} must be bound to their organisation's node")
    validate_id(org_node, "organisation node id")
    return [
        f"{URN_PREFIX}person:{subject_id}",
        f"{URN_PREFIX}role:{role}",
        f"{URN_PREFIX}org:{org_node}",
    ]


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Read the federation identity asserted by ``cert``.

    Raises :class:`CertificateError` when the certificate carries no or
    contradictory identity claims. Does not check the issuer or validity.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise CertificateError(
            f"certificate serial {cert.serial_number:x} has no subjectAltName; "
            "it was not issued by 'yigong pki'"
        ) from exc
    claims: dict[str, list[str]] = {}
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.startswith(URN_PREFIX):
            continue
        key, _, value = uri[len(URN_PREFIX) :].partition(":")
        claims.setdefault(key, []).append(value)

    def one(key: str) -> str | None:
        values = claims.get(key, [])
        if len(values) > 1:
            raise CertificateError(
                f"certificate serial {cert.serial_number:x} asserts {key!r} {len(values)} times"
            )
        return values[0] if values else None

    node, person, role = one("node"), one("person"), one("role")
    region, org = one("region"), one("org")
    if (node is None) == (person is None):
        raise CertificateError(
            f"certificate serial {cert.serial_number:x} must name exactly one node or person"
        )
    if role is None or role not in ALL_ROLES:
        raise CertificateError(
            f"certificate serial {cert.serial_number:x} has no valid role (got {role!r})"
        )
    if node is not None:
        if role not in NODE_ROLES or not region:
            raise CertificateError(
                f"node certificate for {node!r} needs a node role and a region "
                f"(role={role!r}, region={region!r})"
            )
        kind: Literal["node", "person"] = "node"
        subject, org_node = node, node
    else:
        assert person is not None
        if role not in PERSON_ROLES or not org:
            raise CertificateError(
                f"person certificate for {person!r} needs a person role and an organisation node "
                f"(role={role!r}, org={org!r})"
            )
        kind, subject, org_node = "person", person, org
    return Identity(
        kind=kind,
        subject_id=subject,
        role=role,
        region=region,
        org_node=org_node,
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )
