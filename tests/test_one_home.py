"""One home each for chunk streams, client RPC calls and retry delays (issue #15.4).

Two kinds of tests:

* **Where the code lives** (AST scans of ``gateway/``, ``hospital_node/``,
  ``factory_node/``): no per-chunk SHA-256 outside :mod:`gateway.hashing`, no
  ``except grpc.RpcError`` outside :mod:`gateway.rpc.call`, no hand-rolled
  exponential backoff outside :mod:`gateway.backoff`. Exceptions are listed below
  with the reason for each; a failure names the file, line and what to use instead.
* **What the one home does**: :class:`~gateway.hashing.ChunkVerifier` on good and
  bad streams (error classes and texts), :class:`~gateway.hashing.ChunkProducer`,
  :class:`~gateway.backoff.Backoff`, and :func:`~gateway.rpc.call.rpc_call` and
  friends against real nodes and a real (hostile) mTLS server.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from gateway.backoff import Backoff
from gateway.cli.download import fetch
from gateway.errors import (
    IntegrityError,
    NotFound,
    PeerUnavailable,
    ValidationError,
    YigongError,
)
from gateway.hashing import (
    Chunk,
    ChunkErrors,
    ChunkProducer,
    ChunkVerifier,
    hash_fd,
    iter_fd_region,
)
from gateway.rpc.call import call_name, rpc_call, rpc_errors, rpc_stream
from gateway.rpc.client import NodeClient
from gateway.transfer.model import ChunkMsg
from tests.cluster import Federation, InProcessNode
from yigong.v1 import common_pb2, query_pb2, query_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "hospital_node", "factory_node")

# -- where the code lives ------------------------------------------------------------------

SHA256_ALLOWED: dict[str, str] = {
    # file -> why it may call hashlib.sha256 itself (never on a chunk: see CHUNK_NAMES)
    "gateway/hashing.py": "the one hasher",
    "gateway/server.py": "fingerprint of the node's config file (audit), not object bytes",
    "gateway/transfer/manifest.py": "Merkle tree of a batch manifest: hashes the manifest's "
    "entries (transfer id, object id, size, facts) and inner nodes, never object bytes",
    "hospital_node/release.py": "digests of a recipient context, a confirmation body and a "
    "de-identified object held whole in memory",
    "hospital_node/outbound/identifiers.py": "fingerprint of the identifier pattern set",
    "gateway/dbcopy.py": "digest of a copied table's rows (SQLite and PostgreSQL compared), "
    "not object bytes",
}
CHUNK_SHA256_ALLOWED: dict[str, str] = {
    # file -> why it may hash a chunk inline
    "gateway/hashing.py": "the one chunk producer and verifier",
}
CHUNK_NAMES = {"data", "chunk", "block", "blk", "buf", "piece"}
"""An argument named so (or ``x.data``) is a chunk of an object being streamed."""

RPC_ERROR_ALLOWED: dict[str, str] = {
    "gateway/rpc/call.py": "the one RPC-call wrapper",
}
BACKOFF_ALLOWED: dict[str, str] = {
    "gateway/backoff.py": "the one backoff",
}


def _allowed(rel: str, table: dict[str, str]) -> bool:
    """``rel`` is listed in ``table`` (a key ending in "/" is a folder)."""
    return any(rel == key or (key.endswith("/") and rel.startswith(key)) for key in table)


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=rel)


def _report(found: list[str]) -> str:
    """Findings ordered by file and line."""

    def place(line: str) -> tuple[str, int]:
        path, lineno, _ = line.split(":", 2)
        return path, int(lineno) if lineno.isdigit() else 0

    return "\n".join(sorted(found, key=place))


def _is_sha256(func: ast.expr) -> bool:
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "sha256"
        and isinstance(func.value, ast.Name)
        and func.value.id == "hashlib"
    ) or (isinstance(func, ast.Name) and func.id == "sha256")


def _names_a_chunk(arg: ast.expr) -> bool:
    if isinstance(arg, ast.Name):
        return arg.id in CHUNK_NAMES
    if isinstance(arg, ast.Attribute):
        return arg.attr == "data" or _names_a_chunk(arg.value)
    return False


def test_no_sha256_of_object_bytes_outside_the_one_hasher() -> None:
    """Every hashlib.sha256 call lives in gateway/hashing.py or a file listed (with its
    reason) in SHA256_ALLOWED; every per-chunk one in hashing.py alone."""
    found = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _is_sha256(node.func)):
                continue
            chunk = bool(node.args) and _names_a_chunk(node.args[0])
            if chunk and not _allowed(rel, CHUNK_SHA256_ALLOWED):
                found.append(
                    f"{rel}:{node.lineno}: SHA-256 of a chunk ({ast.unparse(node)}): produce "
                    "chunks with gateway.hashing.ChunkProducer and check them with ChunkVerifier"
                )
            elif not _allowed(rel, SHA256_ALLOWED):
                found.append(
                    f"{rel}:{node.lineno}: {ast.unparse(node)}: use gateway.hashing (sha256_hex, "
                    "sha256_bytes, StreamHasher, hash_file), or list the file with its reason "
                    "in SHA256_ALLOWED if it is no object's bytes"
                )
    assert not found, _report(found)


def test_no_grpc_error_caught_outside_the_one_rpc_wrapper() -> None:
    """No `except grpc.RpcError` outside gateway/rpc/call.py: every client call goes
    through rpc_call / rpc_stream / rpc_errors, so every failure names peer and call."""
    found = []
    for rel, tree in _sources():
        if _allowed(rel, RPC_ERROR_ALLOWED):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                if "RpcError" in ast.unparse(node.type):
                    found.append(
                        f"{rel}:{node.lineno}: except {ast.unparse(node.type)}: call the stub "
                        "through gateway.rpc.call.rpc_call (or rpc_stream / rpc_errors; pass "
                        "translate= for a status that means something special there)"
                    )
    assert not found, _report(found)


def _doubling(node: ast.AST) -> str | None:
    """``2 ** <variable>``, ``x *= 2``, or ``min(x * 2, cap)``: a hand-rolled backoff."""
    if (
        isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Pow)
        and isinstance(node.left, ast.Constant)
        and node.left.value in (2, 2.0)
        and not isinstance(node.right, ast.Constant)
    ):
        return ast.unparse(node)
    if (
        isinstance(node, ast.AugAssign)
        and isinstance(node.op, ast.Mult)
        and isinstance(node.value, ast.Constant)
        and node.value.value in (2, 2.0)
    ):
        return ast.unparse(node)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "min":
        for arg in node.args:
            if (
                isinstance(arg, ast.BinOp)
                and isinstance(arg.op, ast.Mult)
                and any(
                    isinstance(s, ast.Constant) and s.value in (2, 2.0)
                    for s in (arg.left, arg.right)
                )
            ):
                return ast.unparse(node)
    return None


def test_no_backoff_loop_of_its_own() -> None:
    """No `2 ** attempt`, `delay *= 2` or `min(delay * 2, cap)` outside gateway/backoff.py:
    every retry loop asks gateway.backoff.Backoff for its delay."""
    found = []
    for rel, tree in _sources():
        if _allowed(rel, BACKOFF_ALLOWED):
            continue
        for node in ast.walk(tree):
            what = _doubling(node)
            if what is not None:
                found.append(
                    f"{rel}:{getattr(node, 'lineno', '?')}: {what}: a backoff of its own; use "
                    "gateway.backoff.Backoff(initial, maximum).delay(failures)"
                )
    assert not found, _report(found)


def test_every_listed_exception_names_an_existing_file() -> None:
    """The allowance lists name files (or folders) that exist: a moved file is listed anew."""
    lists = (SHA256_ALLOWED, CHUNK_SHA256_ALLOWED, RPC_ERROR_ALLOWED, BACKOFF_ALLOWED)
    missing = sorted({f for allowed in lists for f in allowed if not (ROOT / f).exists()})
    assert not missing, f"allowances for files that do not exist: {missing}"


# -- the chunk verifier ----------------------------------------------------------------------

PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10244 bytes
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
STEP = 4096


def _chunks(payload: bytes = PAYLOAD, step: int = STEP, offset: int = 0) -> list[Chunk]:
    blocks = [payload[i : i + step] for i in range(offset, len(payload), step)]
    return list(ChunkProducer(blocks, offset=offset))


def test_producer_chunks_with_offsets_hashes_and_whole_digest() -> None:
    """Each produced chunk carries its offset and its own SHA-256; the running whole
    digest and size are the payload's."""
    blocks = [PAYLOAD[i : i + STEP] for i in range(0, len(PAYLOAD), STEP)]
    producer = ChunkProducer(blocks, whole=True)
    chunks = list(producer)
    assert [c.offset for c in chunks] == [0, 4096, 8192]
    assert all(c.sha256 == hashlib.sha256(c.data).digest() for c in chunks)
    assert b"".join(c.data for c in chunks) == PAYLOAD
    assert (producer.hexdigest(), producer.size, producer.position) == (
        DIGEST,
        len(PAYLOAD),
        len(PAYLOAD),
    )


def test_producer_from_an_offset_builds_the_callers_type() -> None:
    """From offset 4096 with make=ChunkMsg: ChunkMsg objects whose offsets continue there."""
    producer = ChunkProducer([PAYLOAD[4096:8192], PAYLOAD[8192:]], offset=4096, make=ChunkMsg)
    chunks = list(producer)
    assert all(isinstance(c, ChunkMsg) for c in chunks)
    assert [(c.offset, len(c.data)) for c in chunks] == [(4096, 4096), (8192, 2052)]
    assert producer.size == len(PAYLOAD) - 4096
    with pytest.raises(RuntimeError, match="keeps no whole-object digest"):
        producer.hexdigest()


def test_verifier_accepts_a_good_stream_and_returns_digest_and_size() -> None:
    """A stream checked chunk by chunk ends with the payload's SHA-256 and size."""
    verifier = ChunkVerifier(max_chunk=STEP, announced_size=len(PAYLOAD))
    for c in _chunks():
        verifier.check(*c)
    assert verifier.finish(sha256=[DIGEST], size=[len(PAYLOAD)]) == (DIGEST, len(PAYLOAD))


def test_verifier_refuses_a_chunk_that_does_not_match_its_sha256() -> None:
    """One changed byte in the second chunk: IntegrityError naming its offset."""
    verifier = ChunkVerifier(ChunkErrors("transfer T-1"))
    first, second, _ = _chunks()
    verifier.check(*first)
    altered = b"X" + second.data[1:]
    with pytest.raises(IntegrityError) as err:
        verifier.check(second.offset, altered, second.sha256)
    assert str(err.value) == "transfer T-1: chunk at offset 4096 does not match its SHA-256"
    assert verifier.position == 4096  # the altered chunk was not counted


def test_verifier_refuses_a_chunk_at_the_wrong_offset() -> None:
    """A chunk that skips ahead: ValidationError with the offset and the expected one."""
    verifier = ChunkVerifier(ChunkErrors("transfer T-1"))
    _, second, _ = _chunks()
    with pytest.raises(ValidationError) as err:
        verifier.check(*second)
    assert str(err.value) == "transfer T-1: chunk at offset 4096, expected 0"


def test_verifier_refuses_an_oversize_chunk_or_one_past_the_announced_size() -> None:
    """Above max_chunk, or running past announced_size: the receiver's exact wording."""
    big = ChunkVerifier(ChunkErrors("transfer T-1"), max_chunk=1024)
    (c, *_) = _chunks()
    with pytest.raises(ValidationError) as err:
        big.check(*c)
    assert str(err.value) == (
        "transfer T-1: chunk of 4096 bytes at 0 exceeds the chunk limit or the announced size"
    )
    short = ChunkVerifier(ChunkErrors("transfer T-1"), announced_size=5000)
    first, second, _ = _chunks()
    short.check(*first)
    with pytest.raises(ValidationError, match="chunk of 4096 bytes at 4096 exceeds"):
        short.check(*second)


def test_verifier_refuses_a_stream_past_the_object_size_limit() -> None:
    """max_total (the node's transfer.max_object_bytes) is checked as bytes arrive."""
    verifier = ChunkVerifier(ChunkErrors("upload"), max_total=6000)
    first, second, _ = _chunks()
    verifier.check(*first)
    with pytest.raises(ValidationError) as err:
        verifier.check(*second)
    assert str(err.value) == "upload exceeds the limit of 6000 bytes"


def test_verifier_refuses_a_size_that_differs_from_the_announced_one() -> None:
    """All chunks good, but fewer bytes than announced: IntegrityError at the end."""
    verifier = ChunkVerifier(ChunkErrors("transfer T-1"))
    first, second, _ = _chunks()
    verifier.check(*first)
    verifier.check(*second)
    with pytest.raises(IntegrityError) as err:
        verifier.finish(sha256=[DIGEST], size=[len(PAYLOAD)])
    digest = hashlib.sha256(PAYLOAD[:8192]).hexdigest()
    assert str(err.value) == (
        f"transfer T-1: arrived with SHA-256 {digest} and 8192 bytes, not as expected"
    )


def test_verifier_refuses_a_whole_digest_that_differs() -> None:
    """Every chunk consistent with itself, but not the object announced: IntegrityError."""
    other = PAYLOAD[:-1] + b"!"
    verifier = ChunkVerifier(ChunkErrors("transfer T-1"))
    for c in _chunks(other):
        verifier.check(*c)
    with pytest.raises(IntegrityError, match=r"arrived with SHA-256 [0-9a-f]{64} and 10244 bytes"):
        verifier.finish(sha256=[DIGEST], size=[len(PAYLOAD)])


def test_verifier_resumes_hashing_what_is_already_held() -> None:
    """From offset 8192 with the first 8192 bytes fed to resume(): the whole digest."""
    verifier = ChunkVerifier(offset=8192)
    verifier.resume([PAYLOAD[:4096], PAYLOAD[4096:8192]])
    for c in _chunks(offset=8192):
        verifier.check(*c)
    assert verifier.finish(sha256=[DIGEST]) == (DIGEST, len(PAYLOAD))


def test_verifier_options_for_uploads_and_downloads() -> None:
    """require_sha256=False accepts a chunk without a hash (an upload's client may leave it
    out) but still checks one that has it; skip_empty ignores a download's header chunk."""
    upload = ChunkVerifier(require_sha256=False)
    upload.check(0, PAYLOAD[:10], b"")
    with pytest.raises(IntegrityError):
        upload.check(10, PAYLOAD[10:20], hashlib.sha256(b"other").digest())
    strict = ChunkVerifier()
    with pytest.raises(IntegrityError):
        strict.check(0, PAYLOAD[:10], b"")
    download = ChunkVerifier(skip_empty=True)
    download.check(12345, b"", b"")  # the header message: no bytes, no offset to check
    assert download.position == 0


def test_fd_region_reads_a_growing_file_by_region_and_hash_fd_hashes_it_whole(
    tmp_path: Path,
) -> None:
    """iter_fd_region reads [start, end) of a file that is still growing; hash_fd hashes it.

    Blocks are at most chunk_bytes, reading stops at end of file (a spool still being
    appended to), and hash_fd gives the whole file's SHA-256 and size."""
    path = tmp_path / "spool.part"
    path.write_bytes(PAYLOAD[:6000])
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = list(iter_fd_region(fd, 1000, 5000, chunk_bytes=1500))
        assert [len(b) for b in blocks] == [1500, 1500, 1000]
        assert b"".join(blocks) == PAYLOAD[1000:5000]
        assert b"".join(iter_fd_region(fd, 4096, 99_999)) == PAYLOAD[4096:6000]  # short file
        with open(path, "ab") as fh:  # the file grows behind the reader
            fh.write(PAYLOAD[6000:])
        assert b"".join(iter_fd_region(fd, 6000)) == PAYLOAD[6000:]
        assert hash_fd(fd, chunk_bytes=STEP) == (DIGEST, len(PAYLOAD))
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # pread: the position is untouched
    finally:
        os.close(fd)


class _Worded(ChunkErrors):
    def bad_chunk(self, offset: int, expected: int) -> YigongError:
        return IntegrityError(f"custom: {offset}/{expected}")


def test_a_call_site_words_its_own_errors() -> None:
    """A ChunkErrors subclass changes the text, not the check."""
    verifier = ChunkVerifier(_Worded())
    (c, *_) = _chunks()
    with pytest.raises(IntegrityError, match=r"^custom: 0/0$"):
        verifier.check(c.offset, c.data[::-1], c.sha256)


# -- the backoff -----------------------------------------------------------------------------


def test_backoff_doubles_from_initial_up_to_the_cap() -> None:
    """1, 2, 4, 8, then the cap of 10 s, and no overflow after very many failures."""
    b = Backoff(1.0, 10.0)
    assert [b.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.delay(100_000) == 10.0
    assert b.delay(0) == 1.0  # "no failure yet" waits like the first


def test_backoff_jitter_stays_within_bounds_and_is_reproducible() -> None:
    """With jitter 0.5 every delay is in [d/2, d]; the same seed gives the same delays."""
    first = Backoff(1.0, 8.0, jitter=0.5, rng=random.Random(7))
    second = Backoff(1.0, 8.0, jitter=0.5, rng=random.Random(7))
    got = [first.delay(n) for n in range(1, 6)]
    assert got == [second.delay(n) for n in range(1, 6)]
    for n, d in enumerate(got, start=1):
        full = min(8.0, 2.0 ** (n - 1))
        assert full / 2 <= d <= full
    assert len(set(got)) > 1


def test_backoff_refuses_nonsense_settings() -> None:
    """initial above maximum, a shrinking factor or jitter above 1: ValueError saying so."""
    with pytest.raises(ValueError, match="0 < initial <= maximum"):
        Backoff(5.0, 1.0)
    with pytest.raises(ValueError, match="factor >= 1"):
        Backoff(1.0, 5.0, factor=0.5)
    with pytest.raises(ValueError, match="jitter <= 1"):
        Backoff(1.0, 5.0, jitter=2.0)


# -- the RPC-call wrapper against real servers ---------------------------------------------


def test_a_failed_call_names_the_node_and_the_call(
    pair: tuple[InProcessNode, InProcessNode],
) -> None:
    """GetObject of an object the node does not hold: NotFound naming node and call."""
    _, factory = pair
    with factory.self_client() as client:
        with pytest.raises(NotFound) as err:
            client.get_object("0" * 64)
        assert call_name(client.query.GetObject) == "GetObject"
    assert str(err.value).startswith(
        f"node factory-1 at {factory.address} answered NOT_FOUND to GetObject: "
    )


def test_an_unreachable_node_is_peer_unavailable_and_translate_can_reword(
    federation: Federation,
) -> None:
    """Nothing listens: PeerUnavailable naming the target; a translate hook's own error
    wins; returning None keeps the usual one."""
    creds = federation.creds(federation.node("hospital-1", "hospital"))
    with NodeClient("127.0.0.1:1", creds, node_id="factory-1", timeout=5) as client:
        req = query_pb2.GetObjectRequest(object_id="0" * 64)
        with pytest.raises(
            PeerUnavailable,
            match=r"^node factory-1 at 127\.0\.0\.1:1 answered UNAVAILABLE to GetObject",
        ):
            rpc_call(client.query.GetObject, req, target=client.target, timeout=5)
        with pytest.raises(ValidationError, match=r"^mine: UNAVAILABLE$"):
            rpc_call(
                client.query.GetObject,
                req,
                target=client.target,
                timeout=5,
                translate=lambda code, details: ValidationError(f"mine: {code.name}"),
            )
        with pytest.raises(PeerUnavailable):
            with rpc_errors(client.target, "ListObjects", lambda code, details: None):
                client.query.ListObjects(query_pb2.ListObjectsRequest(), timeout=5)
        with pytest.raises(PeerUnavailable, match="to ReadObject"):
            list(
                rpc_stream(
                    client.query.ReadObject,
                    query_pb2.ReadObjectRequest(),
                    target=client.target,
                    timeout=5,
                )
            )


class _HostileQuery(query_pb2_grpc.QueryServicer):
    """A node's Query service that serves PAYLOAD with one fault."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def ReadObject(
        self, request: query_pb2.ReadObjectRequest, context: grpc.ServicerContext
    ) -> Iterator[query_pb2.ReadObjectResponse]:
        first = True
        for c in _chunks(offset=request.offset):
            data, offset = c.data, c.offset
            if self.fault == "chunk" and offset == 4096:
                data = b"X" + data[1:]
            if self.fault == "offset" and offset == 4096:
                offset = 5000
            msg = query_pb2.ReadObjectResponse(
                chunk=common_pb2.Chunk(offset=offset, data=data, sha256=c.sha256)
            )
            if first:
                msg.object_sha256, msg.object_size, first = DIGEST, len(PAYLOAD), False
                if self.fault == "whole":
                    msg.object_size = len(PAYLOAD) + 1
            yield msg


@pytest.fixture
def hostile(federation: Federation) -> Iterator[tuple[str, _HostileQuery]]:
    """A real mTLS gRPC server with factory-1's certificate; set ``.fault`` to spoil it."""
    issued = federation.node("factory-1", "factory")
    creds = grpc.ssl_server_credentials(
        [(issued.key_path.read_bytes(), issued.cert_path.read_bytes())],
        root_certificates=federation.ca.read_bytes(),
        require_client_auth=True,
    )
    servicer = _HostileQuery("none")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    query_pb2_grpc.add_QueryServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0).wait()


@pytest.mark.parametrize(
    ("fault", "text"),
    [
        ("chunk", "chunk at offset 4096 of object {oid} does not match its SHA-256"),
        ("offset", "chunk at offset 5000 of object {oid} does not match its SHA-256"),
        (
            "whole",
            "object {oid} arrived with SHA-256 {oid} and 10244 bytes; expected {oid} and 10245",
        ),
    ],
)
def test_client_download_refuses_a_bad_stream_from_a_real_server(
    federation: Federation,
    hostile: tuple[str, _HostileQuery],
    tmp_path: Path,
    fault: str,
    text: str,
) -> None:
    """NodeClient.download over mTLS: a bad chunk, a chunk out of place or a whole that
    disagrees with the header is an IntegrityError; nothing is left at the target."""
    address, server = hostile
    creds = federation.creds(federation.node("hospital-1", "hospital"))
    with NodeClient(address, creds, node_id="factory-1") as client:
        server.fault = "none"
        assert client.download(DIGEST, tmp_path / "good.bin") == (DIGEST, len(PAYLOAD))
        assert (tmp_path / "good.bin").read_bytes() == PAYLOAD
        server.fault = fault
        with pytest.raises(IntegrityError) as err:
            client.download(DIGEST, tmp_path / "bad.bin")
    assert str(err.value) == f"{client.target}: " + text.format(oid=DIGEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.bin"]


def test_cli_download_resumes_through_the_verifier_and_refuses_a_bad_chunk(
    federation: Federation, hostile: tuple[str, _HostileQuery], tmp_path: Path
) -> None:
    """`yigong query download`'s fetch: a partial file is hashed into the verifier and the
    rest fetched from its offset; a bad chunk fails with the position and drops the part."""
    address, server = hostile
    creds = federation.creds(federation.node("hospital-1", "hospital"))
    dest = tmp_path / "obj.bin"
    part = tmp_path / ".obj.bin.part"
    with NodeClient(address, creds, node_id="factory-1") as client:
        part.write_bytes(PAYLOAD[:4096])
        outcome = fetch(client, DIGEST, dest, len(PAYLOAD))
        assert (outcome.state, outcome.error) == ("resumed", "")
        assert dest.read_bytes() == PAYLOAD and not part.exists()
        dest.unlink()
        server.fault = "chunk"
        bad = fetch(client, DIGEST, dest, len(PAYLOAD))
    assert bad.state == "failed"
    assert bad.error == (
        f"{client.target}: chunk at offset 4096 of object {DIGEST} does not match its "
        "SHA-256 or position 4096"
    )
    assert not dest.exists() and not part.exists()
