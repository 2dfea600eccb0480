"""The layers hold in the code: the import graph has no cycle, the core imports no role,
and no service is finished after construction by someone else.

The graph is built with ``ast`` from the source of ``gateway/``, ``hospital_node/``,
``factory_node/`` and the composition root ``yigong_node/`` (nothing is imported): one
node per module, one edge per ``import`` / ``from ... import`` naming another module of
these packages, wherever it stands (a lazy import inside a function counts). Imports
under ``if TYPE_CHECKING:`` are annotations only and never run, so they make no edge of
the cycle check; the role check counts them too (the core does not even name a role).
The wiring check reads every assignment: a service's collaborators (hooks, telemetry,
facts hooks, the gatekeeper's callers...) are constructor arguments, never set on the
object from outside (``node.outbox.hooks = ...``). The layer check: only the wire
folders (``gateway/rpc/``, ``gateway/cli/``, ``hospital_node/wire/``,
``factory_node/wire/``) and the modules of ``WIRE_EXEMPT`` import grpc, pynetdicom,
argparse or a wire module. See docs/architecture.md.
"""

from __future__ import annotations

import argparse
import ast
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "hospital_node", "factory_node", "yigong_node")
CORE = "gateway"
ROLES = ("hospital_node", "factory_node")
ROOT_PACKAGE = "yigong_node"

CYCLE_BEING_REMOVED: dict[tuple[str, str], str] = {}
"""Import edges the cycle check leaves out, each with the work that removes it. An entry
whose import is gone fails test_no_stale_cycle_exemption, so the list only shrinks."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(
    tree: ast.AST, module: str, is_package: bool, typing_only: bool = False
) -> Iterator[tuple[tuple[str, ...], int, bool]]:
    """For every import statement, anywhere in the tree: (candidate module names, first
    match wins; line; whether it stands under ``if TYPE_CHECKING:``). ``from a import b``
    names the module ``a.b`` if there is one, else ``a``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(_module(child), module, is_package, True)
            for child in node.orelse:
                yield from _imports(_module(child), module, is_package, typing_only)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield (alias.name,), node.lineno, typing_only
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                yield (f"{base}.{alias.name}", base), node.lineno, typing_only
        yield from _imports(node, module, is_package, typing_only)


def _module(statement: ast.stmt) -> ast.Module:
    return ast.Module(body=[statement], type_ignores=[])


def graph() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(runtime edges, type-checking-only edges): module -> {imported module: line}."""
    known = modules()
    runtime: dict[str, dict[str, int]] = {m: {} for m in known}
    typing: dict[str, dict[str, int]] = {m: {} for m in known}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for candidates, line, typing_only in _imports(tree, module, path.name == "__init__.py"):
            target = next((c for c in candidates if c in known), None)
            if target is not None and target != module:
                (typing if typing_only else runtime)[module].setdefault(target, line)
    return runtime, typing


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (iterative DFS)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(edges, WHITE)
    for start in sorted(edges):
        if colour[start] != WHITE:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
                continue
            if colour.get(child, BLACK) == GREY:
                return [*path[path.index(child) :], child]
            if colour.get(child) == WHITE:
                colour[child] = GREY
                path.append(child)
                stack.append((child, iter(sorted(edges[child]))))
    return None


def describe(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    known = modules()
    steps = [
        f"{a} ({known[a].relative_to(ROOT)}:{edges[a][b]}) -> {b}"
        for a, b in itertools.pairwise(cycle)
    ]
    return "import cycle:\n  " + "\n  ".join(steps)


def test_graph_covers_every_package_and_sees_lazy_imports() -> None:
    """The graph is not empty and really reads imports inside functions."""
    runtime, _ = graph()
    for package in PACKAGES:
        assert package in runtime, f"{package}/ not found"
    assert len(runtime) > 100
    # gateway.cli imports its command groups inside build_parser (lazily); the
    # composition root imports both roles' registrations: the graph sees these edges.
    assert "gateway.cli.demo" in runtime["gateway.cli"]
    assert "hospital_node.registration" in runtime["yigong_node.roles"]
    assert "factory_node.registration" in runtime["yigong_node.roles"]


def test_no_import_cycle_among_modules() -> None:
    """No module imports itself through others (lazy imports count; the cycle's path is
    reported file by file with the line of each import)."""
    runtime, _ = graph()
    edges = {m: {t: line for t, line in targets.items() if (m, t) not in CYCLE_BEING_REMOVED}
             for m, targets in runtime.items()}  # fmt: skip
    cycle = find_cycle(edges)
    assert cycle is None, describe(cycle, edges)


def test_no_stale_cycle_exemption() -> None:
    """Every exempted edge still exists (when the work removing it lands, the entry goes)."""
    runtime, _ = graph()
    stale = [f"{a} -> {b}" for a, b in CYCLE_BEING_REMOVED if b not in runtime.get(a, {})]
    assert not stale, f"remove from CYCLE_BEING_REMOVED (the import is gone): {stale}"


def test_core_imports_no_role_package() -> None:
    """``gateway/`` names no role package, not even for type checking: roles register
    with the composition root (``yigong_node``), the core never reaches for them."""
    runtime, typing = graph()
    bad = [
        f"{m} ({modules()[m].relative_to(ROOT)}:{line}) imports {target}"
        for edges in (runtime, typing)
        for m, targets in edges.items()
        if m == CORE or m.startswith(CORE + ".")
        for target, line in targets.items()
        if target.split(".")[0] in (*ROLES, ROOT_PACKAGE)
    ]
    assert not bad, "the core imports a role or the composition root:\n  " + "\n  ".join(bad)


def test_roles_do_not_import_each_other_or_the_composition_root() -> None:
    """A role builds on the core only: never on the other role, never on ``yigong_node``."""
    runtime, typing = graph()
    bad = [
        f"{m} imports {target}"
        for edges in (runtime, typing)
        for m, targets in edges.items()
        for target in targets
        if m.split(".")[0] in ROLES
        and target.split(".")[0] in (*ROLES, ROOT_PACKAGE)
        and target.split(".")[0] != m.split(".")[0]
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "sources, expected",
    [
        ({"a": "import b\n", "b": "def f():\n    import a\n"}, ["a", "b", "a"]),
        ({"a": "from b import x\n", "b": "x = 1\n"}, None),
        (
            {
                "a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n",
                "b": "import a\n",
            },
            None,
        ),
    ],
)
def test_cycle_finder_finds_lazy_cycles_and_ignores_type_checking(
    sources: dict[str, str], expected: list[str] | None
) -> None:
    """The checker itself can fail: a lazy import closing a circle is found, an
    annotation-only import is not an edge."""
    edges: dict[str, dict[str, int]] = {}
    for name, text in sources.items():
        edges[name] = {
            target: line
            for (target, *_), line, typing_only in _imports(ast.parse(text), name, False)
            if target in sources and not typing_only and target != name
        }
    assert find_cycle(edges) == expected


WIRING_ATTRIBUTES = frozenset(
    {
        "alert_on_type_refusal", "audit", "callers", "cases", "catalog", "design_facts",
        "exchange", "facts_hook", "gate", "hooks", "outbox", "query", "receiver", "settle",
        "store", "target", "telemetry", "validate_design",
    }
)  # fmt: skip
"""Collaborators the composition root passes to constructors (docs/architecture.md)."""


def _set_from_outside(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Assignments ``x.attr = ...`` of a wiring attribute where ``x`` is not ``self``."""
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if (
                    isinstance(sub, ast.Attribute)
                    and isinstance(sub.ctx, ast.Store)
                    and sub.attr in WIRING_ATTRIBUTES
                    and not (isinstance(sub.value, ast.Name) and sub.value.id == "self")
                ):
                    yield node.lineno, ast.unparse(sub)


def test_no_service_is_finished_after_construction() -> None:
    """No module sets a collaborator on another object (``outbox.hooks = ...``,
    ``gate.callers = ...``): the composition root passes them to constructors."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {what} = ..."
        for path in modules().values()
        for line, what in _set_from_outside(ast.parse(path.read_text()))
    ]
    assert not bad, "set after construction:\n  " + "\n  ".join(bad)


def test_wiring_check_finds_a_hook_set_from_outside() -> None:
    """The wiring check can fail: the old ``node.outbox.hooks = ...`` is found, an
    object's own ``self.hooks = ...`` is not."""
    found = list(
        _set_from_outside(
            ast.parse("self.hooks = h\nnode.outbox.hooks = h\nnode.gate.callers: F = f\n")
        )
    )
    assert found == [(2, "node.outbox.hooks"), (3, "node.gate.callers")]


def test_roles_register_with_the_composition_root() -> None:
    """Both roles are in the registry, and their command groups reach the program."""
    from yigong_node.cli import build_parser
    from yigong_node.roles import ROLES

    assert ROLES.names() == ("hospital", "factory")
    commands = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    assert {"serve", "study", "factory", "case", "demo"} <= set(commands)


def test_an_unknown_role_is_a_clear_configuration_error() -> None:
    """A registry without the configured role refuses by name, listing the known ones."""
    from gateway.errors import ConfigError
    from gateway.roles import CORE_ONLY, RoleRegistry

    registry = RoleRegistry([CORE_ONLY]).with_role("factory", CORE_ONLY)
    with pytest.raises(ConfigError, match=r"node.toml: node role 'hospital' is not one this "
                       r"program knows \(core, factory\)"):  # fmt: skip
        registry.get("hospital", "node.toml")


# --- Layers in the tree: wire adapters in their folders, the domain beside them ---------

WIRE_FOLDERS = (
    "gateway.rpc",
    "gateway.cli",
    "gateway.web",
    "hospital_node.wire",
    "factory_node.wire",
)
"""The wire adapters: gRPC servicers, clients and edge (``gateway/rpc/``), the core's
command line (``gateway/cli/``), each role's DICOM, gRPC and CLI adapters
(``*/wire/``), the web console (``gateway/web/``). Everything else in the packages is
domain or infrastructure."""

WIRE_LIBRARIES = ("grpc", "grpc_health", "pynetdicom", "argparse", "starlette", "uvicorn")
"""What only a wire adapter imports (a generated ``*_pb2_grpc`` module counts as grpc)."""

WIRE_EXEMPT: dict[str, str] = {
    "yigong_node": "the composition root: builds the node and the program from every layer",
    "gateway.server": "the running node: starts the gRPC server with the servicers, the "
    "gatekeeper interceptor, the TLS terminator and the health service; builds no domain "
    "service",
    "gateway.telemetry": "infrastructure around the wire: OpenTelemetry interceptors for "
    "gRPC channels and the server",
    "gateway.demo": "drives two real nodes from outside, like a user: a PACS (pynetdicom) "
    "and the gRPC clients",
    "hospital_node.role": "the role's assembly: builds its SCP, gRPC servicer and PACS "
    "sender on the domain services (composition, like yigong_node)",
    "factory_node.role": "the role's assembly: builds its gRPC servicer on the domain",
    "hospital_node.registration": "hands the role's command group to the composition root",
    "factory_node.registration": "hands the role's command group to the composition root",
}
"""Modules (or packages: the name and everything under it) outside the wire folders that
may import wire libraries and wire modules, each with its reason."""


def _under(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def is_wire(module: str) -> bool:
    return _under(module, WIRE_FOLDERS)


def _is_wire_library(name: str) -> bool:
    return name.split(".")[0] in WIRE_LIBRARIES or name.split(".")[-1].endswith("_pb2_grpc")


def layer_violations(
    sources: dict[str, tuple[str, str, bool]], exempt: Iterable[str] = ()
) -> list[str]:
    """``sources``: module -> (file shown in messages, source text, is a package). Every
    runtime import, by a module neither in a wire folder nor exempt, of a wire library
    or of a wire module, as ``file:line: module imports what (why it may not)``.
    Imports under ``if TYPE_CHECKING:`` never run and are allowed (an annotation may
    name a wire type; the module still works without the wire)."""
    exempt = tuple(exempt)
    bad: list[str] = []
    for module, (shown, text, is_package) in sorted(sources.items()):
        if is_wire(module) or _under(module, exempt):
            continue
        for candidates, line, typing_only in _imports(ast.parse(text), module, is_package):
            if typing_only:
                continue
            target = next((c for c in candidates if c in sources), None)
            library = next((c for c in reversed(candidates) if _is_wire_library(c)), None)
            if target is not None and is_wire(target):
                bad.append(f"{shown}:{line}: {module} imports {target} (a wire module)")
            elif library is not None:
                bad.append(f"{shown}:{line}: {module} imports {library} (a wire library)")
    return bad


def _tree_sources() -> dict[str, tuple[str, str, bool]]:
    return {
        module: (str(path.relative_to(ROOT)), path.read_text(), path.name == "__init__.py")
        for module, path in modules().items()
    }


def test_only_wire_folders_import_grpc_pynetdicom_argparse_or_wire_modules() -> None:
    """Domain and infrastructure modules (everything outside ``gateway/rpc/``,
    ``gateway/cli/``, ``hospital_node/wire/``, ``factory_node/wire/`` and the exempt
    modules, each with its reason in WIRE_EXEMPT) import neither grpc, pynetdicom nor
    argparse, nor a wire adapter: wire -> domain call -> wire, never the reverse."""
    bad = layer_violations(_tree_sources(), WIRE_EXEMPT)
    assert not bad, (
        "outside the wire folders " + ", ".join(f.replace(".", "/") + "/" for f in WIRE_FOLDERS)
        + ":\n  " + "\n  ".join(bad)
        + "\nmove the adapter into a wire folder, call the domain from there, or add the "
        "module to WIRE_EXEMPT with its reason"
    )  # fmt: skip


def test_wire_folders_and_exemptions_exist() -> None:
    """Every wire folder and every exemption names modules of the tree (a moved or
    deleted module leaves no stale entry behind)."""
    known = modules()
    missing = [name for name in (*WIRE_FOLDERS, *WIRE_EXEMPT) if name not in known]
    assert not missing, f"not a module or package of the tree: {missing}"


@pytest.mark.parametrize(
    "module, text, expected",
    [
        ("gateway.exchange", "import grpc\n", ["gateway/exchange.py:1: gateway.exchange "
                                               "imports grpc (a wire library)"]),
        ("gateway.query", "x = 1\ndef f():\n    from pynetdicom import AE\n",
         ["gateway/query.py:3: gateway.query imports pynetdicom (a wire library)"]),
        ("hospital_node.release", "from hospital_node.wire.dimse import STATUSES\n",
         ["hospital_node/release.py:1: hospital_node.release imports "
          "hospital_node.wire.dimse (a wire module)"]),
        ("gateway.catalog", "from yigong.v1 import transfer_pb2_grpc\n",
         ["gateway/catalog.py:1: gateway.catalog imports yigong.v1.transfer_pb2_grpc "
          "(a wire library)"]),
        ("gateway.roles", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
         "    import argparse\n", []),
        ("gateway.cli.audit", "import argparse\nfrom gateway.rpc.client import NodeClient\n",
         []),
        ("gateway.server", "import grpc\nfrom gateway.rpc.auth import Gatekeeper\n", []),
    ],
)  # fmt: skip
def test_layer_check_finds_a_wire_import_in_the_domain(
    module: str, text: str, expected: list[str]
) -> None:
    """The layer check can fail: grpc, pynetdicom (lazily too), a generated gRPC stub or
    a wire module imported by a domain module is reported with its file and line; an
    annotation-only import, a wire module and an exempt module are not."""
    sources = {
        module: (module.replace(".", "/") + ".py", text, False),
        "hospital_node.wire.dimse": ("hospital_node/wire/dimse.py", "", False),
        "gateway.rpc.client": ("gateway/rpc/client.py", "", False),
        "gateway.rpc.auth": ("gateway/rpc/auth.py", "", False),
    }
    assert layer_violations(sources, WIRE_EXEMPT) == expected
