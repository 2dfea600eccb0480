"""Object storage: one contract, a filesystem store (embedded default) and an S3 store.

See :mod:`gateway.storage.base` for the guarantees every store gives. The S3 store
(and with it the minio SDK and its HTTP stack, ~0.17 s of imports) loads only when
named: a node on the filesystem store, its CLI and its de-identification workers
never import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.storage.base import MAX_KEY_CHARS, ChunkReader, ObjectStore, validate_key
from gateway.storage.filesystem import FilesystemStore

if TYPE_CHECKING:
    from gateway.storage.s3 import DEFAULT_PART_SIZE, S3Store


def __getattr__(name: str) -> Any:
    if name in {"S3Store", "DEFAULT_PART_SIZE"}:
        from gateway.storage import s3

        return getattr(s3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DEFAULT_PART_SIZE",
    "MAX_KEY_CHARS",
    "ChunkReader",
    "FilesystemStore",
    "ObjectStore",
    "S3Store",
    "validate_key",
]
