"""Conversions between protobuf messages and domain records."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.catalog import BatchRecord, ObjectRecord, TransferRecord
from gateway.transfer.model import Announce
from yigong.v1 import common_pb2, query_pb2


def announce_to_pb(a: Announce) -> common_pb2.ObjectHeader:
    return common_pb2.ObjectHeader(
        object_id=a.object_id,
        size=a.size,
        name=a.name,
        media_type=a.media_type,
        case_id=a.case_id,
        labels=a.labels,
    )


def announce_from_pb(h: common_pb2.ObjectHeader) -> Announce:
    return Announce(
        object_id=h.object_id,
        size=h.size,
        name=h.name,
        media_type=h.media_type,
        case_id=h.case_id,
        labels=dict(h.labels),
    )


def object_to_pb(o: ObjectRecord) -> common_pb2.ObjectInfo:
    return common_pb2.ObjectInfo(
        object_id=o.object_id,
        size=o.size,
        name=o.name,
        media_type=o.media_type,
        case_id=o.case_id,
        origin_node=o.origin_node,
        created_at=o.created_at,
        labels=o.labels,
    )


def transfer_to_pb(t: TransferRecord) -> common_pb2.TransferInfo:
    info = common_pb2.TransferInfo(
        transfer_id=t.transfer_id,
        object_id=t.object_id,
        direction=t.direction,
        peer_node=t.peer_node,
        status=t.status,
        attempts=t.attempts,
        last_error=t.last_error,
        bytes_done=t.bytes_done,
        size=t.size,
        case_id=t.case_id,
        created_at=t.created_at,
        updated_at=t.updated_at,
        completed_at=t.completed_at,
        name=t.name,
        batch_id=t.batch_id,
    )
    if t.receipt and not t.batch_id:  # an object of a batch: its manifest is the batch's
        info.receipt.ParseFromString(t.receipt)
    return info


def batch_to_pb(b: BatchRecord, counts: Mapping[str, int]) -> query_pb2.BatchInfo:
    info = query_pb2.BatchInfo(
        batch_id=b.batch_id,
        direction=b.direction,
        peer_node=b.peer_node,
        case_id=b.case_id,
        kind=b.kind,
        ref=b.ref,
        status=b.status,
        sealed=b.sealed,
        expected=b.expected,
        attempts=b.attempts,
        last_error=b.last_error,
        merkle_root=b.merkle_root,
        created_at=b.created_at,
        updated_at=b.updated_at,
        completed_at=b.completed_at,
        objects_by_status=dict(counts),
    )
    if b.receipt:
        info.receipt.ParseFromString(b.receipt)
    return info
