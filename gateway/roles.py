"""What a node role (hospital or factory) adds to the shared core, and how it registers.

The core calls these hooks at fixed points; ``hospital_node`` and
``factory_node`` implement them. The defaults do nothing, so the core runs
on its own (and a role module never has to patch core code).

The core never imports a role (tests/test_import_graph.py). Each role package
describes itself as one :class:`Role` (its name, how its hooks and services are
built, its command-line groups); the composition root (:mod:`yigong_node`) puts the
roles into a :class:`RoleRegistry` and builds a node in two steps around the core's
own services (docs/architecture.md):

1. ``Role.hooks(ctx)`` — what the core calls (checks, receipt facts, settle), from the
   node's infrastructure only (:class:`RoleContext`); the outbox, receiver, query and
   case services are then built with these hooks as constructor arguments.
2. ``Role.services(hooks, ctx, core)`` — the role's own services that use the core's
   (:class:`CoreServices`: e.g. the hospital's release queues on the outbox); returns
   the object the node starts, stops and registers gRPC services with (for a role
   without such services, the hooks of step 1 themselves).

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
- :meth:`RoleHooks.console_pages` — the role's pages of the web console (:mod:`gateway.web`).
- :meth:`RoleHooks.check_case_record` — a case record's content against what the role
  holds, on submission and on arrival (:mod:`gateway.cases.facts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError

if TYPE_CHECKING:
    import argparse

    from gateway.audit import AuditLog
    from gateway.cases.facts import RecordFacts
    from gateway.cases.service import CaseService
    from gateway.catalog import Catalog, ObjectRecord
    from gateway.config import LiveConfig, NodeConfig
    from gateway.exchange import Exchange
    from gateway.identity import Identity
    from gateway.query import QueryService
    from gateway.storage import ObjectStore
    from gateway.telemetry import Telemetry
    from gateway.transfer.model import Announce
    from gateway.transfer.outbox import Outbox
    from gateway.web.app import Console, ConsolePages


class RoleHooks:
    """Default hooks: no role-specific behaviour."""

    service_names: tuple[str, ...] = ()
    alert_on_type_refusal: bool = False
    """Whether an upload whose content contradicts its declared type is a security alert
    on this role's nodes (the hospital: it may be identifying data in disguise)."""

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

    def console_pages(self, console: Console) -> Sequence[ConsolePages]:
        """The role's pages of the web console, declared with ``console.page``."""
        return ()

    def check_case_record(self, ctx: RecordFacts) -> None:
        """Raise RecordUnfounded (or, for arriving records, FactsPending) when the record
        contradicts (or is not yet backed by) what this role holds."""

    def start(self) -> None:
        pass

    def settle(self) -> None:
        """Return once everything acknowledged so far is catalogued (NotReady if not soon)."""

    def stop(self) -> None:
        pass


@dataclass(frozen=True)
class RoleContext:
    """What a role's hooks are built from: the node's configuration, identity and
    infrastructure, all built before any of the core's domain services."""

    config: LiveConfig
    """The configuration in force (``cfg`` is what it is now)."""
    identity: Identity
    cert_pem: bytes
    sign: Callable[[bytes], bytes]
    catalog: Catalog
    store: ObjectStore
    audit: AuditLog
    telemetry: Telemetry
    check_design_file: Callable[[Path, str, str], None]
    """The format check of a design file under the node's ``[design]`` limits."""

    @property
    def cfg(self) -> NodeConfig:
        return self.config()


@dataclass(frozen=True)
class CoreServices:
    """The core's domain services a role's own services may use (built after the hooks)."""

    outbox: Outbox
    cases: CaseService
    exchange: Exchange
    """Local submission (what Exchange.Submit calls): e.g. a design file uploaded in the
    factory's console."""
    query: QueryService
    """The query service (what the Query service calls): e.g. the console's downloads."""


CliGroup = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
"""A command group's ``register(subparsers)``."""


def _hooks_only(hooks: RoleHooks, ctx: RoleContext, core: CoreServices) -> RoleHooks:
    return hooks


@dataclass(frozen=True)
class Role:
    """One node role as it registers with the composition root."""

    name: str
    """The ``[node] role`` value (and certificate role) this role serves."""
    hooks: Callable[[RoleContext], RoleHooks]
    services: Callable[[RoleHooks, RoleContext, CoreServices], RoleHooks] = _hooks_only
    cli: tuple[CliGroup, ...] = ()
    """The role's command groups, in the order of the help text."""


def _no_hooks(ctx: RoleContext) -> RoleHooks:
    return RoleHooks()


CORE_ONLY = Role("core", _no_hooks)
"""No role behaviour at all: the shared core on its own (tests of the core use it)."""


class RoleRegistry:
    """The roles a program knows, by name; filled by the composition root."""

    def __init__(self, roles: Iterable[Role] = ()) -> None:
        self._roles: dict[str, Role] = {}
        for role in roles:
            if role.name in self._roles:
                raise ValueError(f"role {role.name!r} registered twice")
            self._roles[role.name] = role

    def __iter__(self) -> Iterator[Role]:
        return iter(self._roles.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._roles)

    def get(self, name: str, source: object = "the configuration") -> Role:
        """The role called ``name`` (ConfigError naming the known roles if none is)."""
        try:
            return self._roles[name]
        except KeyError:
            raise ConfigError(
                f"{source}: node role {name!r} is not one this program knows "
                f"({', '.join(sorted(self._roles)) or 'none registered'})"
            ) from None

    def with_role(self, name: str, role: Role) -> RoleRegistry:
        """A copy in which ``name`` is served by ``role`` (e.g. :data:`CORE_ONLY`)."""
        roles = {**self._roles, name: Role(name, role.hooks, role.services, role.cli)}
        return RoleRegistry(roles.values())
