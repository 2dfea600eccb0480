"""What a node role (hospital or factory) adds to the shared core.

The core calls these hooks at fixed points; ``hospital_node`` and
``factory_node`` implement them. The defaults do nothing, so the core runs
on its own (and a role module never has to patch core code).

Hook points:

- :meth:`RoleHooks.check_outgoing` — before an object is accepted for sending
  (Exchange.Submit) and again just before each send attempt. Raising
  :class:`~gateway.errors.IdentifiableData` refuses the send for good.
- :meth:`RoleHooks.receipt_facts` — on the receiver, after the object is stored
  and re-hashed: format-aware facts that go into the signed receipt.
- :meth:`RoleHooks.check_receipt` — on the sender, after the receipt's signature
  and digest verified: compare the receiver's facts with the sender's own.
- :meth:`RoleHooks.add_services` — register the role's gRPC servicers.
- :meth:`RoleHooks.start` / :meth:`RoleHooks.stop` — role services (e.g. the DICOM SCP).
- :meth:`RoleHooks.settle` — before the query endpoint reads the catalog: wait until
  what the role acknowledged to outside senders (e.g. a PACS) is catalogued.
- :meth:`RoleHooks.check_case_record` — a case record's content against what the role
  holds, on submission and on arrival (:mod:`gateway.cases.facts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.cases.facts import RecordFacts
    from gateway.catalog import ObjectRecord
    from gateway.storage import ObjectStore
    from gateway.transfer.model import Announce


class RoleHooks:
    """Default hooks: no role-specific behaviour."""

    service_names: tuple[str, ...] = ()

    def check_outgoing(self, obj: ObjectRecord, store: ObjectStore, peer: str) -> None:
        """Raise IdentifiableData (or another YigongError) to refuse sending ``obj``."""

    def receipt_facts(self, announce: Announce, store: ObjectStore) -> Mapping[str, str]:
        return {}

    def check_receipt(
        self, obj: ObjectRecord, facts: Mapping[str, str], store: ObjectStore
    ) -> None:
        """Raise ReceiptError when the receiver's facts disagree with ours."""

    def add_services(self, server: Any, gate: Any) -> None:
        """Register gRPC servicers on ``server`` (a grpc.Server) using ``gate`` for identity."""

    def check_case_record(self, ctx: RecordFacts) -> None:
        """Raise RecordUnfounded (or, for arriving records, FactsPending) when the record
        contradicts (or is not yet backed by) what this role holds."""

    def start(self) -> None:
        pass

    def settle(self) -> None:
        """Return once everything acknowledged so far is catalogued (NotReady if not soon)."""

    def stop(self) -> None:
        pass
