"""``yigong demo`` on the command line: the options, the story run, the clean-up.

The federation and its two node processes are :class:`gateway.demo.Demo`; the story's
steps are :func:`gateway.demo.steps.run_story` (which uses :mod:`gateway.demo`'s names,
so this command lives apart from both and nothing imports in a circle).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from gateway.demo import Demo, tail
from gateway.demo.steps import run_story
from gateway.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a throwaway hospital + factory federation here and show the main path",
        description="PACS pushes a synthetic CT study, a clinician confirms it, the "
        "de-identified study arrives at the factory and is checked, an engineer downloads "
        "it; then a design-review PDF makes the file round trip. Real processes, real mTLS.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        help="work directory, new or empty, kept afterwards (default: a temporary one, "
        "removed at exit)",
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="leave both nodes running; print one JSON document about them on stdout",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    temporary = args.dir is None
    demo = Demo(_prepare_dir(args.dir), keep=bool(args.keep_running))
    try:
        ok = run_story(demo)
    except BaseException:
        demo.stop()
        if temporary:
            for node_log in sorted((demo.root / "logs").glob("*.log")):
                demo.say(f"end of {node_log.name}:", tail(node_log))
            shutil.rmtree(demo.root, ignore_errors=True)
        raise
    if demo.keep and ok:
        with demo.step("Leaving both nodes running"):
            demo.say(f"  detached; to stop them: {demo.stop_command()}")
        print(json.dumps(demo.describe(), indent=2), flush=True)
        return 0
    with demo.step("Stop both nodes"):
        demo.stop()
    if temporary:
        shutil.rmtree(demo.root, ignore_errors=True)
        demo.say(f"\nRemoved the temporary folder {demo.root} (run with --dir DIR to keep it).")
    else:
        demo.say(
            f"\nEverything is in {demo.root}:",
            "  ca/ (throwaway federation CA)  certs/  hospital-1.toml  factory-1.toml",
            "  data/ (object stores, catalogs, audit logs)  logs/  run/  pacs/  downloads/",
        )
    demo.say(f"Demo {'passed every check' if ok else 'FAILED'} in {demo.elapsed():.1f} s.")
    return 0 if ok else 1


def _prepare_dir(arg: Path | None) -> Path:
    if arg is None:
        return Path(tempfile.mkdtemp(prefix="yigong-demo-")).resolve()
    root = arg.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"demo directory {root} exists and is not a directory")
    if root.exists() and any(root.iterdir()):
        raise ConfigError(
            f"demo directory {root} is not empty; give a new or empty directory with --dir "
            "(the demo never touches existing files)"
        )
    if any(c in str(root) for c in '"\\') or not str(root).isprintable():
        raise ConfigError(
            f"demo directory {root}: quotes, backslashes and control characters are not "
            "supported (the path is written into TOML files)"
        )
    root.mkdir(parents=True, exist_ok=True)
    return root
