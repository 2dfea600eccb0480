"""Filesystem object store: the embedded default.

Layout: ``root/<key[0:2]>/<key[2:4]>/<key>`` for keys of 4 or more characters,
``root/<key>`` for shorter ones; a ``/`` inside the two shard prefixes is written
as ``_`` (the full key follows the shards, so the mapping stays one-to-one).

Writes go to ``.tmp-*`` in the final directory, are flushed and fsynced, renamed
onto the final name with :func:`os.replace`, and the directory is fsynced, so a
returned put survives a crash and a reader only ever sees a whole object. Newly
created shard directories are fsynced into their parents too. Objects are
created with mode 0600.

A temporary file's name carries the writing process's id (``.tmp-<pid>-…``), so the
start-up sweep (:meth:`FilesystemStore.sweep_temp_files`) can delete what a killed
process left without touching a live writer's file.

Limitation: unlike S3, a key cannot be both an object and a prefix of another
key (``a/b`` and ``a/b/c``); such a put fails with :class:`StorageError`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from gateway.errors import NotFound, StorageError, ValidationError
from gateway.hashing import DEFAULT_CHUNK_BYTES, iter_file_chunks
from gateway.storage.base import TEMP_PREFIX, ChunkReader, ObjectStore, check_read_args

log = logging.getLogger(__name__)

_ABSENT_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})

_TEMP_PID_RE = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)-")

UNOWNED_TEMP_MAX_AGE_SECONDS = 3600.0
"""A temporary file whose name names no process (written by an older version) is
swept once it is this old."""


def _temp_prefix(kind: str = "") -> str:
    """The name prefix of this process's temporary files: ``.tmp-<pid>-<kind>``."""
    return f"{TEMP_PREFIX}{os.getpid()}-{kind}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return False
    return True


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable (new, renamed, removed files)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FilesystemStore(ObjectStore):
    """Objects as files under ``root``, written atomically and fsynced."""

    def __init__(self, root: Path) -> None:
        self._root = Path(os.path.abspath(root))

    @property
    def root(self) -> Path:
        return self._root

    def describe(self) -> str:
        return f"filesystem:{self._root}"

    # -- paths and errors ---------------------------------------------------

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (whether or not it exists)."""
        self.validate_key(key)
        if len(key) < 4:
            return self._root / key
        return self._root / key[0:2].replace("/", "_") / key[2:4].replace("/", "_") / key

    def _error(self, action: str, path: Path | str, exc: OSError) -> StorageError:
        reason = exc.strerror or str(exc)
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        if code:
            reason = f"{reason} [{code}]"
        if exc.filename and str(exc.filename) != str(path):
            reason = f"{reason} at {exc.filename}"
        return StorageError(
            f"filesystem store {self._root} could not {action} {path}: {reason}; "
            "check disk space/permissions"
        )

    # -- lifecycle ----------------------------------------------------------

    def check(self) -> None:
        try:
            self._ensure_dir(self._root)
        except OSError as exc:
            raise self._error("create root directory", self._root, exc) from exc
        if not self._root.is_dir():
            raise StorageError(
                f"filesystem store root {self._root} is not a directory; "
                "point [storage] path at a writable directory"
            )
        probe: str | None = None
        try:
            fd, probe = tempfile.mkstemp(prefix=_temp_prefix("check-"), dir=self._root)
            with os.fdopen(fd, "wb") as fh:
                fh.write(b"yigong storage check\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.unlink(probe)
            probe = None
            fsync_dir(self._root)
        except OSError as exc:
            raise self._error("write a probe file in", self._root, exc) from exc
        finally:
            if probe is not None:
                with contextlib.suppress(OSError):
                    os.unlink(probe)
        log.info("object store %s ready", self.describe())

    def region(self) -> str | None:
        return None

    def sweep_temp_files(self) -> tuple[int, int]:
        """Delete ``.tmp-*`` files left by writes cut short (a SIGKILL, a power loss).

        A file named after a live process other than this one is kept (a writer
        sharing the store, e.g. a de-identification worker); this process's own id
        counts as dead, since it is called before this process writes (a restarted
        container often gets the same pid). A name without a process id is swept when
        older than :data:`UNOWNED_TEMP_MAX_AGE_SECONDS`.
        """
        files = freed = 0
        own = os.getpid()
        alive: dict[int, bool] = {}
        now = time.time()
        for directory, _dirs, names in os.walk(self._root):
            for name in names:
                if not name.startswith(TEMP_PREFIX):
                    continue
                path = os.path.join(directory, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                match = _TEMP_PID_RE.match(name)
                if match is not None:
                    pid = int(match.group(1))
                    if pid != own and alive.setdefault(pid, _process_alive(pid)):
                        continue
                elif now - st.st_mtime < UNOWNED_TEMP_MAX_AGE_SECONDS:
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise self._error("delete a stale temporary file", path, exc) from exc
                files += 1
                freed += st.st_size
        if files:
            log.info(
                "object store %s: %d temporary file(s) of cut writes (%d bytes) deleted",
                self.describe(), files, freed,
            )
        return files, freed

    # -- writing ------------------------------------------------------------

    def _ensure_dir(self, directory: Path, unsynced: set[Path] | None = None) -> None:
        """Create ``directory`` and missing parents, fsyncing each new entry's parent —
        or adding the parent to ``unsynced`` for the caller to fsync later."""
        missing: list[Path] = []
        current = directory
        while not current.is_dir():
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        for new_dir in reversed(missing):
            try:
                new_dir.mkdir()
            except FileExistsError:
                if not new_dir.is_dir():
                    raise
                continue
            if unsynced is None:
                fsync_dir(new_dir.parent)
            else:
                unsynced.add(new_dir.parent)

    def _write(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write ``chunks`` to a temp file next to ``key``'s path, then publish it."""
        final = self.path_for(key)
        try:
            self._ensure_dir(final.parent)
            fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(), dir=final.parent)
        except OSError as exc:
            raise self._error("create a file in", final.parent, exc) from exc
        tmp = Path(tmp_name)
        published = False
        try:
            written = 0
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:  # exceptions from the caller's iterator pass unchanged
                    try:
                        fh.write(chunk)
                    except OSError as exc:
                        raise self._error("write", tmp, exc) from exc
                    written += len(chunk)
                try:
                    fh.flush()
                    os.fsync(fh.fileno())
                except OSError as exc:
                    raise self._error("flush", tmp, exc) from exc
            try:
                os.replace(tmp, final)
                published = True
                fsync_dir(final.parent)
            except OSError as exc:
                raise self._error("publish", final, exc) from exc
        finally:
            if not published:
                with contextlib.suppress(OSError):
                    tmp.unlink()
        log.debug("stored %s (%d bytes) in %s", key, written, self.describe())
        return written

    def put_file(self, key: str, path: Path) -> None:
        self.validate_key(key)
        try:
            src: BinaryIO = open(path, "rb")  # closed by the with below
        except OSError as exc:
            raise self._error("read source file", path, exc) from exc
        with src:
            self._write(key, self._translated(iter_file_chunks(src), "read source file", path))

    def adopt_file(self, key: str, path: Path) -> bool:
        """Move ``path`` into the store: fsync it, rename it onto the key, fsync the directory.

        Falls back to a copy (:meth:`put_file`) when ``path`` is on another filesystem.
        """
        self.validate_key(key)
        final = self.path_for(key)
        try:
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(path, 0o600)
            self._ensure_dir(final.parent)
            os.replace(path, final)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                return super().adopt_file(key, path)
            raise self._error("move into the store", path, exc) from exc
        try:
            fsync_dir(final.parent)
        except OSError as exc:
            raise self._error("publish", final, exc) from exc
        log.debug("adopted %s into %s", key, self.describe())
        return True

    def link_file(self, key: str, path: Path) -> None:
        self.link_files([(key, path)])

    def link_files(self, pairs: Sequence[tuple[str, Path]]) -> None:
        """Hard-link each path onto its key (fsync the file, link it under a temporary
        name, rename it onto the key), then fsync every directory touched, once — one
        journal commit for the lot on most filesystems. A copy (:meth:`put_file`) when a
        path is on another filesystem or the filesystem has no hard links."""
        unsynced: set[Path] = set()
        for key, path in pairs:
            self.validate_key(key)
            final = self.path_for(key)
            tmp = final.parent / f"{_temp_prefix('link-')}{threading.get_ident()}"
            try:
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
                self._ensure_dir(final.parent, unsynced)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.link(path, tmp)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    self.put_file(key, path)
                    continue
                raise self._error("link into the store", path, exc) from exc
            try:
                os.chmod(tmp, 0o600)
                os.replace(tmp, final)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise self._error("publish", final, exc) from exc
            unsynced.add(final.parent)
        for directory in sorted(unsynced, key=lambda d: len(d.parts), reverse=True):
            try:
                fsync_dir(directory)
            except OSError as exc:
                raise self._error("publish into", directory, exc) from exc
        log.debug("linked %d object(s) into %s", len(pairs), self.describe())

    def _translated(self, chunks: Iterator[bytes], action: str, path: Path) -> Iterator[bytes]:
        """Pass ``chunks`` through, turning an OSError while reading into StorageError."""
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except OSError as exc:
                raise self._error(action, path, exc) from exc
            yield chunk

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        self.validate_key(key)
        return self._write(key, chunks)

    # -- reading ------------------------------------------------------------

    def open_read(
        self, key: str, offset: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> ChunkReader:
        check_read_args(key, offset, chunk_bytes)
        path = self.path_for(key)
        try:
            fh: BinaryIO = open(path, "rb")  # owned by the ChunkReader
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"object {key!r} not found in {self.describe()}") from exc
        except OSError as exc:
            raise self._error("open", path, exc) from exc
        try:
            total = os.fstat(fh.fileno()).st_size
            if offset > total:
                raise ValidationError(
                    f"read offset {offset} is past the end of object {key!r} "
                    f"({total} bytes) in {self.describe()}"
                )
            if offset:
                fh.seek(offset)
        except OSError as exc:
            fh.close()
            raise self._error("read", path, exc) from exc
        except BaseException:
            fh.close()
            raise
        return ChunkReader(
            self._translated(iter_file_chunks(fh, chunk_bytes), "read", path), fh.close
        )

    def size(self, key: str) -> int | None:
        path = self.path_for(key)
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno in _ABSENT_ERRNOS:
                return None
            raise self._error("stat", path, exc) from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        if self.size(key) is None:
            return
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error("delete", path, exc) from exc
        try:
            fsync_dir(path.parent)
        except OSError as exc:
            raise self._error("sync directory", path.parent, exc) from exc
        log.debug("deleted %s from %s", key, self.describe())
