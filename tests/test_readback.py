"""gateway.transfer.readback.SpoolReadback: a spool file made durable and read back
while it is written. Real files, real threads; the digests are checked against
hashlib over the bytes written."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from gateway.transfer import readback
from gateway.transfer.readback import SpoolReadback


def _chunks(total: int, size: int) -> list[bytes]:
    data = os.urandom(total)
    return [data[i : i + size] for i in range(0, total, size)]


@pytest.mark.parametrize("every", [1, 5000, 64 * 1024, 10**9])
def test_digest_is_of_the_file_as_written(tmp_path: Path, every: int) -> None:
    chunks = _chunks(300_000 + 17, 7_000)
    path = tmp_path / "t.part"
    with SpoolReadback(path, every=every) as spool:
        for c in chunks:
            spool.write(c)
        digest, size = spool.read_back()
    whole = b"".join(chunks)
    assert (digest, size) == (hashlib.sha256(whole).hexdigest(), len(whole))
    assert path.read_bytes() == whole
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_resumed_spool_reads_back_its_durable_prefix_too(tmp_path: Path) -> None:
    path = tmp_path / "t.part"
    first, rest = os.urandom(100_000), os.urandom(250_001)
    with SpoolReadback(path, every=30_000) as spool:
        spool.write(first)
    assert path.stat().st_size == len(first)  # an interrupted transfer's durable prefix
    with SpoolReadback(path, every=30_000) as spool:
        assert spool.written == len(first)
        spool.write(rest)
        digest, size = spool.read_back()
    assert (digest, size) == (hashlib.sha256(first + rest).hexdigest(), len(first) + len(rest))


def test_bytes_changed_behind_the_writer_are_seen_by_the_read_back(tmp_path: Path) -> None:
    """The digest comes from reading the file, not from the bytes handed to write()."""
    path = tmp_path / "t.part"
    data = os.urandom(200_000)
    with SpoolReadback(path, every=10**9) as spool:
        spool.write(data)
        with open(path, "r+b") as fh:  # bit rot / another writer, before the read-back
            fh.seek(12345)
            fh.write(bytes([data[12345] ^ 0x01]))
        digest, size = spool.read_back()
    assert size == len(data)
    assert digest != hashlib.sha256(data).hexdigest()


def test_a_file_cut_short_reads_back_short(tmp_path: Path) -> None:
    path = tmp_path / "t.part"
    with SpoolReadback(path, every=10**9) as spool:
        data = os.urandom(50_000)
        spool.write(data)
        os.truncate(path, 20_000)
        digest, size = spool.read_back()
    assert size == 20_000 and spool.written == 50_000
    assert digest == hashlib.sha256(data[:20_000]).hexdigest()


def test_a_failed_background_round_is_redone_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error in the helper thread never leaves a partial digest behind."""
    calls = {"n": 0}
    real_pread = os.pread
    helper_failed = threading.Event()

    def flaky_pread(fd: int, n: int, offset: int) -> bytes:
        if threading.current_thread().name == "spool-readback":
            calls["n"] += 1
            if calls["n"] == 2:  # the first block is already hashed: fail on the second
                helper_failed.set()
                raise OSError(5, "Input/output error")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(readback.os, "pread", flaky_pread)
    chunks = _chunks(6 * 1024 * 1024 + 3, 1024 * 1024)
    path = tmp_path / "t.part"
    with SpoolReadback(path, every=5 * 1024 * 1024 // 2) as spool:  # 3 blocks a round
        for c in chunks:
            spool.write(c)
        digest, size = spool.read_back()
    assert helper_failed.is_set()
    whole = b"".join(chunks)
    assert (digest, size) == (hashlib.sha256(whole).hexdigest(), len(whole))


def test_errors_of_the_final_read_back_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_pread(fd: int, n: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error")

    path = tmp_path / "t.part"
    with SpoolReadback(path, every=10**9) as spool:
        spool.write(b"x" * 1000)
        monkeypatch.setattr(readback.os, "pread", broken_pread)
        with pytest.raises(OSError, match="Input/output error"):
            spool.read_back()


def test_leaving_on_an_exception_keeps_it_and_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "t.part"
    with pytest.raises(RuntimeError, match="stream cut"):
        with SpoolReadback(path, every=4096) as spool:
            spool.write(b"a" * 10_000)
            raise RuntimeError("stream cut")
    assert path.read_bytes() == b"a" * 10_000
