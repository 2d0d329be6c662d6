"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from spegeld.harness import PrivateContainerd, containerd_unavailable_reason


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything using the `containerd` fixture starts a real containerd: mark it so
    # `-m "not containerd"` deselects it even if the test forgot the marker.
    for item in items:
        if "containerd" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.containerd)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("containerd") is not None:
        _require_containerd()


def _require_containerd() -> None:
    reason = containerd_unavailable_reason()
    if reason is not None:
        if os.environ.get("SPEGELD_ALLOW_SKIP") == "1":
            pytest.skip(reason)
        pytest.fail(f"{reason} (set SPEGELD_ALLOW_SKIP=1 to skip these tests)")


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[PrivateContainerd]:
    """A started private containerd (root/state/log under tmp_path), stopped afterwards.

    Fails when containerd/ctr are missing or we are not root: scripts/test installs
    them, and a skipped real-component test would pass while proving nothing. Set
    SPEGELD_ALLOW_SKIP=1 to skip instead on a machine where that is understood.
    """
    _require_containerd()
    c = PrivateContainerd(tmp_path / "containerd")
    try:
        c.start()
        yield c
    finally:
        c.close()
