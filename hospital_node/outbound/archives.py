"""Archive members, unpacked one at a time into a scratch directory, bounded.

:func:`members` yields each regular member of a ZIP, tar or single-stream compressed
file (gzip, bzip2, xz) as ``(label, name, path)``; the caller checks it (recursively,
with the depth it tracks) and the file is deleted when the iteration moves on. Bounds:
``max_members`` per check (over every nesting level) and every decompressed byte
charged to the :class:`~hospital_node.outbound.scanners.Budget` — a member whose
declared size alone is beyond the budget is refused before a byte is inflated, and
inflation stops the moment the budget is spent (a ZIP bomb is refused, not unpacked).
Encrypted members cannot be checked and are refused. 7-Zip is recognised and refused:
no maintained reader is installed to look inside it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from hospital_node.outbound.scanners import Budget, Unscannable

COPY_CHUNK = 1024 * 1024
ARCHIVE_KINDS = frozenset({"zip", "tar", "gzip", "bzip2", "xz", "3mf"})


class Counter:
    """Members seen in one check, over all nesting levels."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def add(self) -> None:
        self.seen += 1
        if self.seen > self.limit:
            raise Unscannable(
                f"it holds more than outbound.max_archive_members ({self.limit}) members",
                "member-limit",
            )


def members(
    path: Path, kind: str, name: str, scratch: Path, budget: Budget, counter: Counter
) -> Iterator[tuple[str, str, Path]]:
    """``(label, member name, unpacked file)`` for each regular member of an archive
    (``name`` is the archive's own name: a gzip stream's member is named after it)."""
    if kind in ("zip", "3mf"):
        yield from _zip_members(path, scratch, budget, counter)
    elif kind == "tar":
        yield from _tar_members(path, scratch, budget, counter)
    elif kind in ("gzip", "bzip2", "xz"):
        yield from _stream_member(path, kind, name, scratch, budget, counter)
    else:
        raise Unscannable(f"it is a {kind} archive, which cannot be looked into", "archive-type")


def _zip_members(
    path: Path, scratch: Path, budget: Budget, counter: Counter
) -> Iterator[tuple[str, str, Path]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise Unscannable(f"it is not a readable ZIP archive ({type(exc).__name__})") from exc
    with zf:
        for n, info in enumerate(zf.infolist(), 1):
            if info.is_dir():
                continue
            counter.add()
            label = f"archive member #{n}"
            if info.flag_bits & 0x1:
                raise Unscannable(f"{label} is encrypted and cannot be checked", "encrypted")
            if info.file_size > budget.limit - budget.used:
                raise Unscannable(
                    f"{label} declares {info.file_size} bytes unpacked, beyond "
                    f"outbound.max_expanded_bytes ({budget.limit} bytes; a compression bomb?)",
                    "expansion-limit",
                )
            target = scratch / f"m{counter.seen}"
            try:
                with zf.open(info) as src:
                    _copy(src.read, target, budget, label)
            except Unscannable:
                target.unlink(missing_ok=True)
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
                target.unlink(missing_ok=True)
                raise Unscannable(
                    f"{label} cannot be unpacked ({type(exc).__name__})"
                ) from exc
            try:
                yield label, info.filename, target
            finally:
                target.unlink(missing_ok=True)


def _tar_members(
    path: Path, scratch: Path, budget: Budget, counter: Counter
) -> Iterator[tuple[str, str, Path]]:
    try:
        tf = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise Unscannable(f"it is not a readable tar archive ({type(exc).__name__})") from exc
    with tf:
        n = 0
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                raise Unscannable(
                    f"the tar archive is broken after member #{n} ({type(exc).__name__})"
                ) from exc
            if info is None:
                return
            n += 1
            if not info.isfile():
                continue  # directories and links carry no content
            counter.add()
            label = f"archive member #{n}"
            if info.size > budget.limit - budget.used:
                raise Unscannable(
                    f"{label} is {info.size} bytes, beyond outbound.max_expanded_bytes "
                    f"({budget.limit} bytes)",
                    "expansion-limit",
                )
            src = tf.extractfile(info)
            if src is None:
                continue
            target = scratch / f"m{counter.seen}"
            try:
                with src:
                    _copy(src.read, target, budget, label)
                yield label, info.name, target
            finally:
                target.unlink(missing_ok=True)


def _stream_member(
    path: Path, kind: str, name: str, scratch: Path, budget: Budget, counter: Counter
) -> Iterator[tuple[str, str, Path]]:
    counter.add()
    openers: dict[str, Callable[[Path], BinaryIO]] = {
        "gzip": lambda p: cast(BinaryIO, gzip.open(p, "rb")),
        "bzip2": lambda p: cast(BinaryIO, bz2.open(p, "rb")),
        "xz": lambda p: cast(BinaryIO, lzma.open(p, "rb")),
    }
    label = f"the {kind} stream's content"
    target = scratch / f"m{counter.seen}"
    try:
        with openers[kind](path) as src:
            _copy(src.read, target, budget, label)
    except Unscannable:
        target.unlink(missing_ok=True)
        raise
    except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        target.unlink(missing_ok=True)
        raise Unscannable(f"the {kind} stream does not decompress ({type(exc).__name__})") from exc
    for suffix in (".gz", ".tgz", ".bz2", ".xz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)] + (".tar" if suffix == ".tgz" else "")
    try:
        yield label, name, target
    finally:
        target.unlink(missing_ok=True)


def _copy(read: Callable[[int], bytes], target: Path, budget: Budget, label: str) -> None:
    with open(target, "wb") as out:
        while True:
            block = read(COPY_CHUNK)
            if not block:
                return
            budget.charge(len(block), label)
            out.write(block)
