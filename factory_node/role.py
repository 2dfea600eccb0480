"""The factory node's additions to the core (see :mod:`gateway.roles`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.roles import RoleHooks

if TYPE_CHECKING:
    from gateway.server import Node


class FactoryRole(RoleHooks):
    def __init__(self, node: Node) -> None:
        self.node = node
