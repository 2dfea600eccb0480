"""The stage gates of a case: the standard's order, enforced as a state machine.

Stages, in order (standard §8.2.2 and §9.2: a stage starts only when the one
before it is confirmed)::

    data_confirmation → order → design_input_review → design_output →
    design_confirmation → production → delivery_list → data_delivery →
    acceptance → follow_up

=====================  ======================  ==========================  =====================
stage                  record type(s)          signed by                   then
=====================  ======================  ==========================  =====================
data_confirmation      data_confirmation       clinician of the hospital   order
order                  order                   clinician of the hospital   design_input_review
design_input_review    design_input_review     engineer of the factory     design_output
                                                                           (rejected: order)
design_output          design_output           engineer of the factory     design_confirmation
design_confirmation    design_confirmation     clinician (side clinical)   production when both
                                               AND engineer (production)   (rejected: design_output)
production             production_record       engineer of the factory     delivery_list
delivery_list          delivery_list           engineer of the factory     data_delivery
data_delivery          data_delivery           engineer of the factory     acceptance
acceptance             acceptance              clinician of the hospital   follow_up (rejected:
                                                                           production, or
                                                                           design_output)
follow_up              follow_up,              clinician of the hospital   follow_up; a
                       nonconformity                                       nonconformity may send
                                                                           it back (remake:
                                                                           production, redesign:
                                                                           design_output)
=====================  ======================  ==========================  =====================

A ``design_change`` (§5.3.7) may be signed by a clinician of the hospital or an
engineer of the factory from design_confirmation up to acceptance. It voids the
design confirmations: a change that carries the revised design (files, parameters,
safety features; engineers only) re-opens design_confirmation for it, a change
request without it sends the case back to design_output.

"The hospital" and "the factory" are the case's two nodes: the hospital node that
created it and the manufacturer node named when it was created (and again in the
order). Everything here is a pure function of the records: both nodes replay the
same chain to the same state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import authz
from gateway.cases.records import Record, genesis_hash
from gateway.cases.schema import TYPES, shown
from gateway.errors import SignerRefused as SignerRefused
from gateway.errors import StageRefused

CLINICIAN, ENGINEER = "clinician", "engineer"
STAGES: tuple[str, ...] = (
    "data_confirmation",
    "order",
    "design_input_review",
    "design_output",
    "design_confirmation",
    "production",
    "delivery_list",
    "data_delivery",
    "acceptance",
    "follow_up",
)
HOME_STAGE: dict[str, str] = {
    "data_confirmation": "data_confirmation",
    "order": "order",
    "design_input_review": "design_input_review",
    "design_output": "design_output",
    "design_confirmation": "design_confirmation",
    "production_record": "production",
    "delivery_list": "delivery_list",
    "data_delivery": "data_delivery",
    "acceptance": "acceptance",
    "follow_up": "follow_up",
    "nonconformity": "follow_up",
}
SIGNERS: Mapping[str, frozenset[str]] = authz.RECORD_SIGNERS  # the one table: gateway.authz
CHANGE_WINDOW = STAGES[STAGES.index("design_confirmation") : STAGES.index("acceptance") + 1]
SIDE_OF_ROLE: Mapping[str, str] = authz.CONFIRMATION_SIDES


@dataclass(frozen=True)
class Parties:
    """The two nodes of a case."""

    case_id: str
    hospital: str
    manufacturer: str

    def node_of(self, role: str) -> str:
        return self.hospital if role == CLINICIAN else self.manufacturer

    def who(self, role: str) -> str:
        return f"{'a clinician' if role == CLINICIAN else 'an engineer'} of {self.node_of(role)}"


@dataclass(frozen=True)
class NextAction:
    """Who must act next, and which record types they may sign now."""

    role: str
    node: str
    record_types: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class CaseState:
    parties: Parties
    stage: str = STAGES[0]
    length: int = 0  # records applied
    head: str = ""  # hash of the last record's envelope (genesis before the first)
    shrinkage: tuple[float, float] | None = None  # ordered range, percent
    design: str = ""  # hash of the design awaiting / holding confirmation
    confirmed: frozenset[str] = frozenset()  # sides that confirmed ``design``
    batch: str = ""  # batch number of the latest production record
    udi: str = ""  # unique device identifier of the latest delivery list
    used: frozenset[tuple[str, str]] = field(default=frozenset())  # (kind, value) identifiers

    @classmethod
    def start(cls, parties: Parties) -> CaseState:
        return cls(parties=parties, head=genesis_hash(parties.case_id))


def check_signer(state: CaseState, kind: str, role: str, org: str, label: str) -> None:
    """Raise SignerRefused unless a person of ``role`` at node ``org`` may sign ``kind``."""
    p = state.parties
    spec = TYPES.get(kind)
    if spec is None:
        raise StageRefused(f"case {p.case_id}: unknown record type {shown(kind)}")
    authz.authorize_signer(
        p, kind, _Signer(role, org, label), title=spec.title, section=spec.section
    )


@dataclass(frozen=True)
class _Signer:
    role: str
    org: str
    name: str

    def label(self) -> str:
        return self.name


def next_actions(state: CaseState) -> list[NextAction]:
    """Who must act at the current stage (the open follow-up stage: who may)."""
    p, stage = state.parties, state.stage

    def act(role: str, kinds: tuple[str, ...], what: str) -> NextAction:
        if stage in CHANGE_WINDOW:
            kinds = (*kinds, "design_change")
        return NextAction(role, p.node_of(role), kinds, f"{what} by {p.who(role)}")

    if stage == "design_confirmation":
        return [
            act(role, ("design_confirmation",), f"the {side} confirmation")
            for role, side in SIDE_OF_ROLE.items()
            if side not in state.confirmed
        ]
    if stage == "follow_up":
        return [act(CLINICIAN, ("follow_up", "nonconformity"), "follow-up (open)")]
    kind = next(k for k, s in HOME_STAGE.items() if s == stage)
    (role,) = SIGNERS[kind]
    return [act(role, (kind,), TYPES[kind].title)]


def needs(state: CaseState) -> str:
    return " and ".join(a.description for a in next_actions(state))


def _refuse(state: CaseState, kind: str, why: str) -> StageRefused:
    return StageRefused(f"case {state.parties.case_id}: cannot record {kind}: {why}")


def _not_complete(state: CaseState, kind: str) -> StageRefused:
    return _refuse(state, kind, f"stage '{state.stage}' is not complete (needs {needs(state)})")


def _check_stage(state: CaseState, kind: str) -> None:
    at = STAGES.index(state.stage)
    if kind == "design_change":
        if at < STAGES.index(CHANGE_WINDOW[0]):
            raise _not_complete(state, kind)
        if state.stage not in CHANGE_WINDOW:
            raise _refuse(
                state,
                kind,
                "the device was accepted; record a nonconformity with "
                "disposition 'redesign' instead (§9.4)",
            )
        return
    home = HOME_STAGE[kind]
    if at < STAGES.index(home):
        raise _not_complete(state, kind)
    if at > STAGES.index(home):
        raise _refuse(
            state, kind, f"stage '{home}' is already complete; the case is at stage "
            f"'{state.stage}' (needs {needs(state)})"
        )  # fmt: skip


def indicator_failures(
    indicators: dict[str, Any], shrinkage: tuple[float, float] | None
) -> list[str]:
    """The judgment indicators (§8.3, §9.3) that do not pass, as short descriptions."""
    failed = []
    for n, dim in enumerate(indicators["dimensional"]):
        deviation, tolerance = abs(dim["measured_mm"] - dim["nominal_mm"]), dim["tolerance_mm"]
        if deviation > tolerance + 1e-9:
            failed.append(f"dimensional[{n}] deviates {deviation:.1f} mm > {tolerance:.1f} mm")
    measured = indicators["shrinkage_percent"]
    if shrinkage is not None and not shrinkage[0] <= measured <= shrinkage[1]:
        failed.append(f"shrinkage outside the ordered range {shrinkage[0]:g}-{shrinkage[1]:g} %")
    for name in ("fit", "surface", "mechanical_report", "biocompatibility_report"):
        if indicators[name]["result"] != "pass":
            failed.append(f"{name} did not pass")
    if indicators["pore_size"]["result"] == "fail":
        failed.append("pore_size did not pass")
    return failed


def _claim(state: CaseState, kind: str, value: str, what: str) -> frozenset[tuple[str, str]]:
    if (kind, value) in state.used:
        raise _refuse(state, what, f"{kind} is already used by an earlier record of this case")
    return state.used | {(kind, value)}


def identifiers(record: Record) -> list[tuple[str, str]]:
    """The identifiers ``record`` claims that must be unique across all cases of a node."""
    keys = {"production_record": ("batch_number", "serial_number"), "delivery_list": ("udi",)}
    return [(k, record.data[k]) for k in keys.get(record.type, ()) if k in record.data]


def apply(state: CaseState, record: Record, record_hash: str) -> CaseState:
    """The state after ``record`` (whose envelope hashes to ``record_hash``), or raise.

    Checks the signer (role and node), the stage and the record's references to the
    case so far. Does not check signatures or the chain link (see chain.py)."""
    kind, data, a = record.type, record.data, record.author
    check_signer(state, kind, a.role, a.org, a.label())
    _check_stage(state, kind)
    p = state.parties
    new: dict[str, Any] = {}
    if kind == "data_confirmation":
        new["stage"] = "order"
    elif kind == "order":
        if data["manufacturer"] != p.manufacturer:
            raise _refuse(
                state,
                kind,
                f"data.manufacturer: the order names manufacturer {data['manufacturer']!r}, "
                f"but the case was opened with {p.manufacturer!r}",
            )
        span = data["shrinkage_range"]
        shrinkage = (span["min_percent"], span["max_percent"])
        new.update(stage="design_input_review", shrinkage=shrinkage)
    elif kind == "design_input_review":
        new["stage"] = "design_output" if data["decision"] == "accepted" else "order"
    elif kind == "design_output" or (kind == "design_change" and "files" in data):
        authz.authorize_signed_content(p, kind, a, data)
        new.update(stage="design_confirmation", design=record_hash, confirmed=frozenset())
    elif kind == "design_change":
        new.update(stage="design_output", design="", confirmed=frozenset())
    elif kind == "design_confirmation":
        side = data["side"]
        authz.authorize_signed_content(p, kind, a, data)
        if data["design_hash"] != state.design:
            raise _refuse(
                state,
                kind,
                f"data.design_hash: it confirms design {data['design_hash'][:16]}…, but "
                f"the design awaiting confirmation is {state.design[:16] or '(none)'}…",
            )
        if side in state.confirmed:
            raise _refuse(
                state, kind, f"the {side} confirmation of this design is recorded already"
            )
        if data["decision"] == "rejected":
            new.update(stage="design_output", design="", confirmed=frozenset())
        else:
            confirmed = state.confirmed | {side}
            new["confirmed"] = confirmed
            if confirmed == set(SIDE_OF_ROLE.values()):
                new["stage"] = "production"
    elif kind == "production_record":
        if data["design_hash"] != state.design:
            raise _refuse(
                state,
                kind,
                f"data.design_hash: it names a design other than the confirmed one "
                f"({state.design[:16]}…)",
            )
        used = _claim(state, "batch_number", data["batch_number"], kind)
        if "serial_number" in data:
            serial = data["serial_number"]
            used = _claim(dataclasses.replace(state, used=used), "serial_number", serial, kind)
        new.update(stage="delivery_list", batch=data["batch_number"], used=used)
    elif kind == "delivery_list":
        if data["batch_number"] != state.batch:
            raise _refuse(
                state,
                kind,
                "data.batch_number: its batch number is not the one of the production record",
            )
        used = _claim(state, "udi", data["udi"], kind)
        new.update(stage="data_delivery", udi=data["udi"], used=used)
    elif kind == "data_delivery":
        new["stage"] = "acceptance"
    elif kind == "acceptance":
        if data["udi"] != state.udi:
            raise _refuse(state, kind, "data.udi: its UDI is not the one of the delivery list")
        failed = indicator_failures(data["indicators"], state.shrinkage)
        if data["decision"] == "accepted" and failed:
            raise _refuse(
                state, kind, "'accepted' contradicts the judgment indicators: " + "; ".join(failed)
            )
        if data["decision"] == "accepted":
            new["stage"] = "follow_up"
        elif data.get("disposition") == "redesign":
            new.update(stage="design_output", design="", confirmed=frozenset())
        else:
            new["stage"] = "production"
    elif kind == "nonconformity":
        if data["disposition"] == "remake":
            new["stage"] = "production"
        elif data["disposition"] == "redesign":
            new.update(stage="design_output", design="", confirmed=frozenset())
    return dataclasses.replace(state, length=state.length + 1, head=record_hash, **new)
