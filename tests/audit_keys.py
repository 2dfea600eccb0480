"""A node key for the audit-log tests (both engines): ``key``, ``signer``, ``verifier``.

Registered in tests/conftest.py as a plugin; ECDSA P-256 / SHA-256 as in the federation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda data: key.sign(data, ec.ECDSA(hashes.SHA256()))


@pytest.fixture
def verifier(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes, bytes], None]:
    public = key.public_key()
    return lambda data, sig: public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
