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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import PermissionDenied
from gateway.identity import Identity

SELF = "self"
PEER = "peer"
ANY = "any"

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


@dataclass(frozen=True)
class NodeSelf:
    """What the decision needs to know about this node."""

    node_id: str
    role: str


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


def authorize(caller: Identity, method: str, node: NodeSelf) -> str:
    """Return the principal ``caller`` acts as, or raise :class:`PermissionDenied`."""
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
