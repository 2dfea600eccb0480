"""The ``yigong`` program: the core's command line with the roles' command groups.

:mod:`gateway.cli` is imported first: it sets ``GRPC_VERBOSITY`` before anything
imports grpc (the roles' command groups and the node builder do).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway import cli as core_cli  # first: sets GRPC_VERBOSITY before grpc loads


def build_parser() -> argparse.ArgumentParser:
    """Every command: the core's, and each registered role's (:data:`ROLES`)."""
    from yigong_node.compose import build_node
    from yigong_node.roles import ROLES

    role_groups = [register for role in ROLES for register in role.cli]
    return core_cli.build_parser(role_groups=role_groups, build_node=build_node)


def main(argv: Sequence[str] | None = None) -> int:
    return core_cli.run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
