"""The one hasher and chunker of yigong-gateway.

Every SHA-256 the gateway computes over object bytes, and every split of an
object into transfer chunks, goes through this module so that sender,
receiver, storage checks and query downloads agree byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

DEFAULT_CHUNK_BYTES = 1024 * 1024
"""Default transfer chunk: 1 MiB (below gRPC's 4 MiB default message limit)."""

MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024
"""Largest chunk that still fits a default gRPC message with its envelope."""


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_bytes(data: bytes) -> bytes:
    """SHA-256 of ``data`` as 32 raw bytes."""
    return hashlib.sha256(data).digest()


class StreamHasher:
    """Incremental SHA-256 with a byte count."""

    __slots__ = ("_h", "size")

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def iter_file_chunks(
    fh: BinaryIO, chunk_bytes: int = DEFAULT_CHUNK_BYTES, offset: int = 0
) -> Iterator[bytes]:
    """Yield ``fh`` from ``offset`` in chunks of ``chunk_bytes`` (the last may be shorter)."""
    if offset:
        fh.seek(offset)
    while True:
        block = fh.read(chunk_bytes)
        if not block:
            return
        yield block


def hash_chunks(chunks: Iterable[bytes]) -> tuple[str, int]:
    """SHA-256 hex and total size of a stream of chunks."""
    hasher = StreamHasher()
    for block in chunks:
        hasher.update(block)
    return hasher.hexdigest(), hasher.size


def hash_file(path: Path, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[str, int]:
    """SHA-256 hex and size of a file, read in bounded memory."""
    with open(path, "rb") as fh:
        return hash_chunks(iter_file_chunks(fh, chunk_bytes))
