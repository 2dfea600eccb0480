"""The ``yigong`` command line.

Each command group lives in its own module exposing ``register(subparsers)``;
this module wires them together, prints :class:`~gateway.errors.YigongError`
messages as ``error: ...`` and exits with status 2 (1 for a failed check).

No traceback reaches a user: an OS error is printed as one ``error:`` line naming the
file, anything unexpected as one line naming the exception (``-vv`` logs the
traceback). gRPC's C-core log lines (handshake and bind failures) are silenced unless
``-vv``: ``GRPC_VERBOSITY`` is read once, when grpc is first imported, so it is set
here, before any module that imports grpc.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.errors import YigongError


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
    from gateway import cli_audit, cli_config, cli_node, cli_pki, demo
    from gateway.cases import cli as cli_case
    from hospital_node import cli_study

    groups = (cli_pki, cli_node, demo, cli_study, cli_factory, cli_case, cli_audit, cli_config)
    for group in groups:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
