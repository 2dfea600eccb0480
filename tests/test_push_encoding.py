"""The sender's own encoding of Push chunks is exactly protobuf's (peer_link.encode_chunk).

It encodes them itself to copy the data once instead of twice."""

from __future__ import annotations

import hashlib
import os

from gateway.rpc.peer_link import encode_chunk
from yigong.v1 import common_pb2, transfer_pb2


def test_encoded_chunk_is_byte_identical_to_protobufs_serialization() -> None:
    """Offsets and lengths across every varint width, empty data and hash too."""
    for offset in (0, 1, 127, 128, 16_383, 16_384, 1 << 20, 2**35 + 7, 2**63 - 1):
        for size in (0, 1, 127, 128, 16_384, (1 << 20) + 3):
            data = os.urandom(size)
            for digest in (b"", hashlib.sha256(data).digest()):
                ours = encode_chunk(offset, data, digest)
                ref = transfer_pb2.PushMessage(
                    chunk=common_pb2.Chunk(offset=offset, data=data, sha256=digest)
                )
                assert ours == ref.SerializeToString(), (offset, size, len(digest))
                back = transfer_pb2.PushMessage.FromString(ours)
                assert back.WhichOneof("kind") == "chunk"
                assert (back.chunk.offset, back.chunk.data, back.chunk.sha256) == (
                    offset,
                    data,
                    digest,
                )
