"""The outbox's wire to a peer node over mTLS gRPC."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from gateway.grpc_status import error_from_rpc
from gateway.rpc.channel import ClientCredentials, open_channel
from gateway.rpc.wire import announce_to_pb
from gateway.telemetry import Telemetry
from gateway.transfer.model import Announce, ChunkMsg, EndMsg, OfferResult, PushItem
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

    def identify(self) -> bytes:
        try:
            reply = self._stub.Identify(transfer_pb2.IdentifyRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from exc
        return bytes(reply.node_certificate)

    def offer(self, transfer_id: str, announce: Announce) -> OfferResult:
        request = transfer_pb2.OfferRequest(
            transfer_id=transfer_id, object=announce_to_pb(announce)
        )
        try:
            reply = self._stub.Offer(request, timeout=self._timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from exc
        receipt = reply.receipt.SerializeToString() if reply.complete else None
        return OfferResult(reply.resume_offset, reply.complete, receipt)

    def push(self, items: Iterator[PushItem]) -> bytes:
        try:
            reply = self._stub.Push(_to_pb(items))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from exc
        return bytes(reply.SerializeToString())

    def close(self) -> None:
        self._channel.close()


def _to_pb(items: Iterator[PushItem]) -> Iterator[transfer_pb2.PushMessage]:
    for item in items:
        if isinstance(item, ChunkMsg):
            yield transfer_pb2.PushMessage(
                chunk=common_pb2.Chunk(offset=item.offset, data=item.data, sha256=item.sha256)
            )
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
