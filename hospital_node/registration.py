"""The hospital role as it registers with the composition root (:mod:`yigong_node`).

:data:`ROLE` names the role, how its two build steps are made (:class:`HospitalHooks`
from the node's infrastructure, then :class:`HospitalRole` from those hooks and the
core's outbox and case service; see :mod:`gateway.roles`) and its command group
(``yigong study``). The core never imports this module; ``yigong_node`` does.
"""

from __future__ import annotations

from gateway.roles import CoreServices, Role, RoleContext, RoleHooks
from hospital_node.role import HospitalHooks, HospitalRole
from hospital_node.wire import cli as cli_study


def _services(hooks: RoleHooks, ctx: RoleContext, core: CoreServices) -> HospitalRole:
    if not isinstance(hooks, HospitalHooks):
        raise TypeError(f"the hospital role's services need HospitalHooks, not {hooks!r}")
    return HospitalRole(hooks, ctx, core)


ROLE = Role("hospital", hooks=HospitalHooks, services=_services, cli=(cli_study.register,))
