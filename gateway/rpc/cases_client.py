"""Client calls on a node's ``yigong.v1.Case`` service (CLI, tests, tools)."""

from __future__ import annotations

from typing import Any

from gateway.cases.signing import PersonSigner
from gateway.rpc.call import rpc_call
from gateway.rpc.client import NodeClient
from yigong.v1 import case_pb2, case_pb2_grpc


class CaseClient:
    """Case calls over an open :class:`NodeClient` (same channel, same certificate)."""

    def __init__(self, node: NodeClient) -> None:
        self.node = node
        self.stub = case_pb2_grpc.CaseStub(node.channel)

    def _call(self, fn: Any, request: Any) -> Any:
        return rpc_call(fn, request, target=self.node.target, timeout=self.node.timeout)

    def create(self, case_id: str, manufacturer: str) -> case_pb2.CaseView:
        request = case_pb2.CreateCaseRequest(case_id=case_id, manufacturer=manufacturer)
        return self._call(self.stub.CreateCase, request)

    def get(self, case_id: str) -> case_pb2.CaseView:
        return self._call(self.stub.GetCase, case_pb2.GetCaseRequest(case_id=case_id))

    def list(self, limit: int = 0) -> list[case_pb2.CaseView]:
        reply = self._call(self.stub.ListCases, case_pb2.ListCasesRequest(limit=limit))
        return list(reply.cases)

    def submit(self, record: bytes, signature: bytes) -> case_pb2.CaseView:
        request = case_pb2.SubmitRecordRequest(record=record, author_signature=signature)
        return self._call(self.stub.SubmitRecord, request)

    def prepare(self, signer: PersonSigner, case_id: str, kind: str, data: dict[str, Any]) -> bytes:
        """The canonical record ``signer`` would sign next on ``case_id`` (not yet signed)."""
        view = self.get(case_id)
        return signer.record(case_id, view.next_seq, view.head_hash, kind, data)

    def sign(
        self, signer: PersonSigner, case_id: str, kind: str, data: dict[str, Any]
    ) -> case_pb2.CaseView:
        """Build the next record, sign it with ``signer``'s key and submit it."""
        record = self.prepare(signer, case_id, kind, data)
        return self.submit(record, signer.sign(record))
