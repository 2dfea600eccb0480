"""The roles this program knows: each role package registers one
:class:`~gateway.roles.Role` (its ``registration`` module), the composition root lists
them here. Adding a role is a package with a ``registration.ROLE`` and one line below."""

from __future__ import annotations

from factory_node.registration import ROLE as FACTORY
from gateway.roles import RoleRegistry
from hospital_node.registration import ROLE as HOSPITAL

ROLES = RoleRegistry((HOSPITAL, FACTORY))
