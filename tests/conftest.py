"""Shared pytest fixtures."""

from __future__ import annotations

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


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[PrivateContainerd]:
    """A started private containerd (root/state/log under tmp_path), stopped afterwards.

    Skips when containerd/ctr are missing or we are not root.
    """
    reason = containerd_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    c = PrivateContainerd(tmp_path / "containerd")
    try:
        c.start()
        yield c
    finally:
        c.close()
