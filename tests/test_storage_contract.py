"""One contract for every ObjectStore, run against the filesystem store and a real S3 server.

The part that every store must satisfy is parametrized over the ``store`` fixture;
store-specific failure modes (real OS errors, an unreachable S3 endpoint, multipart
abort) follow at the end.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from minio import Minio

from gateway.errors import ConfigError, NotFound, StorageError, ValidationError
from gateway.hashing import StreamHasher, hash_chunks, hash_file, sha256_hex
from gateway.storage import FilesystemStore, ObjectStore, S3Store, validate_key
from tests.s3server import TEST_PART_SIZE, S3Server, new_bucket_name

MiB = 1024 * 1024
MULTI = TEST_PART_SIZE + 17  # more than one S3 part and more than one 1 MiB chunk


class Boom(Exception):
    """Raised by test generators to fail an upload midway."""


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes (cheap for multi-MiB sizes)."""
    block = sha256_hex(f"{seed}".encode()).encode() * 2048  # 128 KiB
    reps = size // len(block) + 1
    return (block * reps)[:size]


def pieces(data: bytes, sizes: tuple[int, ...] = (1, 0, 7, 65536, 1000003)) -> Iterator[bytes]:
    """Yield ``data`` in uneven pieces, including an empty one."""
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos += n
        i += 1


def read_all(store: ObjectStore, key: str, offset: int = 0, chunk_bytes: int = MiB) -> bytes:
    return b"".join(store.open_read(key, offset=offset, chunk_bytes=chunk_bytes))


@pytest.fixture(params=["filesystem", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "filesystem":
        fs = FilesystemStore(tmp_path / "objects")
        fs.check()
        return fs
    s3: S3Store = request.getfixturevalue("s3_store")
    return s3


# -- contract ---------------------------------------------------------------


def test_describe_region_and_check(store: ObjectStore) -> None:
    text = store.describe()
    if isinstance(store, FilesystemStore):
        assert text == f"filesystem:{store.root}"
        assert store.region() is None
    else:
        assert isinstance(store, S3Store)
        assert text == f"s3://{store.bucket} at {store.url}"
        assert store.url.startswith("http://127.0.0.1:")
        assert store.region() == "us-east-1"
    store.check()  # idempotent
    assert text in repr(store)


@pytest.mark.parametrize("size", [0, 5, MULTI], ids=["empty", "small", "multipart"])
def test_put_file_round_trip(store: ObjectStore, tmp_path: Path, size: int) -> None:
    data = payload(size)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.put_file("ab/cd/object.bin", src)
    assert src.read_bytes() == data, "put_file must copy, never move or alter the caller's file"
    assert store.size("ab/cd/object.bin") == size
    assert store.exists("ab/cd/object.bin")
    assert hash_chunks(store.open_read("ab/cd/object.bin")) == hash_file(src)
    assert read_all(store, "ab/cd/object.bin") == data


@pytest.mark.parametrize("size", [0, 5, MULTI], ids=["empty", "small", "multipart"])
def test_put_stream_round_trip(store: ObjectStore, size: int) -> None:
    data = payload(size, seed=1)
    sent = StreamHasher()

    def gen() -> Iterator[bytes]:
        for piece in pieces(data):
            sent.update(piece)
            yield piece

    assert store.put_stream("1.2.840.10008/stream", gen()) == size
    assert store.size("1.2.840.10008/stream") == size
    assert hash_chunks(store.open_read("1.2.840.10008/stream", chunk_bytes=MiB)) == (
        sent.hexdigest(),
        sent.size,
    )


def test_put_stream_accepts_any_iterable_of_buffers(store: ObjectStore) -> None:
    buffers = cast(list[bytes], [b"ab", bytearray(b"cd"), memoryview(b"ef"), b""])
    assert store.put_stream("buffers", buffers) == 6
    assert read_all(store, "buffers") == b"abcdef"


def test_put_stream_memory_is_bounded(store: ObjectStore) -> None:
    total, piece = 8 * TEST_PART_SIZE, 256 * 1024
    sent = StreamHasher()

    def gen() -> Iterator[bytes]:
        for i in range(total // piece):
            block = bytes([i % 251]) * piece
            sent.update(block)
            yield block

    tracemalloc.start()
    try:
        written = store.put_stream("bounded", gen())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == total == sent.size
    # The filesystem holds one chunk; S3 about one part (minio copies it up to twice while
    # building it), never the whole stream.
    bound = 2 * MiB if isinstance(store, FilesystemStore) else 4 * TEST_PART_SIZE
    assert peak < bound, f"peak {peak} bytes while streaming {total} bytes"
    assert hash_chunks(store.open_read("bounded")) == (sent.hexdigest(), total)


@pytest.mark.parametrize("offset", [0, 1, 4095, 4096, 5000, 9999, 10000])
def test_open_read_offset_and_chunking(store: ObjectStore, offset: int) -> None:
    data = payload(10000, seed=2)
    store.put_stream("offsets", [data])
    chunks = list(store.open_read("offsets", offset=offset, chunk_bytes=4096))
    assert b"".join(chunks) == data[offset:]
    assert all(chunks), "no empty chunks"
    assert all(len(c) == 4096 for c in chunks[:-1]), "all chunks but the last are full"
    assert all(len(c) <= 4096 for c in chunks)


def test_open_read_large_offset(store: ObjectStore) -> None:
    data = payload(MULTI, seed=3)
    store.put_stream("large", [data])
    offset = TEST_PART_SIZE - 3
    assert read_all(store, "large", offset=offset) == data[offset:]


@pytest.mark.parametrize(
    ("offset", "chunk_bytes"), [(-1, 4096), (11, 4096), (0, 0)], ids=["negative", "past", "chunk0"]
)
def test_open_read_bad_arguments(store: ObjectStore, offset: int, chunk_bytes: int) -> None:
    store.put_stream("ten", [b"0123456789"])
    with pytest.raises(ValidationError, match="ten"):
        store.open_read("ten", offset=offset, chunk_bytes=chunk_bytes)


def test_open_read_empty_object_and_early_close(store: ObjectStore) -> None:
    store.put_stream("empty", [])
    assert read_all(store, "empty") == b""
    store.put_stream("big", [payload(3 * 4096)])
    reader = store.open_read("big", chunk_bytes=4096)
    assert len(next(reader)) == 4096
    reader.close()  # releases the file / HTTP connection
    with pytest.raises(StopIteration):
        next(reader)
    for _ in range(20):  # would exhaust a connection pool if early closes leaked
        with store.open_read("big", chunk_bytes=4096) as r:
            next(r)
    assert read_all(store, "big") == payload(3 * 4096)


def test_overwrite_replaces_whole_object(store: ObjectStore, tmp_path: Path) -> None:
    store.put_stream("same", [payload(MULTI, seed=4)])
    store.put_stream("same", [b"short"])
    assert read_all(store, "same") == b"short"
    src = tmp_path / "f"
    src.write_bytes(b"from file")
    store.put_file("same", src)
    assert read_all(store, "same") == b"from file"
    assert store.size("same") == 9


def test_missing_key(store: ObjectStore) -> None:
    key = "no/such/object.dcm"
    with pytest.raises(NotFound) as info:
        store.open_read(key)
    assert key in str(info.value)
    assert store.describe() in str(info.value)
    assert store.size(key) is None
    assert not store.exists(key)
    store.delete(key)  # idempotent on absent keys


def test_delete_is_idempotent(store: ObjectStore) -> None:
    store.put_stream("gone", [b"x"])
    assert store.exists("gone")
    store.delete("gone")
    store.delete("gone")
    assert not store.exists("gone")
    assert store.size("gone") is None
    with pytest.raises(NotFound):
        store.open_read("gone")


@pytest.mark.parametrize(
    "key", ["a", "ab", "abc", "abcd", "a/bc", "ab/cd", "a.b/_-/Z9", "x" * 200, "ab/cd/ef/gh.dcm"]
)
def test_unusual_valid_keys(store: ObjectStore, key: str) -> None:
    store.put_stream(key, [key.encode()])
    assert read_all(store, key) == key.encode()
    store.delete(key)
    assert not store.exists(key)


BAD_KEYS = [
    "",
    "/abs",
    "a//b",
    "trailing/",
    "..",
    "../up",
    "a/../b",
    "a..b",
    "./a",
    "a/./b",
    "sp ace",
    "tab\tkey",
    "back\\slash",
    "nul\x00",
    "umlaut-\u00e4",
    "colon:key",
    "x" * 201,
    ".tmp-abc",
    "a/.tmp-b",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_rejected_everywhere(store: ObjectStore, tmp_path: Path, key: str) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"data")
    calls = {
        "put_file": lambda: store.put_file(key, src),
        "put_stream": lambda: store.put_stream(key, [b"data"]),
        "open_read": lambda: store.open_read(key),
        "size": lambda: store.size(key),
        "exists": lambda: store.exists(key),
        "delete": lambda: store.delete(key),
        "validate_key": lambda: validate_key(key),
    }
    for name, call in calls.items():
        with pytest.raises(StorageError, match="invalid object key") as info:
            call()
        shown = key if len(key) <= 80 else key[:80]
        assert repr(shown)[1:-1] in str(info.value), name


@pytest.mark.parametrize("previous", [None, b"old bytes"], ids=["absent", "existing"])
def test_failed_put_stream_leaves_previous_state(
    store: ObjectStore, previous: bytes | None
) -> None:
    key = "ab/cd/partial"
    if previous is not None:
        store.put_stream(key, [previous])
    boom = Boom("source failed midway")

    def gen() -> Iterator[bytes]:
        yield payload(MULTI, seed=5)  # more than one S3 part: a multipart upload is open
        yield b"more"
        raise boom

    with pytest.raises(Boom) as info:
        store.put_stream(key, gen())
    assert info.value is boom, "the iterator's exception propagates unchanged"
    if previous is None:
        assert not store.exists(key)
        with pytest.raises(NotFound):
            store.open_read(key)
    else:
        assert read_all(store, key) == previous


# -- filesystem specifics ---------------------------------------------------


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


def test_fs_layout_and_no_temp_files(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    store.check()
    store.put_stream("abcdef", [b"1"])
    store.put_stream("abc", [b"2"])
    store.put_stream("a/bcd", [b"3"])
    assert (tmp_path / "objects/ab/cd/abcdef").read_bytes() == b"1"
    assert (tmp_path / "objects/abc").read_bytes() == b"2"
    assert (tmp_path / "objects/a_/bc/a/bcd").read_bytes() == b"3"
    assert (tmp_path / "objects/ab/cd/abcdef").stat().st_mode & 0o777 == 0o600
    assert _temp_files(tmp_path / "objects") == []


def test_fs_failed_put_leaves_no_temp_file(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")

    def gen() -> Iterator[bytes]:
        yield b"x" * 100000
        raise Boom

    with pytest.raises(Boom):
        store.put_stream("abcdef", gen())
    assert not store.exists("abcdef")
    assert _temp_files(tmp_path / "objects") == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_fs_temp_file_names_carry_the_writers_pid(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    seen: list[str] = []

    def gen() -> Iterator[bytes]:
        seen.extend(p.name for p in _temp_files(tmp_path / "objects"))
        yield b"x"

    store.put_stream("abcdef", gen())
    assert len(seen) == 1 and seen[0].startswith(f".tmp-{os.getpid()}-"), seen


def test_fs_sweep_deletes_cut_writes_and_keeps_live_writers_files(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FilesystemStore(root)
    store.put_stream("abcdef", [b"kept object"])
    shard = root / "ab" / "cd"
    dead = shard / f".tmp-{_dead_pid()}-link-1234"  # a SIGKILLed writer's
    dead.write_bytes(b"d" * 300)
    mine = shard / f".tmp-{os.getpid()}-x1y2"  # an earlier incarnation with our pid
    mine.write_bytes(b"m" * 20)
    live = root / f".tmp-{os.getppid()}-abcd"  # a live writer sharing the store
    live.write_bytes(b"l")
    old_unowned = shard / ".tmp-abcdefgh"  # an older version's name, hours old
    old_unowned.write_bytes(b"o" * 5)
    os.utime(old_unowned, (time.time() - 7200, time.time() - 7200))
    new_unowned = shard / ".tmp-zyxwvuts"
    new_unowned.write_bytes(b"n")
    assert store.sweep_temp_files() == (3, 325)
    assert sorted(p.name for p in _temp_files(root)) == sorted([live.name, new_unowned.name])
    assert b"".join(store.open_read("abcdef")) == b"kept object"
    assert store.sweep_temp_files() == (0, 0)


def test_fs_os_error_becomes_storage_error(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = FilesystemStore(root)
    store.check()
    (root / "zz").write_bytes(b"a regular file where a shard directory belongs")
    with pytest.raises(StorageError) as info:
        store.put_stream("zzzz-key", [b"data"])
    message = str(info.value)
    assert str(root / "zz") in message
    assert "check disk space/permissions" in message
    assert "File exists" in message or "Not a directory" in message
    src = tmp_path / "src"
    src.write_bytes(b"data")
    with pytest.raises(StorageError, match="check disk space/permissions"):
        store.put_file("zzzz-key", src)
    assert store.size("zzzz-key") is None


def test_fs_missing_source_file(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    with pytest.raises(StorageError, match="No such file"):
        store.put_file("abcd", tmp_path / "missing")


def test_fs_check_fails_when_root_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    root.write_bytes(b"not a directory")
    with pytest.raises(StorageError, match=str(root)):
        FilesystemStore(root).check()
    with pytest.raises(StorageError, match="check disk space/permissions"):
        FilesystemStore(root / "below").check()


# -- S3 specifics -----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_s3_unreachable_is_storage_error_quickly(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{_closed_port()}"
    store = S3Store(
        endpoint, "bucket", "k", "s", secure=False, region="us-east-1", retries=1, timeout=2
    )
    src = tmp_path / "src"
    src.write_bytes(b"data")
    started = time.monotonic()
    for call in (
        store.check,
        lambda: store.put_stream("ab/cd", [b"data"]),
        lambda: store.put_file("ab/cd", src),
        lambda: store.open_read("ab/cd"),
        lambda: store.size("ab/cd"),
        lambda: store.delete("ab/cd"),
    ):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert f"http://{endpoint}" in message
        assert "unreachable" in message
        assert "Connection refused" in message
        assert "check [storage.s3] endpoint" in message
    assert time.monotonic() - started < 5


def test_s3_missing_bucket(s3_server: S3Server) -> None:
    bucket = new_bucket_name()
    store = s3_server.store(bucket)
    with pytest.raises(StorageError, match=f"{bucket}.*does not exist.*create_bucket = true"):
        store.check()
    with pytest.raises(StorageError, match="NoSuchBucket"):
        store.put_stream("abcd", [b"x"])


def test_s3_region_is_bucket_location(s3_server: S3Server) -> None:
    bucket = new_bucket_name()
    ak, sk = s3_server.access_key, s3_server.secret_key
    S3Store(
        s3_server.endpoint, bucket, ak, sk, secure=False, region="eu-central-1", create=True
    ).check()
    try:
        store = S3Store(s3_server.endpoint, bucket, ak, sk, secure=False)  # region not configured
        store.check()
        assert store.region() == "eu-central-1"
        store.put_stream("abcd", [b"x"])
        assert read_all(store, "abcd") == b"x"
        store.delete("abcd")
    finally:
        Minio(s3_server.endpoint, access_key=ak, secret_key=sk, secure=False).remove_bucket(bucket)


def test_s3_failed_multipart_is_aborted(s3_store: S3Store, s3_server: S3Server) -> None:
    def gen() -> Iterator[bytes]:
        yield payload(2 * TEST_PART_SIZE + 1)
        raise Boom

    with pytest.raises(Boom):
        s3_store.put_stream("ab/multipart", gen())
    assert not s3_store.exists("ab/multipart")
    uploads = s3_server.client()._list_multipart_uploads(s3_store.bucket)
    assert not uploads.uploads, "the incomplete multipart upload must be aborted"


def test_s3_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"part size.*part_size_mb"):
        S3Store("127.0.0.1:9000", "b", "k", "s", part_size=MiB)
    with pytest.raises(ConfigError, match="without scheme"):
        S3Store("http://127.0.0.1:9000", "b", "k", "s")


def test_s3_missing_source_file(s3_store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="source file"):
        s3_store.put_file("abcd", tmp_path / "missing")
    assert not os.path.exists(tmp_path / "missing")


def test_adopt_file_moves_the_file_in(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "spooled.bin"
    payload = os.urandom(3 * 1024 * 1024 + 1)
    src.write_bytes(payload)
    key = hashlib.sha256(payload).hexdigest()
    moved_in = store.adopt_file(key, src)
    assert moved_in is isinstance(store, FilesystemStore)  # S3 copies the bytes
    assert not src.exists()
    assert b"".join(store.open_read(key)) == payload


def test_filesystem_adopt_renames_same_inode(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    store.check()
    src = tmp_path / "spooled.bin"
    src.write_bytes(b"spooled bytes")
    inode = src.stat().st_ino
    assert store.adopt_file("ab" * 32, src) is True
    final = store.path_for("ab" * 32)
    assert final.stat().st_ino == inode and final.read_bytes() == b"spooled bytes"
    assert oct(final.stat().st_mode & 0o777) == "0o600"


def test_link_file_stores_and_keeps_the_source(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "spooled.dcm"
    payload = os.urandom(2 * 1024 * 1024 + 7)
    src.write_bytes(payload)
    key = hashlib.sha256(payload).hexdigest()
    store.link_file(key, src)
    store.link_file(key, src)  # again: same object, no error
    assert src.read_bytes() == payload
    src.unlink()  # the spool lets go of it: the stored object stays
    assert b"".join(store.open_read(key)) == payload


def test_filesystem_link_shares_the_inode_and_leaves_no_temp(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    store.check()
    src = tmp_path / "spooled.dcm"
    src.write_bytes(b"spooled bytes")
    src.chmod(0o644)
    store.link_file("cd" * 32, src)
    final = store.path_for("cd" * 32)
    assert final.stat().st_ino == src.stat().st_ino and final.read_bytes() == b"spooled bytes"
    assert oct(final.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_filesystem_link_fails_clearly_when_the_source_is_missing(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "objects")
    store.check()
    with pytest.raises(StorageError, match=r"spooled\.dcm"):
        store.link_file("ef" * 32, tmp_path / "spooled.dcm")
