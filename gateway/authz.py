"""The one place that decides whether a caller may call an RPC on this node.

Decisions use only the caller's verified certificate identity
(:class:`gateway.identity.Identity`) and the method name. The table below is
the whole policy; anything not listed is refused (default deny).

Principals:

- ``self``   — this node's own certificate (operators on the node host, the CLI
  with ``--config``).
- ``peer``   — another federation node of the *opposite* role (hospital ↔ factory).
- a person role (clinician, engineer, officer) — only when the certificate binds
  the person to *this* node (``urn:yigong:org:<this node id>``).
- ``any``    — any verified federation certificate (health checks, reflection).

Three tables, one module, asked by every layer:

- :data:`POLICY` — which principal may call which RPC (the gRPC edge asks it once per
  call, :class:`gateway.rpc.auth.Gatekeeper`).
- :data:`ACTIONS` — the domain's own actions (confirm a study, export a design, open a
  case, sign a case record, witness and read audit checkpoints): who, on which kind of
  node, of which organisation, and the refusal message. The domain (and the CLI-local
  paths, which call the domain with the node's or a person's verified identity) asks
  :func:`authorize` with the action's name instead of comparing roles itself.
- :data:`RECORD_SIGNERS` (+ :data:`REVISED_DESIGN_SIGNERS`, :data:`CONFIRMATION_SIDES`) —
  the standard's signer rules by record type (:func:`authorize_signer`,
  :func:`authorize_signed_content`); both nodes replay them on every record of a case.

The verified caller travels as one :class:`RequestContext`, made once per call at the
edge; :func:`authorize` takes it (or a bare :class:`~gateway.identity.Identity` for the
local paths). ``python -m gateway.authz`` prints the tables as README's security-model
table (tests/test_authz_home.py checks README shows exactly that).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import PermissionDenied, SignerRefused
from gateway.identity import Identity

SELF = "self"
PEER = "peer"
ANY = "any"
NODE = "node"
"""Any node certificate, of whatever node (domain rules only: witnessing)."""
CLINICIAN, ENGINEER, OFFICER = "clinician", "engineer", "officer"
HOSPITAL, FACTORY = "hospital", "factory"
BOTH: frozenset[str] = frozenset({HOSPITAL, FACTORY})

POLICY: Mapping[str, frozenset[str]] = {
    # node-to-node transfer
    "/yigong.v1.Transfer/Identify": frozenset({PEER}),
    "/yigong.v1.Transfer/Offer": frozenset({PEER}),
    "/yigong.v1.Transfer/Push": frozenset({PEER}),
    "/yigong.v1.Transfer/BatchStatus": frozenset({PEER}),
    "/yigong.v1.Transfer/PushBatch": frozenset({PEER}),
    # local submission of objects to send
    "/yigong.v1.Exchange/Submit": frozenset({SELF, "engineer", "clinician"}),
    # query endpoint
    "/yigong.v1.Query/ListObjects": frozenset({SELF, "engineer", "clinician", "officer"}),
    "/yigong.v1.Query/GetObject": frozenset({SELF, "engineer", "clinician", "officer"}),
    "/yigong.v1.Query/ListTransfers": frozenset({SELF, PEER, "engineer", "clinician", "officer"}),
    "/yigong.v1.Query/ListBatches": frozenset({SELF, PEER, "engineer", "clinician", "officer"}),
    "/yigong.v1.Query/ReadObject": frozenset({SELF, "engineer", "clinician"}),
    # hospital node: received studies, completeness, clinician confirmation and send
    "/yigong.v1.Hospital/ListStudies": frozenset({SELF, "clinician", "officer"}),
    "/yigong.v1.Hospital/GetStudy": frozenset({SELF, "clinician", "officer"}),
    "/yigong.v1.Hospital/ConfirmStudy": frozenset({"clinician"}),
    "/yigong.v1.Hospital/ExportDesign": frozenset({"clinician"}),
    # factory node: received studies per case and their suitability check
    "/yigong.v1.Factory/ListStudies": frozenset({SELF, "engineer", "officer"}),
    "/yigong.v1.Factory/GetStudy": frozenset({SELF, "engineer", "officer"}),
    # case workflow of the standard: signed records and stage gates
    "/yigong.v1.Case/CreateCase": frozenset({"clinician"}),
    "/yigong.v1.Case/SubmitRecord": frozenset({"clinician", "engineer"}),
    "/yigong.v1.Case/GetCase": frozenset({SELF, "clinician", "engineer", "officer"}),
    "/yigong.v1.Case/ListCases": frozenset({SELF, "clinician", "engineer", "officer"}),
    # audit witnessing: nodes hand their signed checkpoints to their peers (store checks
    # the signer is the caller); a peer reads back only its own, officers any
    "/yigong.v1.Audit/Witness": frozenset({PEER}),
    "/yigong.v1.Audit/GetWitnessed": frozenset({SELF, PEER, "officer"}),
    # the web console's pages (gateway/web; a person's browser certificate)
    "/console/home": frozenset({"clinician", "engineer", "officer"}),
    "/console/transfers": frozenset({"clinician", "engineer", "officer"}),
    "/console/audit": frozenset({"officer"}),
    "/console/audit.verify": frozenset({"officer"}),
    "/console/reconcile": frozenset({"officer"}),
    "/console/hospital.studies": frozenset({"clinician", "officer"}),
    "/console/hospital.confirm": frozenset({"clinician"}),
    "/console/cases": frozenset({"clinician", "engineer", "officer"}),
    "/console/cases.sign": frozenset({"clinician", "engineer"}),
    "/console/factory.studies": frozenset({"engineer", "officer"}),
    "/console/factory.download": frozenset({"engineer"}),
    "/console/factory.upload": frozenset({"engineer"}),
    # infrastructure
    "/grpc.health.v1.Health/Check": frozenset({ANY}),
    "/grpc.health.v1.Health/Watch": frozenset({ANY}),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": frozenset({ANY}),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": frozenset({ANY}),
}

_OPPOSITE = {"hospital": "factory", "factory": "hospital"}

IDENTITY_VIEWERS: frozenset[str] = frozenset({SELF, "clinician"})
"""Who sees whom a study is of (patient name, ID, birth date, ... in the hospital's
study list/show): the hospital node itself and its own clinicians, who confirm releases.
Officers and everyone else see UIDs only. Only ever on a hospital node."""


# -- the domain's actions ------------------------------------------------------------------
STUDY_CONFIRM = "study.confirm"
DESIGN_EXPORT = "design.export"
CASE_OPEN = "case.open"
CASE_SIGN = "case.sign"
CASE_TAKE_RECORD = "case.take_record"
CASE_OPEN_FROM_PEER = "case.open_from_peer"
AUDIT_WITNESS = "audit.witness"
AUDIT_HAND_OVER = "audit.hand_over"
AUDIT_READ_WITNESSED = "audit.read_witnessed"
TRANSFERS_LIST_ALL = "transfers.list_all"


@dataclass(frozen=True)
class Rule:
    """Who may take one domain action, and what a refused caller is told.

    ``who``: principals (:func:`principal_of`: ``self``, ``peer``, a person role of this
    node) or :data:`NODE` (any node certificate). ``nodes``: the kinds of node the action
    exists on (empty: any). ``any_org``: persons of a role in ``who`` are allowed whatever node they
    belong to (the edge's :data:`POLICY` already binds them to this one). ``foreign``: the
    refusal for a person of an allowed role who belongs to another node (default
    ``refusal``). ``own_only``: principals allowed only on their own resource (the
    resource is their id), else ``own_refusal``. Messages are formatted with ``caller``
    (label), ``org`` (the caller's node), ``node``, ``node_role``, ``resource`` and
    ``resource_r`` (its repr)."""

    who: frozenset[str]
    refusal: str
    what: str = ""
    nodes: frozenset[str] = frozenset()
    any_org: bool = False
    foreign: str = ""
    own_only: frozenset[str] = frozenset()
    own_refusal: str = ""


ACTIONS: Mapping[str, Rule] = {
    STUDY_CONFIRM: Rule(
        what="confirm a received study for release to a case",
        who=frozenset({CLINICIAN}),
        nodes=frozenset({HOSPITAL}),
        refusal="only a clinician of node {node} may confirm a study; {caller} may not",
    ),
    DESIGN_EXPORT: Rule(
        what="export a case's approved design to the hospital's PACS",
        who=frozenset({CLINICIAN}),
        nodes=frozenset({HOSPITAL}),
        refusal=(
            "only a clinician of node {node} may export a design to its PACS; {caller} may not"
        ),
    ),
    CASE_OPEN: Rule(
        what="open a case with a manufacturer",
        who=frozenset({CLINICIAN}),
        nodes=frozenset({HOSPITAL}),
        any_org=True,
        refusal=(
            "cases are opened by a clinician at a hospital node; {caller} "
            "at {node_role} node {node} may not"
        ),
    ),
    CASE_SIGN: Rule(
        what="submit a case record the caller signed",
        who=frozenset({CLINICIAN, ENGINEER}),
        refusal=(
            "case {resource}: {caller} may not sign case records: they are "
            "signed by clinicians and engineers with their own certificate"
        ),
        foreign=(
            "case {resource}: {caller} belongs to node {org}, "
            "not {node}; records are submitted at the signer's own node"
        ),
    ),
    CASE_TAKE_RECORD: Rule(
        what="take in a case record the case's other node countersigned",
        who=frozenset({PEER}),
        refusal=(
            "case {resource} comes from {caller_role} node {caller_id}; "
            "a case runs between a hospital and a factory"
        ),
    ),
    CASE_OPEN_FROM_PEER: Rule(
        what="learn of a case from its hospital's first record",
        who=frozenset({PEER}),
        nodes=frozenset({FACTORY}),
        refusal=(
            "case {resource} is not known to {node_role} node {node}; a case is opened "
            "at its hospital"
        ),
    ),
    AUDIT_WITNESS: Rule(
        what="hand over signed audit checkpoints",
        who=frozenset({NODE}),
        refusal="{caller} is not a node: only nodes witness",
    ),
    AUDIT_HAND_OVER: Rule(
        what="each checkpoint handed over is the caller's own",
        who=frozenset({NODE}),
        refusal="{caller} is not a node: only nodes witness",
        own_only=frozenset({SELF, PEER, NODE}),
        own_refusal=(
            "{caller} may hand over only its own audit checkpoints, not "
            "node {resource_r}'s (checkpoint at entry {entry})"
        ),
    ),
    AUDIT_READ_WITNESSED: Rule(
        what="read the checkpoints of a node witnessed here",
        who=frozenset({SELF, PEER, OFFICER}),
        refusal="{caller} may not read witnessed audit checkpoints on node {node}",
        own_only=frozenset({PEER}),
        own_refusal=(
            "{caller} may read only the checkpoints it handed over itself, "
            "not those of {resource_r}"
        ),
    ),
    TRANSFERS_LIST_ALL: Rule(
        what="see every transfer and batch (other nodes: only those with themselves)",
        who=frozenset({SELF, CLINICIAN, ENGINEER, OFFICER}),
        any_org=True,
        refusal="{caller} sees only the transfers it took part in",
    ),
}
"""The domain's actions (see :class:`Rule`); messages are those the domain gave before
the rules moved here (tests assert on them)."""


# -- the standard's signer rules, by record type ---------------------------------------------
RECORD_SIGNERS: Mapping[str, frozenset[str]] = (
    {
        kind: frozenset({CLINICIAN})
        for kind in ("data_confirmation", "order", "acceptance", "nonconformity", "follow_up")
    }
    | {
        kind: frozenset({ENGINEER})
        for kind in (
            "design_input_review",
            "design_output",
            "production_record",
            "delivery_list",
            "data_delivery",
        )
    }
    | {kind: frozenset({CLINICIAN, ENGINEER}) for kind in ("design_confirmation", "design_change")}
)
"""Who signs each record type of a case: a clinician of the case's hospital node, an
engineer of its manufacturer node (:meth:`CaseParties.node_of`), or either."""

REVISED_DESIGN_SIGNERS: frozenset[str] = frozenset({ENGINEER})
"""Who may attach a revised design (files) to a ``design_change``."""

CONFIRMATION_SIDES: Mapping[str, str] = {CLINICIAN: "clinical", ENGINEER: "production"}
"""The side of a ``design_confirmation`` each signer role confirms."""


class CaseParties(Protocol):
    """The two nodes of a case (:class:`gateway.cases.workflow.Parties`)."""

    @property
    def case_id(self) -> str: ...

    def node_of(self, role: str) -> str: ...

    def who(self, role: str) -> str: ...


class Signer(Protocol):
    """The author of a record (:class:`gateway.cases.records.Author`)."""

    @property
    def role(self) -> str: ...

    @property
    def org(self) -> str: ...

    def label(self) -> str: ...


@dataclass(frozen=True)
class NodeSelf:
    """What the decision needs to know about this node."""

    node_id: str
    role: str


# -- the verified caller of one request ------------------------------------------------------
@dataclass(frozen=True)
class RequestContext:
    """One call's verified caller: made once per call at the edge
    (:meth:`gateway.rpc.auth.Gatekeeper.check`, which verifies the certificate and asks
    :func:`authorize`), then handed to the servicer and the domain instead of re-reading
    the certificate. Local paths (the CLI with ``--config``) make one with
    :meth:`local`."""

    identity: Identity
    node: NodeSelf
    remote: str = ""
    method: str = ""
    principal: str | None = None
    cert_pem: bytes = field(default=b"", repr=False)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    @classmethod
    def local(cls, identity: Identity, node: NodeSelf, method: str = "") -> RequestContext:
        """A context for a call made on the node host itself (no network edge)."""
        return cls(identity, node, "local", method, principal_of(identity, node))


def principal_of(caller: Identity, node: NodeSelf) -> str | None:
    """The principal a verified identity acts as on this node, or None."""
    if caller.is_node:
        if caller.subject_id == node.node_id:
            return SELF
        if caller.role == _OPPOSITE.get(node.role):
            return PEER
        return None
    if caller.org_node == node.node_id:
        return caller.role
    return None


def may_see_identity(caller: Identity, node: NodeSelf) -> bool:
    """Whether ``caller`` may see patient identity in this node's study views
    (:data:`IDENTITY_VIEWERS`; never on a factory node)."""
    return node.role == "hospital" and principal_of(caller, node) in IDENTITY_VIEWERS


def authorize(
    caller: Identity | RequestContext,
    action: str,
    node: NodeSelf | None = None,
    *,
    resource: str = "",
    entry: str = "",
) -> str:
    """The one decision: may ``caller`` take ``action`` on this node?

    ``caller``: the call's :class:`RequestContext` (then ``node`` defaults to the node it
    was made on) or a verified identity (local paths; ``node`` required). ``action`` is
    an RPC method path (``/yigong.v1.Case/CreateCase``, :data:`POLICY`) or a domain
    action (:data:`ACTIONS`, e.g. :data:`STUDY_CONFIRM`); ``resource`` names what it acts
    on (a case id, a node id) for the message and ownership rules, ``entry`` a part of it
    (for the message). Returns the principal ``caller`` acts as, or raises
    :class:`PermissionDenied`."""
    if isinstance(caller, RequestContext):
        identity, node = caller.identity, node or caller.node
    else:
        identity = caller
    if node is None:
        raise TypeError("authorize() needs the node for a bare identity")
    if action.startswith("/"):
        return _authorize_method(identity, action, node)
    rule = ACTIONS.get(action)
    if rule is None:
        raise PermissionDenied(f"{action} is not an action of yigong node {node.node_id}")
    facts = {
        "caller": identity.label(),
        "org": identity.org_node,
        "node": node.node_id,
        "node_role": node.role,
        "caller_id": identity.subject_id,
        "caller_role": identity.role,
        "resource": resource,
        "resource_r": repr(resource),
        "entry": entry,
    }
    principal = principal_of(identity, node)
    acting: str | None = None
    if not rule.nodes or node.role in rule.nodes:
        if identity.is_node and NODE in rule.who:
            acting = principal or NODE
        elif principal is not None and principal in rule.who:
            acting = principal
        elif not identity.is_node and identity.role in rule.who:
            if not rule.any_org:
                raise PermissionDenied((rule.foreign or rule.refusal).format(**facts))
            acting = identity.role
    if acting is None:
        raise PermissionDenied(rule.refusal.format(**facts))
    if acting in rule.own_only and resource != identity.subject_id:
        raise PermissionDenied(rule.own_refusal.format(**facts))
    return acting


def allowed(
    caller: Identity | RequestContext, action: str, node: NodeSelf | None = None, **kw: str
) -> bool:
    """:func:`authorize` as a yes/no (for rules that narrow what a caller sees)."""
    try:
        authorize(caller, action, node, **kw)
    except PermissionDenied:
        return False
    return True


def _authorize_method(caller: Identity, method: str, node: NodeSelf) -> str:
    allowed = POLICY.get(method)
    if allowed is None:
        raise PermissionDenied(f"{method} is not an operation of yigong node {node.node_id}")
    if ANY in allowed:
        return ANY
    principal = principal_of(caller, node)
    if principal is not None and principal in allowed:
        return principal
    if principal is None and not caller.is_node:
        why = (
            f"{caller.label()} belongs to node {caller.org_node!r}, not {node.node_id!r}; "
            f"use a certificate issued for this node's organisation"
        )
    elif principal is None:
        why = (
            f"{caller.label()} is a {caller.role} node; {node.role} nodes exchange "
            f"data only with {_OPPOSITE.get(node.role)} nodes"
        )
    else:
        why = f"{caller.label()} acts as {principal!r}; allowed: {', '.join(sorted(allowed))}"
    raise PermissionDenied(f"not allowed to call {method} on node {node.node_id}: {why}")


def authorize_signer(
    parties: CaseParties, kind: str, author: Signer, *, title: str, section: str
) -> None:
    """Raise SignerRefused unless ``author`` may sign a ``kind`` record of the case
    (:data:`RECORD_SIGNERS`: their role, and the case's node of that role).
    ``title``/``section``: the record type's name in the standard, for the message."""
    roles = RECORD_SIGNERS[kind]
    if author.role not in roles:
        who = " or ".join(parties.who(r) for r in sorted(roles))
        raise SignerRefused(
            f"case {parties.case_id}: {author.label()} may not sign {kind}: {title} "
            f"({section}) is signed by {who}"
        )
    if author.org != parties.node_of(author.role):
        raise SignerRefused(
            f"case {parties.case_id}: {author.label()} may not sign {kind}: the person "
            f"belongs to node {author.org}, but {title} of this case is signed by "
            f"{parties.who(author.role)}"
        )


def asked_of(caller: Identity, role: str, node: str) -> bool:
    """Whether a step the case workflow asks of a ``role`` of ``node`` (a
    :class:`gateway.cases.workflow.NextAction`) is the caller's to take: the console
    highlights it and offers its record types."""
    return caller.role == role and caller.org_node == node


def authorize_signed_content(
    parties: CaseParties, kind: str, author: Signer, data: Mapping[str, Any]
) -> None:
    """The signer rules that depend on what a record says (checked after its stage):
    only :data:`REVISED_DESIGN_SIGNERS` attach a revised design to a ``design_change``;
    a ``design_confirmation`` confirms the signer's own side (:data:`CONFIRMATION_SIDES`)."""
    p = parties
    if kind == "design_change" and "files" in data and author.role not in REVISED_DESIGN_SIGNERS:
        (issuer,) = sorted(REVISED_DESIGN_SIGNERS)
        raise SignerRefused(
            f"case {p.case_id}: {author.label()} may not attach a revised design to a design "
            f"change: the design is issued by {p.who(issuer)}; send the change request "
            "without files"
        )
    if kind == "design_confirmation":
        side = data["side"]
        if side != CONFIRMATION_SIDES[author.role]:
            (signer,) = [r for r, s in CONFIRMATION_SIDES.items() if s == side]
            raise SignerRefused(
                f"case {p.case_id}: {author.label()} may not sign the {side} confirmation: "
                f"it is signed by {p.who(signer)}"
            )


# -- the policy as a table (README's security model) ------------------------------------------
def _who(principals: frozenset[str]) -> str:
    return ", ".join(sorted(principals))


def policy_markdown() -> str:
    """The three tables as Markdown (``python -m gateway.authz``; README shows exactly this)."""
    cols = (SELF, PEER, CLINICIAN, ENGINEER, OFFICER)
    lines = [
        "| RPC | self (the node's own certificate) | peer node (opposite role) "
        "| clinician | engineer | officer |",
        "| --- | :-: | :-: | :-: | :-: | :-: |",
    ]
    for method, principals in POLICY.items():
        name = method.strip("/").removeprefix("yigong.v1.").replace("/", ".")
        marks = " | ".join("✓" if ANY in principals or c in principals else "" for c in cols)
        lines.append(f"| `{name}` | {marks} |")
    lines += [
        "",
        "| domain action | what | who | on | persons of another node |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, rule in ACTIONS.items():
        who = _who(rule.who)
        if rule.own_only:
            who += f" ({_who(rule.own_only)}: only their own)"
        org = "allowed" if rule.any_org else "refused"
        on = f"{_who(rule.nodes)} node" if rule.nodes else "any node"
        lines.append(f"| `{name}` | {rule.what} | {who} | {on} | {org} |")
    lines += ["", "| case record type | signed by |", "| --- | --- |"]
    of_node = {CLINICIAN: "a clinician of the hospital", ENGINEER: "an engineer of the factory"}
    for kind, roles in sorted(RECORD_SIGNERS.items()):
        extra = ""
        if kind == "design_change":
            extra = f" (a revised design: {_who(REVISED_DESIGN_SIGNERS)} only)"
        if kind == "design_confirmation":
            sides = ", ".join(f"{r} {s}" for r, s in sorted(CONFIRMATION_SIDES.items()))
            extra = f" (each their own side: {sides})"
        signers = " or ".join(of_node[r] for r in sorted(roles))
        lines.append(f"| `{kind}` | {signers}{extra} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(policy_markdown())
