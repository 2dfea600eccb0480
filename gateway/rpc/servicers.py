"""Thin gRPC servicers: wire → domain call → wire.

Authentication and authorization already happened in the interceptor; the
servicers only ask the gatekeeper for the caller's identity, convert
messages, call the domain and convert the answer or error.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from gateway.catalog import ObjectRecord
from gateway.errors import ValidationError
from gateway.exchange import Exchange, Submission
from gateway.query import ObjectFilter, QueryService, TransferFilter
from gateway.rpc.auth import Gatekeeper, refusals_audited, stream_with_errors, wire_errors
from gateway.rpc.wire import announce_from_pb, batch_to_pb, object_to_pb, transfer_to_pb
from gateway.transfer.model import (
    BatchAckItem,
    BatchEndMsg,
    BatchItem,
    BatchStartMsg,
    ChunkMsg,
    EndMsg,
    ObjectStartMsg,
    PushItem,
    StartMsg,
    StoredAck,
)
from gateway.transfer.receiver import Receiver
from yigong.v1 import (
    common_pb2,
    exchange_pb2,
    exchange_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
    transfer_pb2,
    transfer_pb2_grpc,
)


class TransferServicer(transfer_pb2_grpc.TransferServicer):
    def __init__(self, gate: Gatekeeper, receiver: Receiver) -> None:
        self.gate = gate
        self.receiver = receiver

    def Identify(
        self, request: transfer_pb2.IdentifyRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.IdentifyResponse:
        return transfer_pb2.IdentifyResponse(node_certificate=self.receiver.cert_pem)

    def Offer(
        self, request: transfer_pb2.OfferRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.OfferResponse:
        with (
            wire_errors(context, "Transfer.Offer"),
            refusals_audited(self.gate, context, "Transfer.Offer", "transfer.refused"),
        ):
            caller = self.gate.identity(context)
            result = self.receiver.offer(
                caller, request.transfer_id, announce_from_pb(request.object)
            )
            reply = transfer_pb2.OfferResponse(
                resume_offset=result.resume_offset,
                complete=result.complete,
                max_chunk_bytes=self.receiver.settings.max_chunk_bytes,
            )
            if result.receipt:
                reply.receipt.ParseFromString(result.receipt)
            return reply
        raise AssertionError("unreachable")

    def Push(
        self, request_iterator: Iterator[transfer_pb2.PushMessage], context: grpc.ServicerContext
    ) -> common_pb2.SignedReceipt:
        with (
            wire_errors(context, "Transfer.Push"),
            refusals_audited(self.gate, context, "Transfer.Push", "transfer.refused"),
        ):
            caller = self.gate.identity(context)
            receipt = self.receiver.receive(caller, _push_items(request_iterator))
            return common_pb2.SignedReceipt.FromString(receipt)
        raise AssertionError("unreachable")

    def BatchStatus(
        self, request: transfer_pb2.BatchStatusRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.BatchStatusResponse:
        with (
            wire_errors(context, "Transfer.BatchStatus"),
            refusals_audited(self.gate, context, "Transfer.BatchStatus", "transfer.refused"),
        ):
            result = self.receiver.batches.status(self.gate.identity(context), request.batch_id)
            reply = transfer_pb2.BatchStatusResponse(
                objects=[
                    transfer_pb2.BatchObjectState(
                        transfer_id=s.transfer_id,
                        object_id=s.object_id,
                        held=s.held,
                        resume_offset=s.resume_offset,
                    )
                    for s in result.objects
                ],
                max_chunk_bytes=self.receiver.settings.max_chunk_bytes,
            )
            if result.receipt:
                reply.receipt.ParseFromString(result.receipt)
            return reply
        raise AssertionError("unreachable")

    def PushBatch(
        self, request_iterator: Iterator[transfer_pb2.BatchMessage], context: grpc.ServicerContext
    ) -> Iterator[transfer_pb2.BatchAck]:
        with wire_errors(context, "Transfer.PushBatch"):
            caller = self.gate.identity(context)
        acks = self.receiver.batches.receive(caller, _batch_items(request_iterator))
        return stream_with_errors(
            context, "Transfer.PushBatch", self._refusals_audited(context, _batch_acks(acks))
        )

    def _refusals_audited(
        self, context: grpc.ServicerContext, acks: Iterator[transfer_pb2.BatchAck]
    ) -> Iterator[transfer_pb2.BatchAck]:
        with refusals_audited(self.gate, context, "Transfer.PushBatch", "transfer.refused"):
            yield from acks


def _batch_items(messages: Iterator[transfer_pb2.BatchMessage]) -> Iterator[BatchItem]:
    for msg in messages:
        kind = msg.WhichOneof("kind")
        if kind == "chunk":
            c = msg.chunk
            yield ChunkMsg(c.offset, c.data, c.sha256)
        elif kind == "object":
            o = msg.object
            yield ObjectStartMsg(o.transfer_id, announce_from_pb(o.object), o.offset)
        elif kind == "object_end":
            yield EndMsg(msg.object_end.sha256, msg.object_end.size)
        elif kind == "start":
            s = msg.start
            yield BatchStartMsg(s.batch_id, s.case_id, s.ref, s.kind)
        elif kind == "end":
            yield BatchEndMsg(tuple(msg.end.transfer_ids))
        else:
            raise ValidationError("empty BatchMessage")


def _batch_acks(acks: Iterator[BatchAckItem]) -> Iterator[transfer_pb2.BatchAck]:
    for ack in acks:
        if isinstance(ack, StoredAck):
            yield transfer_pb2.BatchAck(
                stored=transfer_pb2.ObjectStored(transfer_id=ack.transfer_id, sha256=ack.sha256)
            )
        else:
            reply = transfer_pb2.BatchAck()
            reply.receipt.ParseFromString(ack.signed)
            yield reply


def _push_items(messages: Iterator[transfer_pb2.PushMessage]) -> Iterator[PushItem]:
    for msg in messages:
        kind = msg.WhichOneof("kind")
        if kind == "chunk":
            c = msg.chunk
            yield ChunkMsg(c.offset, c.data, c.sha256)
        elif kind == "end":
            yield EndMsg(msg.end.sha256, msg.end.size)
        elif kind == "start":
            s = msg.start
            yield StartMsg(s.transfer_id, announce_from_pb(s.object), s.offset)
        else:
            raise ValidationError("empty PushMessage")


class ExchangeServicer(exchange_pb2_grpc.ExchangeServicer):
    def __init__(self, gate: Gatekeeper, exchange: Exchange) -> None:
        self.gate = gate
        self.exchange = exchange

    def Submit(
        self, request_iterator: Iterator[exchange_pb2.SubmitMessage], context: grpc.ServicerContext
    ) -> exchange_pb2.SubmitResponse:
        with wire_errors(context, "Exchange.Submit"):
            caller = self.gate.identity(context)
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "start":
                raise ValidationError("Submit must begin with SubmitStart")
            s = first.start
            sub = Submission(
                name=s.name,
                media_type=s.media_type,
                case_id=s.case_id,
                destinations=tuple(s.destinations),
                sha256=s.sha256,
                size=s.size,
                labels=dict(s.labels),
            )
            obj, queued = self.exchange.submit(caller, sub, _submit_chunks(request_iterator))
            return exchange_pb2.SubmitResponse(
                object=object_to_pb(obj), queued=[transfer_to_pb(t) for t in queued]
            )
        raise AssertionError("unreachable")


def _submit_chunks(messages: Iterator[exchange_pb2.SubmitMessage]) -> Iterator[ChunkMsg]:
    for msg in messages:
        if msg.WhichOneof("kind") != "chunk":
            raise ValidationError("only chunks may follow SubmitStart")
        yield ChunkMsg(msg.chunk.offset, msg.chunk.data, msg.chunk.sha256)


class QueryServicer(query_pb2_grpc.QueryServicer):
    def __init__(self, gate: Gatekeeper, query: QueryService) -> None:
        self.gate = gate
        self.query = query

    def ListObjects(
        self, request: query_pb2.ListObjectsRequest, context: grpc.ServicerContext
    ) -> query_pb2.ListObjectsResponse:
        with wire_errors(context, "Query.ListObjects"):
            found = self.query.list_objects(
                self.gate.identity(context),
                ObjectFilter(
                    case_id=request.case_id,
                    peer=request.peer,
                    since=request.time.since,
                    until=request.time.until,
                    limit=request.limit,
                ),
                remote=self.gate.remote(context),
            )
            return query_pb2.ListObjectsResponse(objects=[object_to_pb(o) for o in found])
        raise AssertionError("unreachable")

    def GetObject(
        self, request: query_pb2.GetObjectRequest, context: grpc.ServicerContext
    ) -> query_pb2.ObjectDetail:
        with wire_errors(context, "Query.GetObject"):
            obj, transfers = self.query.get_object(
                self.gate.identity(context), request.object_id, remote=self.gate.remote(context)
            )
            return query_pb2.ObjectDetail(
                object=object_to_pb(obj), transfers=[transfer_to_pb(t) for t in transfers]
            )
        raise AssertionError("unreachable")

    def ListTransfers(
        self, request: query_pb2.ListTransfersRequest, context: grpc.ServicerContext
    ) -> query_pb2.ListTransfersResponse:
        with wire_errors(context, "Query.ListTransfers"):
            found = self.query.list_transfers(
                self.gate.identity(context),
                TransferFilter(
                    case_id=request.case_id,
                    peer=request.peer,
                    status=request.status,
                    direction=request.direction,
                    object_id=request.object_id,
                    since=request.time.since,
                    until=request.time.until,
                    limit=request.limit,
                ),
                remote=self.gate.remote(context),
            )
            return query_pb2.ListTransfersResponse(transfers=[transfer_to_pb(t) for t in found])
        raise AssertionError("unreachable")

    def ListBatches(
        self, request: query_pb2.ListBatchesRequest, context: grpc.ServicerContext
    ) -> query_pb2.ListBatchesResponse:
        with wire_errors(context, "Query.ListBatches"):
            found = self.query.list_batches(
                self.gate.identity(context),
                TransferFilter(
                    case_id=request.case_id,
                    peer=request.peer,
                    status=request.status,
                    direction=request.direction,
                    since=request.time.since,
                    until=request.time.until,
                    limit=request.limit,
                ),
                remote=self.gate.remote(context),
            )
            return query_pb2.ListBatchesResponse(batches=[batch_to_pb(b, n) for b, n in found])
        raise AssertionError("unreachable")

    def ReadObject(
        self, request: query_pb2.ReadObjectRequest, context: grpc.ServicerContext
    ) -> Iterator[query_pb2.ReadObjectResponse]:
        with wire_errors(context, "Query.ReadObject"):
            obj, chunks = self.query.read_object(
                self.gate.identity(context),
                request.object_id,
                request.offset,
                remote=self.gate.remote(context),
            )
        return stream_with_errors(context, "Query.ReadObject", _read_responses(obj, chunks))


def _read_responses(
    obj: ObjectRecord, chunks: Iterator[ChunkMsg]
) -> Iterator[query_pb2.ReadObjectResponse]:
    first = True
    for c in chunks:
        msg = query_pb2.ReadObjectResponse(
            chunk=common_pb2.Chunk(offset=c.offset, data=c.data, sha256=c.sha256)
        )
        if first:
            msg.object_size = obj.size
            msg.object_sha256 = obj.object_id
            first = False
        yield msg
    if first:  # empty object or offset at the end: still tell size and digest
        yield query_pb2.ReadObjectResponse(object_size=obj.size, object_sha256=obj.object_id)
