"""The one hasher and chunker of yigong-gateway.

Every SHA-256 the gateway computes over object bytes, and every split of an
object into transfer chunks, goes through this module so that sender,
receiver, storage checks and query downloads agree byte for byte.

Chunk streams (the bytes of one object as offset/data/SHA-256 chunks plus the
whole object's SHA-256 and size) are produced by :class:`ChunkProducer` and
checked by :class:`ChunkVerifier`, with errors worded by the caller through a
:class:`ChunkErrors` subclass. ``tests/test_one_home.py`` fails when a per-chunk
SHA-256 is computed anywhere else.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Generic, NamedTuple, TypeVar, overload

from gateway.errors import IntegrityError, ValidationError, YigongError

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


def iter_fd_region(
    fd: int, start: int = 0, end: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """Yield bytes ``[start, end)`` of the open file descriptor ``fd`` (to its end with
    ``end=None``) in blocks of at most ``chunk_bytes``; stops early at end of file.

    Reads with ``os.pread``: the descriptor's position is left alone, so a file still
    being appended to through another descriptor (a receiver's spool) can be read back
    region by region while it grows."""
    pos = start
    while end is None or pos < end:
        block = os.pread(fd, chunk_bytes if end is None else min(chunk_bytes, end - pos), pos)
        if not block:
            return
        yield block
        pos += len(block)


def hash_fd(fd: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[str, int]:
    """SHA-256 hex and size of the whole file open as ``fd`` (read with ``pread``)."""
    return hash_chunks(iter_fd_region(fd, 0, None, chunk_bytes))


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


# -- chunk streams: the one producer and the one checker ---------------------------------
#
# A chunk stream is what every sender and receiver of object bytes exchanges: chunks of
# at most ``chunk_bytes``, each with its offset and its own SHA-256 (32 raw bytes), and
# for the whole object its SHA-256 (hex, the object id) and size. ``ChunkProducer``
# builds one (sender side: outbox, query download, client upload); ``ChunkVerifier``
# checks one (receiver side: transfer receiver, local submission, downloads). What is
# checked, and in which order, lives here; the *wording* of each error belongs to the
# caller (an upload, a transfer from a peer, a download from a node) and is given as a
# :class:`ChunkErrors` subclass, so messages stay what people and tests know.


class Chunk(NamedTuple):
    """One chunk of a stream: its offset in the object, its bytes, their SHA-256 (raw)."""

    offset: int
    data: bytes
    sha256: bytes


T = TypeVar("T")


class ChunkProducer(Generic[T]):
    """Produce a chunk stream from ``blocks`` (the object's bytes from ``offset`` on).

    ``blocks`` is any iterable of bytes: ``store.open_read(object_id, offset,
    chunk_bytes)``, :func:`iter_file_chunks` over an open file, or a list. Each block
    becomes one chunk, built by ``make(offset, data, sha256)`` (default :class:`Chunk`;
    pass e.g. ``ChunkMsg`` or a protobuf factory to get the caller's type directly).

    While iterating, :attr:`position` is the offset after the last chunk yielded and
    :attr:`size` the bytes yielded so far. With ``whole=True`` a running SHA-256 of the
    produced bytes is kept too (:meth:`hexdigest`; it covers the bytes from ``offset``
    only). It costs a second pass over every byte, so senders that leave the whole-object
    check to the receiver leave it off.

    Usage::

        producer = ChunkProducer(store.open_read(oid, offset, chunk_bytes), offset=offset,
                                 make=ChunkMsg)
        for chunk in producer:
            yield chunk
        if producer.position != announce.size: ...
    """

    @overload
    def __init__(
        self: ChunkProducer[Chunk],
        blocks: Iterable[bytes],
        *,
        offset: int = 0,
        whole: bool = False,
    ) -> None: ...

    @overload
    def __init__(
        self,
        blocks: Iterable[bytes],
        *,
        offset: int = 0,
        whole: bool = False,
        make: Callable[[int, bytes, bytes], T],
    ) -> None: ...

    def __init__(
        self,
        blocks: Iterable[bytes],
        *,
        offset: int = 0,
        whole: bool = False,
        make: Callable[[int, bytes, bytes], Any] = Chunk,
    ) -> None:
        self._blocks = blocks
        self._make = make
        self.start = offset
        self.position = offset
        self._hasher = hashlib.sha256() if whole else None

    @property
    def size(self) -> int:
        """Bytes produced so far (from ``offset``)."""
        return self.position - self.start

    def __iter__(self) -> Iterator[T]:
        sha256 = hashlib.sha256
        whole = self._hasher
        make = self._make
        for data in self._blocks:
            if whole is not None:
                whole.update(data)
            chunk = make(self.position, data, sha256(data).digest())
            self.position += len(data)
            yield chunk

    def hexdigest(self) -> str:
        """SHA-256 (hex) of the bytes produced so far; only with ``whole=True``."""
        if self._hasher is None:
            raise RuntimeError("ChunkProducer(whole=False) keeps no whole-object digest")
        return self._hasher.hexdigest()


class ChunkErrors:
    """The errors a :class:`ChunkVerifier` raises, worded for one kind of stream.

    The defaults name the stream by ``subject`` (e.g. ``"transfer T-1"``); a caller
    whose messages say more (which node, which object, what to do) subclasses it and
    overrides the methods. Each method returns the exception to raise (it may also
    raise one itself, e.g. after recording an audit entry).
    """

    def __init__(self, subject: str = "chunk stream") -> None:
        self.subject = subject

    def bad_offset(self, offset: int, expected: int) -> YigongError:
        """A chunk that does not continue the stream where the last one ended."""
        return ValidationError(f"{self.subject}: chunk at offset {offset}, expected {expected}")

    def oversize(self, offset: int, length: int) -> YigongError:
        """A chunk above the chunk limit, or one that runs past the announced size."""
        return ValidationError(
            f"{self.subject}: chunk of {length} bytes at {offset} exceeds the chunk limit "
            "or the announced size"
        )

    def too_large(self, limit: int) -> YigongError:
        """The stream ran past ``max_total`` bytes (the node's object size limit)."""
        return ValidationError(f"{self.subject} exceeds the limit of {limit} bytes")

    def bad_chunk(self, offset: int, expected: int) -> YigongError:
        """A chunk whose bytes do not match its SHA-256."""
        return IntegrityError(
            f"{self.subject}: chunk at offset {offset} does not match its SHA-256"
        )

    def bad_whole(self, digest: str, size: int) -> YigongError:
        """The whole stream's SHA-256/size differ from what was expected."""
        return IntegrityError(
            f"{self.subject}: arrived with SHA-256 {digest} and {size} bytes, not as expected"
        )


class ChunkVerifier:
    """Check a chunk stream, chunk by chunk and as a whole.

    Each :meth:`check` (offset, data, sha256) verifies, in this order:

    1. the chunk starts where the stream stands (``offset``, then each chunk's end):
       :meth:`ChunkErrors.bad_offset`;
    2. it is not above ``max_chunk`` and does not run past ``announced_size``:
       :meth:`ChunkErrors.oversize`; nor does the stream pass ``max_total``:
       :meth:`ChunkErrors.too_large`;
    3. its bytes match its SHA-256: :meth:`ChunkErrors.bad_chunk` (an empty ``sha256``
       is accepted unchecked only with ``require_sha256=False``: an upload's client may
       leave it out).

    With ``skip_empty=True`` a chunk without data is ignored altogether (a download's
    header message carries an empty chunk). With ``whole=True`` (default) a running
    SHA-256 of the checked bytes is kept; :meth:`resume` feeds it the bytes already
    held before ``offset`` (a resumed download), and :meth:`finish` compares the whole
    digest and size with every expected value given: :meth:`ChunkErrors.bad_whole`.
    A receiver that re-reads its bytes from disk instead (the transfer receiver) passes
    ``whole=False`` and checks what it read back.

    Usage::

        verifier = ChunkVerifier(UploadErrors(), max_total=limit)
        for c in chunks:
            verifier.check(c.offset, c.data, c.sha256)
            fh.write(c.data)
        digest, size = verifier.finish(sha256=[announced] if announced else ())
    """

    def __init__(
        self,
        errors: ChunkErrors | None = None,
        *,
        offset: int = 0,
        max_chunk: int | None = None,
        announced_size: int | None = None,
        max_total: int | None = None,
        require_sha256: bool = True,
        skip_empty: bool = False,
        whole: bool = True,
    ) -> None:
        self.errors = errors or ChunkErrors()
        self.start = offset
        self.position = offset
        self.max_chunk = max_chunk
        self.announced_size = announced_size
        self.max_total = max_total
        self.require_sha256 = require_sha256
        self.skip_empty = skip_empty
        self._hasher = hashlib.sha256() if whole else None

    def resume(self, blocks: Iterable[bytes]) -> None:
        """Hash the bytes already held before the stream's ``offset`` into the whole digest
        (they were checked when they arrived; only the digest needs them)."""
        if self._hasher is not None:
            for block in blocks:
                self._hasher.update(block)

    def check(self, offset: int, data: bytes, sha256: bytes) -> None:
        """Verify one chunk (see the class docstring); raises the caller's error."""
        if not data and self.skip_empty:
            return
        expected = self.position
        if offset != expected:
            raise self.errors.bad_offset(offset, expected)
        length = len(data)
        if (self.max_chunk is not None and length > self.max_chunk) or (
            self.announced_size is not None and expected + length > self.announced_size
        ):
            raise self.errors.oversize(offset, length)
        if self.max_total is not None and expected + length > self.max_total:
            raise self.errors.too_large(self.max_total)
        if (sha256 or self.require_sha256) and hashlib.sha256(data).digest() != sha256:
            raise self.errors.bad_chunk(offset, expected)
        if self._hasher is not None:
            self._hasher.update(data)
        self.position = expected + length

    def hexdigest(self) -> str:
        """SHA-256 (hex) of everything checked (and resumed) so far; only with ``whole``."""
        if self._hasher is None:
            raise RuntimeError("ChunkVerifier(whole=False) keeps no whole-object digest")
        return self._hasher.hexdigest()

    def finish(self, *, sha256: Iterable[str] = (), size: Iterable[int] = ()) -> tuple[str, int]:
        """The stream has ended: (whole SHA-256 hex, size = end position). Every value in
        ``sha256`` must equal the digest and every value in ``size`` the size, else
        :meth:`ChunkErrors.bad_whole`. Without ``whole``, the digest returned is ``""``
        and only sizes are compared."""
        digest = self._hasher.hexdigest() if self._hasher is not None else ""
        total = self.position
        if any(s != digest for s in sha256) or any(n != total for n in size):
            raise self.errors.bad_whole(digest, total)
        return digest, total
