"""The factory role as it registers with the composition root (:mod:`yigong_node`).

:data:`ROLE` names the role, how its two build steps are made (:class:`FactoryRole`
from the node's infrastructure, then :class:`FactoryNodeRole` from those hooks and the
core's exchange and query service, for the console pages; see :mod:`gateway.roles`) and its
command group (``yigong factory``). The core never imports this module; ``yigong_node``
does.
"""

from __future__ import annotations

from factory_node.role import FactoryNodeRole, FactoryRole
from factory_node.wire import cli as cli_factory
from gateway.roles import CoreServices, Role, RoleContext, RoleHooks


def _services(hooks: RoleHooks, ctx: RoleContext, core: CoreServices) -> FactoryNodeRole:
    if not isinstance(hooks, FactoryRole):
        raise TypeError(f"the factory role's services need FactoryRole hooks, not {hooks!r}")
    return FactoryNodeRole(hooks, ctx, core)


ROLE = Role("factory", hooks=FactoryRole, services=_services, cli=(cli_factory.register,))
