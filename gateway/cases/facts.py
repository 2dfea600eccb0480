"""Records bound to facts: a signed record must say something true (standard §4.5,
§5.6, §8.2.2).

Signatures and hash links prove *who* said *what* and in which order; they do not
prove that what was said is so. Each node therefore checks a record's content against
what it holds, when a person submits the record here and again when the record
arrives from the case's other node (:mod:`gateway.cases.sync`):

- the core (this module, both roles): a ``design_confirmation`` names, in
  ``data.design_hash``, a design whose files this node holds *for this case*, each
  under its SHA-256 (the clinician confirms what the hospital received, the engineer
  what the factory issued); the design, batch and UDI links of production record,
  delivery list and acceptance are stage gates (:func:`gateway.cases.workflow.apply`);
- each role adds what only it can know (a :data:`FactCheck` registered through
  :meth:`gateway.roles.RoleHooks.case_record_facts`): the hospital its confirmations
  and its pseudonym vault, the factory the studies it received.

A check raises :class:`RecordUnfounded` (the record is refused; the message names the
field and why, never a value that could be patient data), or — only for a record
*arriving* from the other node — :class:`FactsPending` when the fact it names has not
reached this node yet (e.g. the data confirmation overtook the study's instances):
the record waits in ``case_pending`` and is placed when an object of the case arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.cases.records import Envelope, Record
from gateway.cases.store import CaseStore
from gateway.cases.workflow import CaseState
from gateway.catalog import Catalog
from gateway.errors import FactsPending, RecordUnfounded, ValidationError


@dataclass(frozen=True)
class RecordFacts:
    """What a fact check is asked about: ``record`` of case ``case_id``, with the case's
    state before it; ``arriving`` when it came from the case's other node."""

    case_id: str
    hospital: str
    manufacturer: str
    node_id: str  # the node checking
    record: Record
    state: CaseState
    arriving: bool

    def refuse(self, field: str, why: str) -> RecordUnfounded:
        """A refusal naming ``data.<field>`` and why it is not so on this node."""
        return RecordUnfounded(
            f"case {self.case_id}: {self.record.type} refused on node {self.node_id}: "
            f"data.{field} {why}"
        )

    def wait(self, field: str, why: str) -> FactsPending:
        return FactsPending(
            f"case {self.case_id}: {self.record.type} (record {self.record.seq}) waits on "
            f"node {self.node_id}: data.{field} {why}"
        )


FactCheck = Callable[[RecordFacts], None]
"""Raises RecordUnfounded (or FactsPending, arriving records only) when the record's
content contradicts (or is not yet backed by) what this node holds."""


def design_files(cases: CaseStore, design_hash: str) -> list[dict[str, str]] | None:
    """The files of the design record whose envelope hashes to ``design_hash`` (None: no
    such record in this node's chains)."""
    stored = cases.find_record(design_hash)
    if stored is None:
        return None
    try:
        record = Record.parse(Envelope.parse(stored.envelope).record_bytes)
    except ValidationError:
        return None
    return list(record.data.get("files", ()))


def check_core(ctx: RecordFacts, catalog: Catalog, cases: CaseStore) -> None:
    """The checks every node can make from its catalog (see the module docstring)."""
    if ctx.record.type != "design_confirmation":
        return
    files = design_files(cases, ctx.record.data["design_hash"])
    if files is None:  # the stage gate says which design awaits confirmation
        return
    for n, f in enumerate(files):
        oid = f["object_id"]
        obj = catalog.find_object(oid)
        if obj is not None and obj.case_id == ctx.case_id and obj.object_id == oid:
            continue
        why = (
            f"names a design whose file {n} (object {oid[:16]}…) node {ctx.node_id} has "
            + ("not received" if obj is None else f"holds for case {obj.case_id or '(none)'}")
            + " for this case"
        )
        if ctx.arriving and obj is None:
            raise ctx.wait("design_hash", why)
        raise ctx.refuse(
            "design_hash", why + "; confirm a design only once its files arrived (yigong ls --case)"
        )
