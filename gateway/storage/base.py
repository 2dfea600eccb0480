"""The object-store contract shared by every storage backend.

An :class:`ObjectStore` keeps immutable-looking blobs under string keys. The one
guarantee everything else relies on (DESIGN.md, "Data path invariants" 1):

* when ``put_file`` / ``put_stream`` returns, the object is durable (written and
  fsynced, or accepted by the object store);
* a reader never sees a partial object under its key: a put either replaces the
  whole object or leaves the previous state (absent, or the old bytes) untouched.

Errors: invalid keys and backend failures raise :class:`~gateway.errors.StorageError`,
an absent object on read raises :class:`~gateway.errors.NotFound`, a malformed read
request (negative offset, offset past the end) raises
:class:`~gateway.errors.ValidationError`. An exception raised by the caller's
iterator given to ``put_stream`` propagates unchanged (and nothing is stored).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from gateway.errors import StorageError, ValidationError
from gateway.hashing import DEFAULT_CHUNK_BYTES

MAX_KEY_CHARS = 200
"""Longest accepted object key."""

TEMP_PREFIX = ".tmp-"
"""Name prefix of in-flight temporary files; reserved, so no key segment may use it."""

_KEY_RE = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return f"must be a str, not {type(key).__name__}"
    if not key:
        return "must not be empty"
    if len(key) > MAX_KEY_CHARS:
        return f"is {len(key)} characters long; at most {MAX_KEY_CHARS} are allowed"
    if key.startswith("/"):
        return "must not start with '/'"
    if "//" in key or key.endswith("/"):
        return "must not contain empty path segments"
    if ".." in key:
        return "must not contain '..'"
    if not _KEY_RE.fullmatch(key):
        return "may only contain A-Z a-z 0-9 . _ - and '/' separators"
    for segment in key.split("/"):
        if segment == ".":
            return "must not contain '.' path segments"
        if segment.startswith(TEMP_PREFIX):
            return f"segments must not start with the reserved prefix {TEMP_PREFIX!r}"
    return None


def validate_key(key: str) -> None:
    """Raise :class:`StorageError` naming ``key`` unless it is a valid object key.

    Valid keys are 1-200 characters of ``[A-Za-z0-9._-]`` with ``/`` separators,
    without empty segments, ``..``, ``.`` segments, a leading ``/``, or a segment
    starting with the reserved temp-file prefix ``.tmp-``.
    """
    problem = _key_problem(key)
    if problem is not None:
        shown = repr(key[:80] + "..." if len(key) > 80 else key) if isinstance(key, str) else "?"
        raise StorageError(f"invalid object key {shown}: {problem}")


def check_read_args(key: str, offset: int, chunk_bytes: int) -> None:
    """Validate the arguments of :meth:`ObjectStore.open_read` (key included)."""
    validate_key(key)
    if offset < 0:
        raise ValidationError(f"read offset {offset} for key {key!r} must not be negative")
    if chunk_bytes < 1:
        raise ValidationError(f"chunk size {chunk_bytes} for key {key!r} must be positive")


class ChunkReader(Iterator[bytes]):
    """Iterator over an object's bytes that owns an open resource.

    The resource (file handle, HTTP response) is released when the iterator is
    exhausted, when iteration raises, on :meth:`close`, on leaving a ``with``
    block, or at garbage collection, whichever comes first.
    """

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> ChunkReader:
        return self

    def __next__(self) -> bytes:
        if self._release is None:
            raise StopIteration
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the underlying resource; safe to call more than once."""
        release, self._release = self._release, None
        if release is not None:
            close = getattr(self._chunks, "close", None)
            try:
                if close is not None:
                    close()
            finally:
                release()

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # nothing useful to do at garbage collection
            pass


class ObjectStore(abc.ABC):
    """Durable, atomic storage of objects under validated string keys."""

    validate_key = staticmethod(validate_key)

    @abc.abstractmethod
    def describe(self) -> str:
        """Where this store keeps its objects, for logs and error messages."""

    @abc.abstractmethod
    def check(self) -> None:
        """Start-up check: the store is usable; raise :class:`StorageError` saying what to fix."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the finished local file ``path`` under ``key``, durably and atomically.

        The caller's file is read, never moved or modified.
        """

    def adopt_file(self, key: str, path: Path) -> bool:
        """Store the local file ``path`` under ``key`` and remove ``path``.

        Like :meth:`put_file`, but the caller gives the file up: a store may move
        it into place instead of copying it (the filesystem store renames it when
        it is on the same filesystem). Durable and atomic when it returns.

        Returns True when the file itself was moved in (the stored object *is* that
        file, so what was read back from it after it was made durable is what the
        store holds), False when its bytes were copied.
        """
        self.put_file(key, path)
        path.unlink(missing_ok=True)
        return False

    def link_file(self, key: str, path: Path) -> None:
        """Store the local file ``path`` under ``key`` and leave ``path`` as it is.

        Like :meth:`put_file`; the caller promises never to change ``path`` afterwards,
        so a store may share its bytes instead of copying them (the filesystem store
        hard-links it when it is on the same filesystem). Durable and atomic when it
        returns.
        """
        self.put_file(key, path)

    def link_files(self, pairs: Sequence[tuple[str, Path]]) -> None:
        """:meth:`link_file` for each ``(key, path)``; durable when it returns (a store
        may make them durable together, which is cheaper than one by one)."""
        for key, path in pairs:
            self.link_file(key, path)

    def sweep_temp_files(self) -> tuple[int, int]:
        """Delete the temporary files of writes cut short by a crash; return how many
        files and bytes went. Called once at start, before this process writes.

        A store whose writes leave nothing behind when cut (S3: an unfinished
        multipart upload is never an object) has nothing to sweep.
        """
        return 0, 0

    @abc.abstractmethod
    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Store the concatenation of ``chunks`` under ``key``; return the bytes written.

        Memory use is bounded (by one chunk for the filesystem, by the multipart part
        size for S3). If ``chunks`` raises, the exception propagates unchanged and
        the key keeps its previous state.
        """

    @abc.abstractmethod
    def open_read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> ChunkReader:
        """Stream the object's bytes from ``offset`` in chunks of ``chunk_bytes``.

        Every chunk but the last is exactly ``chunk_bytes`` long; no chunk is empty.
        Raises :class:`NotFound` (naming key and store) at call time if the object is
        absent, :class:`ValidationError` if ``offset`` is negative or past the end
        (``offset == size`` yields nothing). The returned :class:`ChunkReader` is an
        ``Iterator[bytes]`` with ``close()`` and ``with`` support; close it when stopping early.
        """

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes of the object under ``key``, or None if there is none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        return self.size(key) is not None

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object under ``key``; deleting an absent key is not an error."""

    @abc.abstractmethod
    def region(self) -> str | None:
        """Region of the storage location if known (S3 bucket location), else None."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
