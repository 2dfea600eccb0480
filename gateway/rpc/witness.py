"""gRPC side of audit witnessing: the ``yigong.v1.Audit`` servicer and its client.

Thin: wire → :class:`gateway.audit_witness.WitnessStore` → wire. The client
(:class:`GrpcWitnessLink`) is what :class:`gateway.audit_witness.WitnessSender`
and ``yigong audit verify --with-peers`` use.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from gateway.audit import Checkpoint
from gateway.audit_witness import Witnessed, WitnessStore
from gateway.errors import ValidationError
from gateway.rpc.auth import Gatekeeper, wire_errors
from gateway.rpc.call import rpc_call
from gateway.rpc.channel import ClientCredentials, open_channel
from yigong.v1 import audit_pb2, audit_pb2_grpc

SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["Audit"].full_name


def checkpoint_to_pb(cp: Checkpoint) -> audit_pb2.AuditCheckpoint:
    return audit_pb2.AuditCheckpoint(
        node_id=cp.node_id, seq=cp.seq, time=cp.time, head_hash=cp.head_hash, signature=cp.signature
    )


def checkpoint_from_pb(msg: audit_pb2.AuditCheckpoint, source: str = "") -> Checkpoint:
    if msg.seq < 1 or len(msg.head_hash) != 64 or not msg.signature:
        raise ValidationError(
            f"audit checkpoint of {msg.node_id!r} at entry {msg.seq} is malformed "
            "(seq < 1, head hash not 64 hex digits or no signature)"
        )
    return Checkpoint(msg.node_id, msg.seq, msg.time, msg.head_hash, msg.signature, source)


class AuditServicer(audit_pb2_grpc.AuditServicer):
    def __init__(self, gate: Gatekeeper, store: WitnessStore) -> None:
        self.gate = gate
        self.store = store

    def Witness(
        self, request: audit_pb2.WitnessRequest, context: grpc.ServicerContext
    ) -> audit_pb2.WitnessResponse:
        with wire_errors(context, "Audit.Witness"):
            ctx = self.gate.request(context)
            cps = [checkpoint_from_pb(c) for c in request.checkpoints]
            accepted, newest = self.store.witness(ctx, cps)
            return audit_pb2.WitnessResponse(accepted=accepted, newest_seq=newest)
        raise AssertionError("unreachable")

    def GetWitnessed(
        self, request: audit_pb2.GetWitnessedRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetWitnessedResponse:
        with wire_errors(context, "Audit.GetWitnessed"):
            found = self.store.witnessed(
                self.gate.request(context),
                request.node_id,
                after_seq=request.after_seq,
                limit=request.limit,
            )
            return audit_pb2.GetWitnessedResponse(
                checkpoints=[
                    audit_pb2.WitnessedCheckpoint(
                        checkpoint=checkpoint_to_pb(w.checkpoint),
                        received_at=w.received_at,
                        signer_certificate=w.certificate_pem,
                    )
                    for w in found
                ]
            )
        raise AssertionError("unreachable")


class GrpcWitnessLink:
    """Calls on one peer's Audit service with this node's certificate."""

    def __init__(self, peer_id: str, address: str, creds: ClientCredentials) -> None:
        self.peer_id = peer_id
        self.target = f"peer {peer_id} at {address}"
        self._channel = open_channel(address, creds, peer_node_id=peer_id)
        self._stub = audit_pb2_grpc.AuditStub(self._channel)

    def witness(self, checkpoints: Sequence[Checkpoint], timeout: float) -> int:
        request = audit_pb2.WitnessRequest(checkpoints=[checkpoint_to_pb(c) for c in checkpoints])
        reply = rpc_call(self._stub.Witness, request, target=self.target, timeout=timeout)
        return int(reply.newest_seq)

    def witnessed(self, node_id: str, timeout: float = 30.0) -> list[Witnessed]:
        """Every checkpoint of ``node_id`` the peer holds, oldest first."""
        out: list[Witnessed] = []
        after = 0
        while True:
            request = audit_pb2.GetWitnessedRequest(node_id=node_id, after_seq=after, limit=10_000)
            page = rpc_call(
                self._stub.GetWitnessed, request, target=self.target, timeout=timeout
            ).checkpoints
            source = f"witnessed by {self.peer_id}"
            out += [
                Witnessed(
                    checkpoint_from_pb(w.checkpoint, source), w.received_at, w.signer_certificate
                )
                for w in page
            ]
            if len(page) < 10_000:
                return out
            after = out[-1].checkpoint.seq

    def close(self) -> None:
        self._channel.close()
