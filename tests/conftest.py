"""Suite-wide switches.

``@pytest.mark.long`` marks a test that only runs with ``APPCONNECTOR_LONG=1`` (soaks, runs that show a
failure without a fix). Without it such tests are deselected, not skipped: CI runs as root with every
tool installed, so a skip there would mean a missing install step.
"""

from __future__ import annotations

import os

import pytest

LONG = os.environ.get("APPCONNECTOR_LONG") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: runs only with APPCONNECTOR_LONG=1 (deselected otherwise)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("long") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=["local", "raft"])
def replica_kind(request: pytest.FixtureRequest) -> str:
    """Which pool implementation a contract test runs against (see tests/replicas.py)."""
    kind: str = request.param
    return kind
