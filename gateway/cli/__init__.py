"""The ``yigong`` command line: the core's part (the CLI adapters of ``gateway/``).

Each command group lives in its own module of this package exposing
``register(subparsers)`` (``audit``, ``cases``, ``config``, ``db``, ``demo``, ``node``,
``pki``;
``connect``, ``download``, ``send``, ``progress`` are their shared helpers);
this module puts the core's groups and the roles' groups it is given in order, prints
:class:`~gateway.errors.YigongError` messages as ``error: ...`` and exits with status 2
(1 for a failed check). The program itself (``yigong``, ``python -m yigong_node``) is
:mod:`yigong_node.cli`: the composition root hands in the roles' command groups and
the node builder ``yigong serve`` uses, so nothing here imports a role.

No traceback reaches a user: an OS error is printed as one ``error:`` line naming the
file, anything unexpected as one line naming the exception (``-vv`` logs the
traceback). gRPC's C-core log lines (handshake and bind failures) are silenced unless
``-vv``: ``GRPC_VERBOSITY`` is read once, when grpc is first imported, so it is set
here, before any module that imports grpc (importing any command group of this
package runs this first).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.errors import YigongError

if TYPE_CHECKING:
    from gateway.config import NodeConfig
    from gateway.roles import CliGroup
    from gateway.server import Node


def _verbosity(argv: Sequence[str]) -> int:
    """How many -v the command line asks for (read before argparse, for GRPC_VERBOSITY)."""
    count = 0
    for word in argv:
        if word == "--verbose":
            count += 1
        elif word.startswith("-v") and set(word[1:]) == {"v"}:
            count += len(word) - 1
    return count


if _verbosity(sys.argv[1:]) < 2:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")

log = logging.getLogger(__name__)


def build_parser(
    *, role_groups: Sequence[CliGroup], build_node: Callable[[NodeConfig], Node]
) -> argparse.ArgumentParser:
    """The whole command line: the core's groups with ``role_groups`` among them, and
    ``yigong serve`` running what ``build_node`` builds."""
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
    # live with their role and come in as role_groups; the rest are the shared core's.
    from gateway.cli import audit, cases, config, db, demo, node, pki

    pki.register(sub)
    node.register(sub, build_node=build_node)
    demo.register(sub)
    for register in role_groups:
        register(sub)
    for group in (cases, audit, config, db):
        group.register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command: a user sees one ``error:`` line, never a
    traceback (exit 2; 3 for a bug; 130 interrupted)."""
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
    except OSError as exc:
        log.debug("OS error", exc_info=True)
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        print(f"error: {where + ': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the last line of defence: one line, never a traceback
        log.debug("unexpected error", exc_info=True)
        print(
            f"error: unexpected {type(exc).__name__}: {exc} (this is a bug; run with -vv "
            "for the traceback and report it)",
            file=sys.stderr,
        )
        return 3


def main(argv: Sequence[str] | None = None) -> int:
    """Not the program any more: says where it is (an entry point installed before the
    composition root existed still calls this; ``pip install -e .`` renews it)."""
    print(
        "error: the yigong program is yigong_node.cli (`python -m yigong_node`); "
        "gateway.cli is only the core's part of it. If `yigong` printed this, its entry "
        "point is stale: run `pip install -e .` in the source tree.",
        file=sys.stderr,
    )
    return 2
