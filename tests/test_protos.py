"""The committed stubs in yigong/v1 are exactly what scripts/gen_protos.py makes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_stubs_are_not_stale(tmp_path: Path) -> None:
    gen = _generator()
    fresh = {p.name: p.read_bytes() for p in gen.generate(tmp_path)}
    committed_dir = ROOT / "yigong" / "v1"
    committed = {
        p.name: p.read_bytes()
        for p in committed_dir.iterdir()
        if p.is_file() and p.suffix != ".pyc"
    }
    assert sorted(fresh) == sorted(committed), (
        "stub files differ from proto/yigong/v1: run `python scripts/gen_protos.py`"
    )
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `python scripts/gen_protos.py` and commit"


def test_proto_package_mirrors_python_package() -> None:
    from yigong.v1 import query_pb2, transfer_pb2

    assert transfer_pb2.DESCRIPTOR.package == "yigong.v1"
    assert transfer_pb2.DESCRIPTOR.name == "yigong/v1/transfer.proto"
    assert query_pb2.DESCRIPTOR.services_by_name["Query"].full_name == "yigong.v1.Query"
