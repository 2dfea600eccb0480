"""Object storage: one contract, a filesystem store (embedded default) and an S3 store.

See :mod:`gateway.storage.base` for the guarantees every store gives.
"""

from gateway.storage.base import MAX_KEY_CHARS, ChunkReader, ObjectStore, validate_key
from gateway.storage.filesystem import FilesystemStore
from gateway.storage.s3 import DEFAULT_PART_SIZE, S3Store

__all__ = [
    "DEFAULT_PART_SIZE",
    "MAX_KEY_CHARS",
    "ChunkReader",
    "FilesystemStore",
    "ObjectStore",
    "S3Store",
    "validate_key",
]
