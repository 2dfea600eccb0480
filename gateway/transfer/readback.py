"""A receiver's spool file, made durable and read back while it is still being written.

The receiving thread appends verified chunks with :meth:`SpoolReadback.write`.
Every ``every`` bytes a helper thread makes what has been written durable
(``fdatasync``), reads that part back from the file, hashes it into the
object's SHA-256 and drops it from the page cache. :meth:`SpoolReadback.read_back`
makes the rest durable, reads it back and returns the SHA-256 and size of the
file *as read back after it was made durable* — the receiver's "re-read what
was stored and hash it again", done mostly while the stream is still arriving
instead of all after it.

Why drop the pages: a transferred object is not read again soon, and on a
machine whose free memory is handed back to its hypervisor (virtio-balloon free
page reporting) every fresh page-cache page costs a host fault; pages given up
after each read-back are taken again by the next writes. It also keeps large
transfers from evicting the catalog's and audit log's pages.

Nothing here trusts the helper: if it fails (an I/O error), :meth:`read_back`
hashes the whole file again from the start in the calling thread, and the
errors it meets are raised there.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import TracebackType

from gateway.hashing import StreamHasher, iter_fd_region

log = logging.getLogger(__name__)

READBACK_EVERY = 32 * 1024 * 1024
"""Bytes written between two background flush + read-back rounds."""

_DROP_PAGES = hasattr(os, "posix_fadvise")  # Linux; not on macOS


class SpoolReadback:
    """Append-only writer for ``path`` with background flush, read-back and hashing.

    ``path`` may already hold a durable prefix (a resumed transfer): it is read
    back and hashed like the rest. Use as a context manager; leaving it (normally
    or by an exception) waits for the helper thread and fsyncs what was written,
    so an interrupted transfer resumes from a durable prefix.
    """

    def __init__(self, path: Path, *, every: int = READBACK_EVERY) -> None:
        self.path = path
        self._every = max(1, every)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            self._rfd = os.open(path, os.O_RDONLY)
        except OSError:
            os.close(self._fd)
            raise
        self._written = os.fstat(self._fd).st_size
        self._read = 0  # bytes read back and hashed, from the start of the file
        self._hasher = StreamHasher()
        self._thread: threading.Thread | None = None
        self._helper_failed: OSError | None = None
        self._closed = False

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (all of it); start a flush + read-back round when due."""
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._written += len(data)
        if self._written - self._read >= self._every and not self._helper_busy():
            self._thread = threading.Thread(
                target=self._catch_up,
                args=(self._written,),
                name="spool-readback",
                daemon=True,
            )
            self._thread.start()

    def _helper_busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _catch_up(self, upto: int) -> None:
        if self._helper_failed is not None:
            return
        try:
            os.fdatasync(self._fd)
            self._read_back(upto)
        except OSError as exc:  # read_back() starts again from 0 and reports it
            self._helper_failed = exc

    def _read_back(self, upto: int) -> None:
        """Hash the durable bytes ``[self._read, upto)``; stop early at end of file."""
        start = pos = self._read
        for block in iter_fd_region(self._rfd, start, upto):
            self._hasher.update(block)
            pos += len(block)
        self._read = pos
        if pos > start and _DROP_PAGES:
            os.posix_fadvise(self._rfd, start, pos - start, os.POSIX_FADV_DONTNEED)

    def _wait_helper(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def sync(self) -> None:
        """Wait for the helper and make everything written so far durable."""
        self._wait_helper()
        os.fsync(self._fd)

    def read_back(self) -> tuple[str, int]:
        """Make the file durable, read the rest back: (SHA-256 hex, bytes read back).

        The size is less than :attr:`written` only if the file was cut short
        behind this writer's back; the caller compares both with what it expects.
        """
        self.sync()
        if self._helper_failed is not None:
            log.warning(
                "spool %s: background read-back failed (%s); reading it all again",
                self.path.name,
                self._helper_failed,
            )
            self._hasher = StreamHasher()
            self._read = 0
            self._helper_failed = None
        self._read_back(self._written)
        return self._hasher.hexdigest(), self._read

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sync()
        finally:
            os.close(self._rfd)
            os.close(self._fd)

    def __enter__(self) -> SpoolReadback:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if t is None:
            self.close()
            return
        try:  # keep the original exception; a failing fsync here is logged only
            self.close()
        except OSError as exc:
            log.error("spool %s: fsync after an interrupted transfer failed: %s", self.path, exc)
