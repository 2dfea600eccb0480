"""The factory role as it registers with the composition root (:mod:`yigong_node`).

:data:`ROLE` names the role, how it is built (:class:`FactoryRole` from the node's
infrastructure only; it needs none of the core's domain services, so its hooks are
also what the node starts, stops and serves through; see :mod:`gateway.roles`) and its
command group (``yigong factory``). The core never imports this module; ``yigong_node``
does.
"""

from __future__ import annotations

from factory_node.role import FactoryRole
from factory_node.wire import cli as cli_factory
from gateway.roles import Role

ROLE = Role("factory", hooks=FactoryRole, cli=(cli_factory.register,))
