"""The outbox's wire to a peer node over mTLS gRPC."""

from __future__ import annotations

from collections.abc import Iterator

from gateway.rpc.call import rpc_call, rpc_errors
from gateway.rpc.channel import ClientCredentials, open_channel
from gateway.rpc.wire import announce_to_pb
from gateway.telemetry import Telemetry
from gateway.transfer.model import (
    Announce,
    BatchAckItem,
    BatchEndMsg,
    BatchItem,
    BatchObjectState,
    BatchStartMsg,
    BatchStatusResult,
    ChunkMsg,
    EndMsg,
    ManifestAck,
    ObjectStartMsg,
    OfferResult,
    PushItem,
    StoredAck,
)
from yigong.v1 import common_pb2, transfer_pb2, transfer_pb2_grpc


class GrpcPeerLink:
    def __init__(
        self,
        peer_id: str,
        address: str,
        creds: ClientCredentials,
        timeout: float,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.target = f"peer {peer_id} at {address}"
        self._timeout = timeout
        self._channel = open_channel(address, creds, peer_node_id=peer_id)
        calls = telemetry.instrument_channel(self._channel) if telemetry else self._channel
        self._stub = transfer_pb2_grpc.TransferStub(calls)
        # Push with chunks encoded here (one copy of the data instead of two: see _to_pb)
        self._push = calls.stream_unary(
            "/yigong.v1.Transfer/Push",
            request_serializer=_serialize,
            response_deserializer=common_pb2.SignedReceipt.FromString,
        )

    def identify(self) -> bytes:
        reply = rpc_call(
            self._stub.Identify,
            transfer_pb2.IdentifyRequest(),
            target=self.target,
            timeout=self._timeout,
            call="Identify",
        )
        return bytes(reply.node_certificate)

    def offer(self, transfer_id: str, announce: Announce) -> OfferResult:
        request = transfer_pb2.OfferRequest(
            transfer_id=transfer_id, object=announce_to_pb(announce)
        )
        reply = rpc_call(
            self._stub.Offer,
            request,
            target=self.target,
            timeout=self._timeout,
            call="Offer",
            wait_for_ready=False,
        )
        receipt = reply.receipt.SerializeToString() if reply.complete else None
        return OfferResult(reply.resume_offset, reply.complete, receipt)

    def push(self, items: Iterator[PushItem]) -> bytes:
        # no deadline: a push lasts as long as the object takes at the link's speed
        reply = rpc_call(self._push, _to_pb(items), target=self.target, timeout=None, call="Push")
        return bytes(reply.SerializeToString())

    def batch_status(self, batch_id: str) -> BatchStatusResult:
        request = transfer_pb2.BatchStatusRequest(batch_id=batch_id)
        reply = rpc_call(
            self._stub.BatchStatus,
            request,
            target=self.target,
            timeout=self._timeout,
            call="BatchStatus",
        )
        return BatchStatusResult(
            tuple(
                BatchObjectState(s.transfer_id, s.object_id, s.held, s.resume_offset)
                for s in reply.objects
            ),
            reply.receipt.SerializeToString() if reply.HasField("receipt") else None,
        )

    def push_batch(self, items: Iterator[BatchItem]) -> Iterator[BatchAckItem]:
        """Stream ``items``; yields the receiver's acknowledgements as they arrive."""
        call = self._stub.PushBatch(_batch_to_pb(items))
        try:
            with rpc_errors(self.target, "PushBatch"):
                for ack in call:
                    kind = ack.WhichOneof("kind")
                    if kind == "stored":
                        yield StoredAck(ack.stored.transfer_id, ack.stored.sha256)
                    elif kind == "receipt":
                        yield ManifestAck(ack.receipt.SerializeToString())
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()


def _serialize(message: transfer_pb2.PushMessage | bytes) -> bytes:
    """Push's request serializer: chunk messages come already encoded."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_chunk(offset: int, data: bytes, sha256: bytes) -> bytes:
    """``PushMessage(chunk=Chunk(offset, data, sha256))`` in protobuf's wire format, with
    the data copied once (building the message and serializing it copied it twice)."""
    head = (b"\x08" + _varint(offset) if offset else b"") + (
        b"\x12" + _varint(len(data)) if data else b""
    )
    tail = b"\x1a" + _varint(len(sha256)) + sha256 if sha256 else b""
    inner = len(head) + len(data) + len(tail)
    return b"".join((b"\x12" + _varint(inner) + head, data, tail))


def _to_pb(items: Iterator[PushItem]) -> Iterator[transfer_pb2.PushMessage | bytes]:
    for item in items:
        if isinstance(item, ChunkMsg):
            yield encode_chunk(item.offset, item.data, item.sha256)
        elif isinstance(item, EndMsg):
            yield transfer_pb2.PushMessage(
                end=transfer_pb2.PushEnd(sha256=item.sha256, size=item.size)
            )
        else:
            yield transfer_pb2.PushMessage(
                start=transfer_pb2.PushStart(
                    transfer_id=item.transfer_id,
                    object=announce_to_pb(item.announce),
                    offset=item.offset,
                )
            )


def _batch_to_pb(items: Iterator[BatchItem]) -> Iterator[transfer_pb2.BatchMessage]:
    for item in items:
        if isinstance(item, ChunkMsg):
            yield transfer_pb2.BatchMessage(
                chunk=common_pb2.Chunk(offset=item.offset, data=item.data, sha256=item.sha256)
            )
        elif isinstance(item, ObjectStartMsg):
            yield transfer_pb2.BatchMessage(
                object=transfer_pb2.ObjectStart(
                    transfer_id=item.transfer_id,
                    object=announce_to_pb(item.announce),
                    offset=item.offset,
                )
            )
        elif isinstance(item, EndMsg):
            yield transfer_pb2.BatchMessage(
                object_end=transfer_pb2.PushEnd(sha256=item.sha256, size=item.size)
            )
        elif isinstance(item, BatchStartMsg):
            yield transfer_pb2.BatchMessage(
                start=transfer_pb2.BatchStart(
                    batch_id=item.batch_id, case_id=item.case_id, ref=item.ref, kind=item.kind
                )
            )
        elif isinstance(item, BatchEndMsg):
            yield transfer_pb2.BatchMessage(
                end=transfer_pb2.BatchEnd(transfer_ids=list(item.transfer_ids))
            )
