from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Federation, InProcessNode, write_config

pytest_plugins = ["tests.s3server", "tests.pg", "tests.replicas", "tests.audit_keys"]


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    """One federation CA per test session; certificates are made on demand."""
    return Federation(tmp_path_factory.mktemp("federation"))


@pytest.fixture
def pair(federation: Federation, tmp_path: Path) -> Iterator[tuple[InProcessNode, InProcessNode]]:
    """A running factory node and a hospital node that knows it as a peer."""
    factory = InProcessNode(write_config(federation, tmp_path, "factory-1", "factory"))
    hospital = InProcessNode(
        write_config(
            federation, tmp_path, "hospital-1", "hospital", peers={"factory-1": factory.address}
        )
    )
    yield hospital, factory
    hospital.stop()
    factory.stop()


from tests.browser import browser  # noqa: E402,F401  (session fixture: one Chromium for the console's browser tests)
