"""One authorization point (#15.2): who may do what is decided only in gateway/authz.py.

- An AST scan of ``gateway/``, ``hospital_node/``, ``factory_node/`` (and
  ``yigong_node/``) fails when authorization logic (comparisons on a caller's
  ``.role``/``.org_node``/``.org``, uses of ``.is_node``/``.is_clinician``, comparisons
  with a principal or role name) appears outside ``gateway/authz.py``, except in the
  explicit allowlist below, each entry with its reason; an allowlist entry no longer
  needed fails too, so it stays exact.
- The decision function, table-driven: every domain action x every kind of caller on a
  hospital and a factory node (allow/deny and the exact message); every RPC method x
  every kind of caller; every case record type x every kind of signer.
- README's security-model table is the code's table (``python -m gateway.authz``).
- The caller's certificate is verified once per call (a real node, real mTLS).

The end-to-end refusal tests (tests/test_security.py, test_cases.py, ...) are unchanged.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import authz
from gateway.cases.schema import TYPES
from gateway.cases.workflow import Parties
from gateway.errors import PermissionDenied, SignerRefused
from gateway.identity import Identity
from tests.cluster import Federation, InProcessNode

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "hospital_node", "factory_node", "yigong_node")
AUTHZ_ATTRS = frozenset({"role", "org_node", "org", "is_node", "is_clinician"})
FLAG_ATTRS = frozenset({"is_node", "is_clinician"})
PRINCIPAL_NAMES = frozenset(
    {"clinician", "engineer", "officer", "peer", "self", "hospital", "factory"}
)

ALLOWED: dict[tuple[str, str], str] = {
    ("gateway/atna.py", "_render"): "an ATNA participant's role code, not a caller",
    ("gateway/cases/chain.py", "verify_envelope"): (
        "authenticity: the author and countersigning certificates are the ones the record "
        "names (who may sign what is authz.authorize_signer, via workflow.apply)"
    ),
    ("gateway/cases/service.py", "CaseService._check_author"): (
        "authenticity: the record names the verified caller as its author (after "
        "authz.authorize(CASE_SIGN))"
    ),
    ("gateway/cases/signing.py", "PersonSigner.from_files"): (
        "client side: a person's key signs records, a node's cannot (a usage check on "
        "local files, not a decision about a caller)"
    ),
    ("gateway/cli/config.py", "_node_cert"): (
        "configuration check: the node's own certificate is the one its config names"
    ),
    ("gateway/cli/connect.py", "connect"): (
        "client side: the CLI checks which node it reached before sending a command"
    ),
    ("gateway/config.py", "_check"): "configuration validation of node.role",
    ("gateway/demo/__init__.py", "NodeProc.info"): "the demo's printed instructions per node role",
    ("gateway/demo/__init__.py", "Demo.write_config"): "the demo's node configuration per role",
    ("gateway/identity.py", "Identity.label"): "formatting a label, no decision",
    ("gateway/pki.py", "write_person_pkcs12"): (
        "a browser PKCS#12 is written for persons only: input validation, no decision"
    ),
    ("gateway/gate.py", "Gate.record_refusal"): (
        "an audit field (the peer node of a refusal), no decision"
    ),
    ("gateway/server.py", "_role_hooks"): "wiring: which role's hooks this node runs",
    ("gateway/transfer/outbox.py", "Outbox._check_residency"): (
        "authentication of the server: the node reached is the peer the transfer is for"
    ),
    ("gateway/transfer/receipts.py", "check_receiver_signed"): (
        "authenticity: a receipt, or a batch's manifest receipt (the study exchange, #10), "
        "is signed by the node that received the object(s)"
    ),
}
"""(file, function) -> why its role/identity comparison is not an authorization decision.
An entry whose function does not exist (code another branch adds or removes) is
tolerated; one whose function exists but no longer needs it fails the test."""


def _findings(path: Path) -> list[tuple[str, int, str]]:
    """(qualified function, line, source) of each piece of authorization-like logic."""
    found: list[tuple[str, int, str]] = []
    stack: list[str] = []

    def visit(node: ast.AST) -> None:
        scoped = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        if scoped:
            stack.append(node.name)  # type: ignore[union-attr]
        where = ".".join(stack) or "<module>"
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                for sub in ast.walk(side):
                    attr = isinstance(sub, ast.Attribute) and sub.attr in AUTHZ_ATTRS
                    name = isinstance(sub, ast.Constant) and sub.value in PRINCIPAL_NAMES
                    if attr or name:
                        found.append((where, node.lineno, ast.unparse(node)))
        if isinstance(node, ast.Attribute) and node.attr in FLAG_ATTRS:
            found.append((where, node.lineno, ast.unparse(node)))
        for child in ast.iter_child_nodes(node):
            visit(child)
        if scoped:
            stack.pop()

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _scan() -> dict[tuple[str, str], list[str]]:
    hits: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "gateway/authz.py" or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for where, line, text in _findings(path):
                hits.setdefault((rel, where), []).append(f"{rel}:{line}: {text}")
    return hits


def test_authorization_logic_lives_only_in_gateway_authz() -> None:
    hits = _scan()
    stray = {k: v for k, v in hits.items() if k not in ALLOWED}
    assert not stray, (
        "authorization logic outside gateway/authz.py (ask authz.authorize with a named "
        "action instead, or allowlist it here with the reason it is not a decision):\n"
        + "\n".join(line for lines in stray.values() for line in lines)
    )


def _functions(path: Path) -> set[str]:
    """Qualified names of every function and class in ``path`` ("<module>" too)."""
    names = {"<module>"}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                names.add(name)
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return names


def test_the_allowlist_names_only_places_that_still_need_it() -> None:
    hits = _scan()
    stale = sorted(
        (rel, where)
        for rel, where in ALLOWED
        if (rel, where) not in hits and (ROOT / rel).exists() and where in _functions(ROOT / rel)
    )
    assert not stale, f"allowlist entries with nothing left to allow; remove them: {stale}"


def test_the_scan_finds_a_role_check_written_in_domain_code(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "class Releaser:\n"
        "    def confirm(self, caller):\n"
        "        if caller.is_node or caller.role != 'clinician':\n"
        "            raise PermissionError\n"
        "        if principal == 'peer':\n"
        "            pass\n"
    )
    found = _findings(sample)
    assert {w for w, _, _ in found} == {"Releaser.confirm"}
    assert {line for _, line, _ in found} == {3, 5}
    assert any("caller.role != 'clinician'" in text for _, _, text in found)


# -- the decision function, table-driven ----------------------------------------------------
HOSPITAL = authz.NodeSelf("hospital-1", "hospital")
FACTORY = authz.NodeSelf("factory-1", "factory")
OPPOSITE = {"hospital": FACTORY, "factory": HOSPITAL}

KINDS = (
    "self",
    "peer",
    "same-role node",
    "clinician",
    "engineer",
    "officer",
    "foreign clinician",
    "foreign engineer",
    "foreign officer",
)


def _identity(kind: str, subject: str, role: str, org: str) -> Identity:
    now = datetime.now(UTC)
    return Identity(
        kind="node" if kind == "node" else "person",
        subject_id=subject,
        role=role,
        region="cn-east" if kind == "node" else None,
        org_node=org,
        serial=7,
        not_before=now,
        not_after=now,
        fingerprint="a" * 64,
    )


def caller(kind: str, node: authz.NodeSelf) -> Identity:
    """A caller of ``kind`` as seen from ``node``."""
    if kind == "self":
        return _identity("node", node.node_id, node.role, node.node_id)
    if kind == "peer":
        peer = OPPOSITE[node.role]
        return _identity("node", peer.node_id, peer.role, peer.node_id)
    if kind == "same-role node":
        return _identity("node", f"{node.role}-9", node.role, f"{node.role}-9")
    role = kind.removeprefix("foreign ")
    org = "elsewhere-1" if kind.startswith("foreign") else node.node_id
    return _identity("person", "pat", role, org)


PERSONS = {"clinician", "engineer", "officer"}
FOREIGN = {f"foreign {r}" for r in PERSONS}
NODES = {"self", "peer", "same-role node"}

Expect = tuple[dict[str, set[str]], str, Callable[[str, Identity, authz.NodeSelf], str]]


def _confirm(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return f"only a clinician of node {n.node_id} may confirm a study; {c.label()} may not"


def _export(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return (
        f"only a clinician of node {n.node_id} may export a design to its PACS; {c.label()} may not"
    )


def _open(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return (
        f"cases are opened by a clinician at a hospital node; {c.label()} at {n.role} node "
        f"{n.node_id} may not"
    )


def _sign(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    if kind in {"foreign clinician", "foreign engineer"}:
        return (
            f"case C-1: {c.label()} belongs to node {c.org_node}, not {n.node_id}; records "
            "are submitted at the signer's own node"
        )
    return (
        f"case C-1: {c.label()} may not sign case records: they are signed by clinicians "
        "and engineers with their own certificate"
    )


def _take(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return (
        f"case C-1: record 3 comes from {c.role} node {c.subject_id}; a case runs between "
        "a hospital and a factory"
    )


def _open_from_peer(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return f"case C-1 is not known to {n.role} node {n.node_id}; a case is opened at its hospital"


def _witness(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return f"{c.label()} is not a node: only nodes witness"


def _read_witnessed(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return f"{c.label()} may not read witnessed audit checkpoints on node {n.node_id}"


def _list_all(kind: str, c: Identity, n: authz.NodeSelf) -> str:
    return f"{c.label()} sees only the transfers it took part in"


# action -> ({node role: kinds allowed}, resource, expected refusal)
EXPECTED: dict[str, Expect] = {
    authz.STUDY_CONFIRM: ({"hospital": {"clinician"}, "factory": set()}, "", _confirm),
    authz.DESIGN_EXPORT: ({"hospital": {"clinician"}, "factory": set()}, "", _export),
    authz.CASE_OPEN: (
        {"hospital": {"clinician", "foreign clinician"}, "factory": set()},
        "",
        _open,
    ),
    authz.CASE_SIGN: (
        {"hospital": {"clinician", "engineer"}, "factory": {"clinician", "engineer"}},
        "C-1",
        _sign,
    ),
    authz.CASE_TAKE_RECORD: (
        {"hospital": {"peer"}, "factory": {"peer"}},
        "C-1: record 3",
        _take,
    ),
    authz.CASE_OPEN_FROM_PEER: ({"hospital": set(), "factory": {"peer"}}, "C-1", _open_from_peer),
    authz.AUDIT_WITNESS: ({"hospital": NODES, "factory": NODES}, "", _witness),
    authz.AUDIT_READ_WITNESSED: (
        {"hospital": {"self", "officer"}, "factory": {"self", "officer"}},
        "someone-else",
        _read_witnessed,
    ),
    authz.TRANSFERS_LIST_ALL: (
        {"hospital": {"self"} | PERSONS | FOREIGN, "factory": {"self"} | PERSONS | FOREIGN},
        "",
        _list_all,
    ),
}


def test_every_domain_action_has_expectations() -> None:
    assert set(EXPECTED) | {authz.AUDIT_HAND_OVER} == set(authz.ACTIONS)


@pytest.mark.parametrize("action", sorted(EXPECTED))
@pytest.mark.parametrize("node", [HOSPITAL, FACTORY], ids=["hospital", "factory"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_domain_action_allows_or_refuses_each_kind_of_caller_with_its_message(
    action: str, node: authz.NodeSelf, kind: str
) -> None:
    allowed, resource, refusal = EXPECTED[action]
    who = caller(kind, node)
    if action == authz.AUDIT_READ_WITNESSED and kind == "peer":
        return  # own-resource rule: test_a_peer_reads_and_hands_over_only_its_own
    ctx = authz.RequestContext(who, node, remote="ipv4:127.0.0.1:1")
    if kind in allowed[node.role]:
        assert authz.authorize(ctx, action, resource=resource)
        assert authz.authorize(who, action, node, resource=resource)  # a bare identity
        assert authz.allowed(who, action, node, resource=resource)
    else:
        with pytest.raises(PermissionDenied) as refused:
            authz.authorize(ctx, action, resource=resource)
        assert str(refused.value) == refusal(kind, who, node)
        assert not authz.allowed(who, action, node, resource=resource)


def test_a_peer_reads_and_hands_over_only_its_own() -> None:
    peer = caller("peer", HOSPITAL)
    assert authz.authorize(peer, authz.AUDIT_READ_WITNESSED, HOSPITAL, resource="factory-1")
    with pytest.raises(PermissionDenied) as refused:
        authz.authorize(peer, authz.AUDIT_READ_WITNESSED, HOSPITAL, resource="factory-2")
    assert str(refused.value) == (
        "node:factory-1 may read only the checkpoints it handed over itself, not those of "
        "'factory-2'"
    )
    officer = caller("officer", HOSPITAL)
    assert authz.authorize(officer, authz.AUDIT_READ_WITNESSED, HOSPITAL, resource="factory-2")
    for kind in NODES:
        node = caller(kind, HOSPITAL)
        assert authz.authorize(
            node, authz.AUDIT_HAND_OVER, HOSPITAL, resource=node.subject_id, entry="4"
        )
        with pytest.raises(PermissionDenied) as refused:
            authz.authorize(node, authz.AUDIT_HAND_OVER, HOSPITAL, resource="x-1", entry="4")
        assert str(refused.value) == (
            f"{node.label()} may hand over only its own audit checkpoints, not node 'x-1''s "
            "(checkpoint at entry 4)"
        )
    with pytest.raises(PermissionDenied, match="is not a node: only nodes witness"):
        authz.authorize(officer, authz.AUDIT_HAND_OVER, HOSPITAL, resource="pat")


def test_a_local_context_decides_like_the_edge() -> None:
    node_self = caller("self", HOSPITAL)
    ctx = authz.RequestContext.local(node_self, HOSPITAL, "yigong hospital studies")
    assert (ctx.principal, ctx.remote, ctx.node) == (authz.SELF, "local", HOSPITAL)
    assert len(ctx.request_id) == 16
    assert authz.authorize(ctx, "/yigong.v1.Hospital/ListStudies") == authz.SELF
    with pytest.raises(PermissionDenied, match="only a clinician of node hospital-1"):
        authz.authorize(ctx, authz.STUDY_CONFIRM)


def test_an_unknown_action_is_refused() -> None:
    with pytest.raises(PermissionDenied) as refused:
        authz.authorize(caller("self", HOSPITAL), "study.delete", HOSPITAL)
    assert str(refused.value) == "study.delete is not an action of yigong node hospital-1"
    with pytest.raises(TypeError):
        authz.authorize(caller("self", HOSPITAL), authz.STUDY_CONFIRM)


PRINCIPAL_OF_KIND = {
    "self": authz.SELF,
    "peer": authz.PEER,
    "clinician": "clinician",
    "engineer": "engineer",
    "officer": "officer",
}


@pytest.mark.parametrize("method", sorted(authz.POLICY))
@pytest.mark.parametrize("node", [HOSPITAL, FACTORY], ids=["hospital", "factory"])
@pytest.mark.parametrize("kind", KINDS)
def test_each_rpc_method_allows_or_refuses_each_kind_of_caller_with_its_message(
    method: str, node: authz.NodeSelf, kind: str
) -> None:
    who = caller(kind, node)
    allowed = authz.POLICY[method]
    principal = PRINCIPAL_OF_KIND.get(kind)
    ctx = authz.RequestContext(who, node)
    if authz.ANY in allowed:
        assert authz.authorize(ctx, method) == authz.ANY
        return
    if principal is not None and principal in allowed:
        assert authz.authorize(ctx, method) == principal
        return
    with pytest.raises(PermissionDenied) as refused:
        authz.authorize(ctx, method)
    start = f"not allowed to call {method} on node {node.node_id}: "
    if kind in FOREIGN:
        why = (
            f"{who.label()} belongs to node 'elsewhere-1', not '{node.node_id}'; use a "
            "certificate issued for this node's organisation"
        )
    elif kind == "same-role node":
        why = (
            f"{who.label()} is a {node.role} node; {node.role} nodes exchange data only with "
            f"{OPPOSITE[node.role].role} nodes"
        )
    else:
        why = f"{who.label()} acts as '{principal}'; allowed: {', '.join(sorted(allowed))}"
    assert str(refused.value) == start + why


def test_an_unlisted_method_is_refused() -> None:
    with pytest.raises(PermissionDenied) as refused:
        authz.authorize(caller("self", HOSPITAL), "/yigong.v1.Query/DropAll", HOSPITAL)
    assert str(refused.value) == (
        "/yigong.v1.Query/DropAll is not an operation of yigong node hospital-1"
    )


# -- the standard's signer rules by record type -----------------------------------------------
PARTIES = Parties("C-1", "hospital-1", "factory-1")
CLINICIAN_OF_HOSPITAL = ("clinician", "hospital-1")
ENGINEER_OF_FACTORY = ("engineer", "factory-1")

# record type -> who signs it (standard §8/§9, the table in gateway/cases/workflow.py)
SIGNED_BY: dict[str, set[tuple[str, str]]] = {
    "data_confirmation": {CLINICIAN_OF_HOSPITAL},
    "order": {CLINICIAN_OF_HOSPITAL},
    "design_input_review": {ENGINEER_OF_FACTORY},
    "design_output": {ENGINEER_OF_FACTORY},
    "design_confirmation": {CLINICIAN_OF_HOSPITAL, ENGINEER_OF_FACTORY},
    "production_record": {ENGINEER_OF_FACTORY},
    "delivery_list": {ENGINEER_OF_FACTORY},
    "data_delivery": {ENGINEER_OF_FACTORY},
    "acceptance": {CLINICIAN_OF_HOSPITAL},
    "follow_up": {CLINICIAN_OF_HOSPITAL},
    "nonconformity": {CLINICIAN_OF_HOSPITAL},
    "design_change": {CLINICIAN_OF_HOSPITAL, ENGINEER_OF_FACTORY},
}
SIGNERS = [
    CLINICIAN_OF_HOSPITAL,
    ENGINEER_OF_FACTORY,
    ("clinician", "factory-1"),
    ("engineer", "hospital-1"),
    ("officer", "hospital-1"),
]


class _Author:
    def __init__(self, role: str, org: str) -> None:
        self.role, self.org = role, org

    def label(self) -> str:
        return f"{self.role}:pat@{self.org}"


def test_every_record_type_has_a_signer_rule() -> None:
    assert set(SIGNED_BY) == set(TYPES) == set(authz.RECORD_SIGNERS)


@pytest.mark.parametrize("kind", sorted(SIGNED_BY))
@pytest.mark.parametrize("signer", SIGNERS, ids=lambda s: f"{s[0]}@{s[1]}")
def test_each_record_type_is_signed_only_by_its_role_of_the_cases_node(
    kind: str, signer: tuple[str, str]
) -> None:
    role, org = signer
    author = _Author(role, org)
    spec = TYPES[kind]
    sign = lambda: authz.authorize_signer(  # noqa: E731
        PARTIES, kind, author, title=spec.title, section=spec.section
    )
    if signer in SIGNED_BY[kind]:
        sign()
        return
    with pytest.raises(SignerRefused) as refused:
        sign()
    roles = sorted({r for r, _ in SIGNED_BY[kind]})
    if role not in roles:
        who = " or ".join(PARTIES.who(r) for r in roles)
        want = (
            f"case C-1: {author.label()} may not sign {kind}: {spec.title} ({spec.section}) "
            f"is signed by {who}"
        )
    else:
        want = (
            f"case C-1: {author.label()} may not sign {kind}: the person belongs to node "
            f"{org}, but {spec.title} of this case is signed by {PARTIES.who(role)}"
        )
    assert str(refused.value) == want


def test_signed_content_rules_revised_design_and_confirmation_side() -> None:
    clinician, engineer = _Author(*CLINICIAN_OF_HOSPITAL), _Author(*ENGINEER_OF_FACTORY)
    files = {"files": [], "reason": "x"}
    authz.authorize_signed_content(PARTIES, "design_change", engineer, files)
    authz.authorize_signed_content(PARTIES, "design_change", clinician, {"reason": "x"})
    with pytest.raises(SignerRefused) as refused:
        authz.authorize_signed_content(PARTIES, "design_change", clinician, files)
    assert str(refused.value) == (
        "case C-1: clinician:pat@hospital-1 may not attach a revised design to a design "
        "change: the design is issued by an engineer of factory-1; send the change request "
        "without files"
    )
    authz.authorize_signed_content(PARTIES, "design_confirmation", clinician, {"side": "clinical"})
    authz.authorize_signed_content(PARTIES, "design_confirmation", engineer, {"side": "production"})
    with pytest.raises(SignerRefused) as refused:
        authz.authorize_signed_content(
            PARTIES, "design_confirmation", clinician, {"side": "production"}
        )
    assert str(refused.value) == (
        "case C-1: clinician:pat@hospital-1 may not sign the production confirmation: it is "
        "signed by an engineer of factory-1"
    )


# -- README shows the code's table ------------------------------------------------------------
BEGIN = "<!-- authz-table:begin"
END = "<!-- authz-table:end -->"


def test_readme_security_model_table_is_the_code_table() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert BEGIN in text and END in text, "README's security model lacks the authz table"
    shown = text[text.index(BEGIN) : text.index(END)]
    shown = shown[shown.index("\n") + 1 :]
    assert shown.strip() == authz.policy_markdown().strip(), (
        "README's authorization table differs from gateway/authz.py; paste the output of "
        "`python -m gateway.authz` between the authz-table markers"
    )


# -- identity verified once per call, at the edge ---------------------------------------------
def test_the_callers_certificate_is_verified_once_per_call(
    federation: Federation,
    pair: tuple[InProcessNode, InProcessNode],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hospital, _factory = pair
    trust = hospital.node.gate.trust
    verified: list[int] = []
    real = trust.verify_pem

    def counting(pem: bytes, *args: object, **kw: object) -> Identity:
        identity = real(pem, *args, **kw)  # type: ignore[arg-type]
        verified.append(identity.serial)
        return identity

    monkeypatch.setattr(trust, "verify_pem", counting)
    officer = federation.creds(federation.person("olga", "officer", "hospital-1"))
    with hospital.client(officer) as client:
        client.list_transfers(limit=5)
        client.list_objects(limit=5)
    assert len(verified) == 2, verified  # one per call, though each servicer reads it twice
    assert len(set(verified)) == 1
