"""The query endpoint's domain: listings, object details with receipts, downloads.

Every call is recorded in the audit log with who asked and for what
(filters are recorded, results are not), so "who looked at what" can be
answered later.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gateway import authz
from gateway.audit import AuditLog
from gateway.catalog import BatchRecord, Catalog, ObjectRecord, TransferRecord
from gateway.errors import NotFound, ValidationError
from gateway.hashing import ChunkProducer
from gateway.identity import Identity
from gateway.storage import ObjectStore
from gateway.transfer.model import ChunkMsg, check_object_id

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class ObjectFilter:
    case_id: str = ""
    peer: str = ""
    since: str = ""
    until: str = ""
    limit: int = 0


@dataclass(frozen=True)
class TransferFilter:
    case_id: str = ""
    peer: str = ""
    status: str = ""
    direction: str = ""
    object_id: str = ""
    since: str = ""
    until: str = ""
    limit: int = 0


def _limit(value: int) -> int:
    if value < 0 or value > MAX_LIMIT:
        raise ValidationError(f"limit must be between 1 and {MAX_LIMIT} (0 = {DEFAULT_LIMIT})")
    return value or DEFAULT_LIMIT


class QueryService:
    def __init__(
        self,
        node_id: str,
        catalog: Catalog,
        store: ObjectStore,
        audit: AuditLog,
        chunk_bytes: int,
        *,
        settle: Callable[[], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self.catalog = catalog
        self.store = store
        self.audit = audit
        self.chunk_bytes = chunk_bytes
        self.settle: Callable[[], None] = settle if settle is not None else (lambda: None)
        """Called before reading objects: the role's :meth:`RoleHooks.settle`."""

    def list_objects(
        self, caller: Identity, f: ObjectFilter, *, remote: str = ""
    ) -> list[ObjectRecord]:
        self.settle()
        found = self.catalog.list_objects(
            case_id=f.case_id, peer=f.peer, since=f.since, until=f.until, limit=_limit(f.limit)
        )
        self._audit(caller, "list_objects", f.case_id, remote, count=len(found), peer_filter=f.peer)
        return found

    def _transfer_peer(self, caller: Identity, f: TransferFilter) -> str:
        """The peer filter of a transfer or batch listing: a peer node only sees those it
        took part in (for reconciliation), whatever this node's role
        (gateway.authz.TRANSFERS_LIST_ALL); a direction is 'inbound' or 'outbound'."""
        if f.direction and f.direction not in {"inbound", "outbound"}:
            raise ValidationError("direction must be 'inbound' or 'outbound'")
        if not authz.allowed(caller, authz.TRANSFERS_LIST_ALL, authz.NodeSelf(self.node_id, "")):
            return caller.subject_id
        return f.peer

    def list_transfers(
        self, caller: Identity, f: TransferFilter, *, remote: str = ""
    ) -> list[TransferRecord]:
        peer = self._transfer_peer(caller, f)
        found = self.catalog.list_transfers(
            case_id=f.case_id,
            peer=peer,
            status=f.status,
            direction=f.direction,
            object_id=f.object_id,
            since=f.since,
            until=f.until,
            limit=_limit(f.limit),
        )
        self._audit(
            caller, "list_transfers", f.case_id, remote, count=len(found), peer_filter=f.peer
        )
        return found

    def list_batches(
        self, caller: Identity, f: TransferFilter, *, remote: str = ""
    ) -> list[tuple[BatchRecord, dict[str, int]]]:
        """Batches (study exchanges) with their objects counted by status."""
        peer = self._transfer_peer(caller, f)
        found = self.catalog.list_batches(
            case_id=f.case_id,
            peer=peer,
            status=f.status,
            direction=f.direction,
            since=f.since,
            until=f.until,
            limit=_limit(f.limit),
        )
        self._audit(caller, "list_batches", f.case_id, remote, count=len(found), peer_filter=f.peer)
        return [(b, self.catalog.batch_counts(b.batch_id, b.direction)) for b in found]

    def get_object(
        self, caller: Identity, object_id: str, *, remote: str = ""
    ) -> tuple[ObjectRecord, list[TransferRecord]]:
        check_object_id(object_id)
        self.settle()
        obj = self.catalog.get_object(object_id)
        transfers = self.catalog.list_transfers(object_id=object_id, limit=MAX_LIMIT)
        self._audit(caller, "get_object", obj.case_id, remote, object_id=object_id)
        return obj, transfers

    def read_object(
        self, caller: Identity, object_id: str, offset: int, *, remote: str = ""
    ) -> tuple[ObjectRecord, Iterator[ChunkMsg]]:
        check_object_id(object_id)
        obj = self.catalog.get_object(object_id)
        if offset < 0 or offset > obj.size:
            raise ValidationError(
                f"offset {offset} is outside object {object_id} ({obj.size} bytes)"
            )
        if self.store.size(object_id) != obj.size:
            raise NotFound(
                f"object {object_id} is catalogued but its bytes are missing from "
                f"{self.store.describe()}"
            )
        self.audit.record(
            "object.downloaded",
            actor=caller.label(),
            object_id=object_id,
            case_id=obj.case_id or None,
            details={"offset": offset, "size": obj.size, **({"remote": remote} if remote else {})},
        )

        def chunks() -> Iterator[ChunkMsg]:
            with self.store.open_read(object_id, offset, self.chunk_bytes) as blocks:
                yield from ChunkProducer(blocks, offset=offset, make=ChunkMsg)

        return obj, chunks()

    def _audit(
        self, caller: Identity, what: str, case_id: str, remote: str, **details: str | int
    ) -> None:
        if remote:
            details["remote"] = remote
        self.audit.record(
            "query",
            actor=caller.label(),
            case_id=case_id or None,
            object_id=str(details.pop("object_id")) if "object_id" in details else None,
            details={"query": what, **details},
        )
