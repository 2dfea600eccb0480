#!/usr/bin/env python3
"""Generate the Python protobuf/gRPC stubs for proto/yigong/v1 into yigong/v1.

This is the only way stubs are made; never edit yigong/v1/*_pb2*.py by hand.
tests/test_protos.py regenerates into a temporary folder and fails when the
committed stubs differ (stale), so run this after changing any .proto:

    python scripts/gen_protos.py

Needs grpcio-tools (pinned in pyproject's [test] extra so output is stable).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE_DIR = Path("yigong") / "v1"
INIT_TEXT = '"""Generated from proto/yigong/v1 by scripts/gen_protos.py. Do not edit."""\n'


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto under proto/yigong/v1; return the files written."""
    from grpc_tools import protoc  # imported here: only needed to generate

    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    out_dir = out_root / PACKAGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*_pb2*.py*"):
        stale.unlink()
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    (out_dir / "__init__.py").write_text(INIT_TEXT)
    return sorted(out_dir.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo root)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
