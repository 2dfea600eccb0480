"""Generated documentation is up to date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_test_catalogue_is_current() -> None:
    spec = importlib.util.spec_from_file_location("list_tests", ROOT / "scripts" / "list_tests.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "docs" / "tests.md").read_text()
    assert current == module.render(), "docs/tests.md is stale: run python scripts/list_tests.py"
