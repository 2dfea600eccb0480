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
object from outside (``node.outbox.hooks = ...``). See docs/architecture.md.
"""

from __future__ import annotations

import argparse
import ast
import itertools
from collections.abc import Iterator
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
