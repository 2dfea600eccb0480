"""Rows of identifiable data sealed at rest with a key derived from the vault key.

The pseudonym vault (case → patient) and the study identities (study → whom it is
of) keep patient data in the hospital's catalog. Both seal each row the same way,
here: AES-256-GCM under a sub-key derived from ``deid.vault_key_file`` with
HKDF-SHA256 and a label of its own, a random 96-bit nonce per row, and the row's
id (case id, Study Instance UID) bound in as associated data, so a ciphertext
moved to another row does not decrypt. A row that does not open is a
:class:`~gateway.errors.ConfigError` naming the row, never its content.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.errors import ConfigError

KEY_BYTES = 32
NONCE_BYTES = 12


def derive_key(key: bytes, label: bytes) -> bytes:
    """A 32-byte sub-key of ``key`` for the purpose named by ``label`` (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label).derive(key)


class RowSeal:
    """Seal and open rows of one table: ``key_label`` names the sub-key, ``aad_label``
    prefixes each row id in the associated data."""

    def __init__(self, vault_key: bytes, key_label: bytes, aad_label: bytes) -> None:
        if len(vault_key) != KEY_BYTES:
            raise ConfigError(f"the vault key must be {KEY_BYTES} bytes")
        self._aead = AESGCM(derive_key(vault_key, key_label))
        self._aad_label = aad_label

    def __repr__(self) -> str:
        return "RowSeal(<key withheld>)"

    def seal(self, row_id: bytes, plain: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext) of ``plain`` for the row ``row_id``."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, plain, self._aad_label + row_id)

    def open(self, row_id: bytes, nonce: bytes, ciphertext: bytes, what: str) -> bytes:
        """The plain bytes of a row; ``what`` names the row in the error ("vault entry of
        case C-1"), never its content."""
        try:
            return self._aead.decrypt(nonce, ciphertext, self._aad_label + row_id)
        except InvalidTag as exc:
            raise ConfigError(
                f"{what} does not decrypt with this node's vault key "
                "(wrong deid.vault_key_file, or the row was altered)"
            ) from exc
