"""A small Python client for a node's gRPC API.

Used by the ``yigong`` CLI, the demo and the tests, and a worked example for
engineering tools: everything here is plain calls on stubs generated from
``proto/yigong/v1`` over an mTLS channel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import IntegrityError, ValidationError, YigongError
from gateway.hashing import (
    DEFAULT_CHUNK_BYTES,
    ChunkErrors,
    ChunkProducer,
    ChunkVerifier,
    iter_file_chunks,
)
from gateway.rpc.call import rpc_call, rpc_stream
from gateway.rpc.channel import ClientCredentials, open_channel
from yigong.v1 import (
    common_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

R = TypeVar("R")


class NodeClient:
    """Calls on one node, presenting one certificate."""

    def __init__(
        self,
        address: str,
        creds: ClientCredentials,
        *,
        node_id: str | None = None,
        timeout: float = 30.0,
        target: str | None = None,
    ) -> None:
        self.address = address
        self.target = target or f"node {node_id or ''} at {address}".replace("node  at", "node at")
        self.timeout = timeout
        self.channel = open_channel(address, creds, peer_node_id=node_id)
        self.query = query_pb2_grpc.QueryStub(self.channel)
        self.exchange = exchange_pb2_grpc.ExchangeStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[..., R], request: Any, **kw: Any) -> R:
        """``fn(request)`` with this client's deadline; errors name this node and the call."""
        return rpc_call(fn, request, target=self.target, timeout=self.timeout, **kw)

    def submit(
        self,
        path: Path,
        destinations: list[str],
        *,
        case_id: str = "",
        media_type: str = "application/octet-stream",
        name: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: Callable[[int], None] | None = None,
    ) -> exchange_pb2.SubmitResponse:
        """Upload ``path`` to the node and queue it for ``destinations``.

        ``progress`` (optional) is called with the number of bytes of each chunk as
        it is handed to the channel."""
        path = Path(path)
        if not path.is_file():
            raise ValidationError(f"{path} is not a readable file")
        size = path.stat().st_size

        def messages() -> Iterator[exchange_pb2.SubmitMessage]:
            yield exchange_pb2.SubmitMessage(
                start=exchange_pb2.SubmitStart(
                    name=name or path.name,
                    media_type=media_type,
                    case_id=case_id,
                    destinations=destinations,
                    size=size,
                )
            )
            with open(path, "rb") as fh:
                for chunk in ChunkProducer(iter_file_chunks(fh, chunk_bytes), make=_pb_chunk):
                    yield exchange_pb2.SubmitMessage(chunk=chunk)
                    if progress is not None:
                        progress(len(chunk.data))

        return rpc_call(self.exchange.Submit, messages(), target=self.target, timeout=None)

    def list_objects(self, **filters: str | int) -> list[common_pb2.ObjectInfo]:
        req = _listing(query_pb2.ListObjectsRequest, filters, "case_id", "peer")
        return list(self._call(self.query.ListObjects, req).objects)

    def get_object(self, object_id: str) -> query_pb2.ObjectDetail:
        return self._call(self.query.GetObject, query_pb2.GetObjectRequest(object_id=object_id))

    def list_transfers(self, **filters: str | int) -> list[common_pb2.TransferInfo]:
        req = _listing(
            query_pb2.ListTransfersRequest, filters,
            "case_id", "peer", "status", "direction", "object_id",
        )  # fmt: skip
        return list(self._call(self.query.ListTransfers, req).transfers)

    def list_batches(self, **filters: str | int) -> list[query_pb2.BatchInfo]:
        req = _listing(
            query_pb2.ListBatchesRequest, filters, "case_id", "peer", "status", "direction"
        )
        return list(self._call(self.query.ListBatches, req).batches)

    def download(self, object_id: str, dest: Path) -> tuple[str, int]:
        """Stream an object to ``dest`` (atomically), verifying every chunk and the whole."""
        dest = Path(dest)
        if dest.is_dir():
            raise ValidationError(
                f"{dest} is a directory: give the file to write, e.g. -o {dest / object_id[:16]}"
            )
        tmp = dest.with_name(f".{dest.name}.part")
        errors = _DownloadErrors(self.target, object_id)
        verifier = ChunkVerifier(errors, skip_empty=True)
        expected_sha, expected_size = "", -1
        try:
            stream = rpc_stream(
                self.query.ReadObject,
                query_pb2.ReadObjectRequest(object_id=object_id),
                target=self.target,
            )
            with open(tmp, "wb") as fh:
                for msg in stream:
                    if msg.object_sha256:
                        errors.expected_sha = expected_sha = msg.object_sha256
                        errors.expected_size = expected_size = msg.object_size
                    verifier.check(msg.chunk.offset, msg.chunk.data, msg.chunk.sha256)
                    fh.write(msg.chunk.data)
                fh.flush()
                os.fsync(fh.fileno())
            digest, size = verifier.finish(sha256=(expected_sha, object_id), size=(expected_size,))
            os.replace(tmp, dest)
            return digest, size
        finally:
            tmp.unlink(missing_ok=True)


def _pb_chunk(offset: int, data: bytes, sha256: bytes) -> common_pb2.Chunk:
    return common_pb2.Chunk(offset=offset, data=data, sha256=sha256)


class _DownloadErrors(ChunkErrors):
    """A download's chunk errors, naming the node and the object."""

    def __init__(self, target: str, object_id: str) -> None:
        super().__init__(f"{target}: object {object_id}")
        self.target, self.object_id = target, object_id
        self.expected_sha, self.expected_size = "", -1  # what the stream's header says

    def bad_offset(self, offset: int, expected: int) -> YigongError:
        return self.bad_chunk(offset, expected)

    def bad_chunk(self, offset: int, expected: int) -> YigongError:
        return IntegrityError(
            f"{self.target}: chunk at offset {offset} of object {self.object_id} does not "
            "match its SHA-256"
        )

    def bad_whole(self, digest: str, size: int) -> YigongError:
        return IntegrityError(
            f"{self.target}: object {self.object_id} arrived with SHA-256 {digest} and "
            f"{size} bytes; expected {self.expected_sha} and {self.expected_size}"
        )


_Req = TypeVar("_Req")


def _listing(request: Callable[..., _Req], filters: Mapping[str, str | int], *names: str) -> _Req:
    """A listing request: the named filters (text, "" when absent), the time range
    (``since``, ``until``) and the page size (``limit``, 0 = the server's default)."""
    return request(
        **{name: str(filters.get(name, "")) for name in names},
        time=query_pb2.TimeRange(
            since=str(filters.get("since", "")), until=str(filters.get("until", ""))
        ),
        limit=int(filters.get("limit", 0)),
    )
