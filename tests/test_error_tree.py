"""The one error hierarchy is complete and its two wire translators agree.

Every exception class defined in gateway/, hospital_node/ and factory_node/ is a
YigongError drawn in the tree of ``gateway/errors.py`` (or a control-flow exception
drawn in that docstring's second tree, with the reason it may stay outside); the
drawing matches the real class hierarchy and its ``[retry]`` marks; every YigongError
has a row in the gRPC table (``gateway.rpc.status.CODES``) and in the DIMSE table
(``hospital_node.wire.dimse.STATUSES``), and the two answer "send again later" for exactly
the classes whose ``retryable`` is true. Like httpx's exported-members test: adding a
class without drawing it and giving it both rows fails here.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from types import ModuleType

import grpc
import pytest

from gateway import errors as e
from gateway.rpc.status import CODES, RETRY_LATER, error_from_rpc, status_for
from hospital_node.wire import dimse

PACKAGES = ("gateway", "hospital_node", "factory_node")

# Exceptions that are not YigongErrors on purpose: each is control flow inside one
# module or package, caught there and turned into a YigongError or a fallback.
ALLOWED_OUTSIDE = {
    "gateway.fidelity.formats._Invalid": "carries a format check's reason to the one "
    "place that words the ValidationError (file name, declared type)",
    "hospital_node.ingest_fast._Unusual": "the fast parser steps aside; pydicom parses",
    "hospital_node.deid.fast.FastPathUnsupported": "the fast path steps aside; the "
    "engine de-identifies the instance instead",
    "hospital_node.outbound.scanners.Unscannable": "the outbound gate turns it into "
    "OutboundRefused with its check name",
    "factory_node.role._Unparseable": "becomes the receipt fact dicom.parse_error",
    "gateway.web.cases._FieldError": "carries one form field's problem to the console's "
    "record form, where it is shown next to that field",
    "gateway.audit_witness._Conflict": "a contradicting witnessed checkpoint: leaves the "
    "store's transaction (rolled back) before the alert and the ValidationError",
    "gateway.rpc.proxy_protocol.ProxyHeaderError": "a load balancer's connection without a "
    "valid PROXY header: the terminator logs why and closes that connection",
}


def _modules() -> list[ModuleType]:
    found = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        found.append(package)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            found.append(importlib.import_module(info.name))
    return found


def _project_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in the project, by dotted path."""
    found: dict[str, type[BaseException]] = {}
    for module in _modules():
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


EXCEPTIONS = _project_exceptions()
YIGONG = {path: cls for path, cls in EXCEPTIONS.items() if issubclass(cls, e.YigongError)}


@dataclass(frozen=True)
class Drawn:
    parent: str | None
    retry: bool


_ROOT = re.compile(r"^    ([A-Za-z_][\w.]*)\b(.*)$")
_BRANCH = re.compile(r"^    ((?:[│ ]   )*)[├└]── ([A-Za-z_][\w.]*)(.*)$")


def parse_trees(doc: str) -> dict[str, Drawn]:
    """Every class drawn in ``doc``'s trees: its drawn parent and ``[retry]`` mark."""
    drawn: dict[str, Drawn] = {}
    stack: list[str] = []
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        branch = _BRANCH.match(line)
        if branch is not None and stack:
            depth = len(branch.group(1)) // 4 + 1
            del stack[depth:]
            name = branch.group(2)
            assert name not in drawn, f"{name} is drawn twice"
            drawn[name] = Drawn(stack[-1], "[retry]" in branch.group(3))
            stack.append(name)
            continue
        root = _ROOT.match(line)
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if root is not None and _BRANCH.match(following):
            name = root.group(1)
            drawn[name] = Drawn(None, "[retry]" in root.group(2))
            stack = [name]
        else:
            stack = []
    return drawn


def _drawn_name(path: str, cls: type[BaseException]) -> str:
    """YigongErrors are drawn by class name (all live in gateway.errors); the others by
    their full dotted path."""
    return cls.__name__ if issubclass(cls, e.YigongError) else path


def tree_problems(doc: str, classes: dict[str, type[BaseException]]) -> list[str]:
    """What the drawing in ``doc`` gets wrong about ``classes`` (empty: nothing)."""
    drawn = parse_trees(doc)
    problems = []
    names = set()
    for path, cls in classes.items():
        name = _drawn_name(path, cls)
        names.add(name)
        if name not in drawn:
            problems.append(f"{path} is not drawn in the tree of gateway/errors.py")
            continue
        if len(cls.__bases__) != 1:
            problems.append(f"{path} has several bases; the tree draws one parent")
            continue
        base = cls.__bases__[0]
        want = base.__name__ if issubclass(base, e.YigongError) or base is Exception else None
        if cls is not e.YigongError and drawn[name].parent != want:
            problems.append(f"{name} is drawn under {drawn[name].parent}, its base is {want}")
        retry = bool(getattr(cls, "retryable", False))
        if drawn[name].retry != retry:
            problems.append(f"{name} is drawn with [retry]={drawn[name].retry}, is {retry}")
    extra = set(drawn) - names - {"Exception"}
    problems += [f"{name} is drawn but no such class exists" for name in sorted(extra)]
    return problems


def test_every_project_exception_is_a_yigong_error_or_allowed_with_a_reason() -> None:
    """Each exception class of the three packages derives from YigongError, unless it is
    one of the listed control-flow exceptions (each with the reason it may)."""
    outside = {p for p, cls in EXCEPTIONS.items() if not issubclass(cls, e.YigongError)}
    assert outside == set(ALLOWED_OUTSIDE)
    assert all(len(reason) > 20 for reason in ALLOWED_OUTSIDE.values())
    assert len(YIGONG) >= 41  # the walk found the tree (41 classes when it was completed)


def test_every_yigong_error_lives_in_gateway_errors() -> None:
    """The hierarchy is one module: every YigongError class is defined in
    gateway/errors.py (modules that defined them before re-export them)."""
    assert {cls.__module__ for cls in YIGONG.values()} == {"gateway.errors"}


def test_moved_classes_keep_their_old_import_paths() -> None:
    """Classes moved into gateway.errors stay importable from where they were."""
    from gateway.cases.facts import FactsPending, RecordUnfounded
    from gateway.cases.records import ChainError
    from gateway.cases.schema import CaseFormatError
    from gateway.cases.sync import Refused
    from gateway.cases.workflow import SignerRefused, StageRefused
    from gateway.fidelity.mesh_readers import MeshFormatError
    from gateway.fidelity.step import StepFormatError
    from gateway.transfer.outbox import FactsDisagree
    from hospital_node.deid.engine import BurnedInAnnotationHeld, DeidRefused
    from hospital_node.ingest import DatasetMismatch, UnreadableInstance
    from hospital_node.release import StudyNotReady

    moved = [
        FactsPending, RecordUnfounded, ChainError, CaseFormatError, Refused, SignerRefused,
        StageRefused, MeshFormatError, StepFormatError, FactsDisagree,
        BurnedInAnnotationHeld, DeidRefused, DatasetMismatch, UnreadableInstance, StudyNotReady,
    ]  # fmt: skip
    assert all(getattr(e, cls.__name__) is cls for cls in moved)


def test_format_errors_are_validation_errors() -> None:
    """The mesh and STEP readers' errors are ValidationErrors, no longer bare Exceptions."""
    assert issubclass(e.MeshFormatError, e.ValidationError)
    assert issubclass(e.StepFormatError, e.ValidationError)
    assert status_for(e.MeshFormatError("x")) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_drawn_tree_matches_the_class_hierarchy() -> None:
    """Every exception class is drawn in gateway/errors.py under its real base class,
    with a [retry] mark exactly when it is retryable; nothing drawn is missing."""
    assert e.__doc__ is not None
    assert tree_problems(e.__doc__, EXCEPTIONS) == []


def test_the_tree_check_finds_a_missing_a_misplaced_and_a_stale_class() -> None:
    """The drawing check fails when it should: a class left out, one drawn under the
    wrong parent, a wrong [retry] mark, a drawn class that does not exist."""
    assert e.__doc__ is not None
    doc = e.__doc__.replace("    │   └── StepFormatError", "    │   └── StepFormatErr")
    doc = doc.replace("│   │   └── Refused ", "│   └── Refused   ")
    doc = doc.replace("ShuttingDown                [retry]", "ShuttingDown")
    problems = tree_problems(doc, EXCEPTIONS)
    assert "gateway.errors.StepFormatError is not drawn in the tree of gateway/errors.py" in (
        problems
    )
    assert "StepFormatErr is drawn but no such class exists" in problems
    assert "ShuttingDown is drawn with [retry]=False, is True" in problems
    assert "Refused is drawn under ValidationError, its base is ChainError" in problems
    assert len(problems) == 4, problems


def test_every_yigong_error_has_a_row_in_both_translators() -> None:
    """The gRPC and DIMSE tables each have exactly one row per YigongError class: none
    missing, none for a class that no longer exists."""
    classes = set(YIGONG.values())
    assert set(CODES) == classes, classes ^ set(CODES)
    assert set(dimse.STATUSES) == classes, classes ^ set(dimse.STATUSES)


@pytest.mark.parametrize("cls", sorted(YIGONG.values(), key=lambda c: c.__name__), ids=str)
def test_the_translators_agree_on_retrying(cls: type[e.YigongError]) -> None:
    """For each class: gRPC answers UNAVAILABLE/RESOURCE_EXHAUSTED and DIMSE 0xA7xx
    exactly when the class is retryable, through the translators' real functions."""
    exc = cls(f"{cls.__name__} happened")
    code, rsp = status_for(exc), dimse.store_response(exc)
    assert code == CODES[cls] and rsp.Status == dimse.STATUSES[cls][0]
    assert e.is_retryable(exc) is cls.retryable
    assert (code in RETRY_LATER) is cls.retryable, code
    assert dimse.retry_later(rsp.Status) is cls.retryable, hex(rsp.Status)
    assert rsp.ErrorComment and len(rsp.ErrorComment) <= dimse.ERROR_COMMENT_CHARS


def test_the_transient_kinds_are_the_retryable_ones() -> None:
    """What is retryable is decided once: the node's own passing conditions (store,
    catalog, audit log, PKI material, readiness, stopping, quota, an unreachable peer);
    a refused request, a missing object or a bad signature is final."""
    retryable = {cls.__name__ for cls in YIGONG.values() if cls.retryable}
    assert retryable == {
        "PKIError", "StorageError", "CatalogError", "AuditError", "QuotaExceeded",
        "PeerUnavailable", "NotReady", "FactsPending", "ShuttingDown",
    }  # fmt: skip


def test_catalog_and_audit_failures_are_unavailable_on_grpc() -> None:
    """The disagreement of issue #15: catalog and audit failures were INTERNAL on gRPC
    but retry-later on DIMSE; both now say retry later."""
    for exc in (e.CatalogError("catalog locked"), e.AuditError("audit log full")):
        assert status_for(exc) == grpc.StatusCode.UNAVAILABLE
        assert dimse.retry_later(dimse.store_response(exc).Status)


def test_a_subclass_without_a_row_is_answered_like_its_nearest_ancestor() -> None:
    """The rule for classes the tables do not name (e.g. one added later): the nearest
    ancestor's row answers; a non-YigongError (a bug) is INTERNAL / 0xA7FF."""

    class LaterKind(e.FactsPending):
        pass

    later = LaterKind("fact not here yet")
    assert status_for(later) == grpc.StatusCode.UNAVAILABLE
    assert dimse.store_response(later).Status == dimse.NOT_NOW
    assert e.is_retryable(later)
    assert status_for(RuntimeError("bug")) == grpc.StatusCode.INTERNAL
    rsp = dimse.store_response(RuntimeError("value from a data set"))
    assert (rsp.Status, rsp.ErrorComment) == (0xA7FF, "internal error; send again later")


class _Answered(grpc.RpcError):
    """A client-side RPC failure as grpc raises it (code and details)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"the node answered {self._code.name}"


@pytest.mark.parametrize("code", sorted(set(CODES.values()), key=lambda c: c.name), ids=str)
def test_a_client_rebuilds_an_error_exactly_as_retryable_as_the_servers(
    code: grpc.StatusCode,
) -> None:
    """error_from_rpc turns every code a server answers with into an error that is
    retryable exactly when the code is a retry-later code."""
    err = error_from_rpc(_Answered(code), "factory-1")
    assert e.is_retryable(err) is (code in RETRY_LATER)
    assert f"factory-1 answered {code.name}" in str(err)


def test_the_dimse_docs_table_lists_every_status_the_translator_answers() -> None:
    """docs/dicom-ingest.md's status table has a row for every status in the table."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "dicom-ingest.md").read_text()
    for status, _ in dimse.STATUSES.values():
        assert f"| `0x{status:04X}` |" in doc
