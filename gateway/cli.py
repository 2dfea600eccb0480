"""The ``yigong`` command line.

Each command group lives in its own module exposing ``register(subparsers)``;
this module wires them together, prints :class:`~gateway.errors.YigongError`
messages as ``error: ...`` and exits with status 2 (1 for a failed check).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import YigongError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yigong",
        description="Secure federated data-exchange gateway for custom-made medical devices.",
    )
    parser.add_argument("--version", action="version", version=f"yigong-gateway {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Command groups, in the order of the help text. Role commands (study, factory)
    # live with their role; the rest are the shared core's.
    from factory_node import cli_factory
    from gateway import cli_audit, cli_node, cli_pki, demo
    from gateway.cases import cli as cli_case
    from hospital_node import cli_study

    for group in (cli_pki, cli_node, demo, cli_study, cli_factory, cli_case, cli_audit):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except YigongError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
