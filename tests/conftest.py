"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from spegeld_harness import PrivateContainerd, UpstreamRegistry, containerd_unavailable_reason

from tests._components import CONTAINERD_VERSIONS, component_dir
from tests._realsummary import pytest_runtest_logreport, pytest_terminal_summary

__all__ = ["pytest_runtest_logreport", "pytest_terminal_summary"]  # hooks, re-exported

# The fixtures that start a real containerd; a test using one is marked `containerd`.
_CONTAINERD_FIXTURES = frozenset({"containerd", "containerd2", "any_containerd"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything using the `containerd` fixture starts a real containerd: mark it so
    # `-m "not containerd"` deselects it even if the test forgot the marker.
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _CONTAINERD_FIXTURES or "containerd_bin_dir" in names:
            item.add_marker(pytest.mark.containerd)
        if "containerd2" in names:
            item.add_marker(pytest.mark.containerd2)


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
    yield from _started(tmp_path / "containerd", None)


@pytest.fixture
def containerd2(tmp_path: Path) -> Iterator[PrivateContainerd]:
    """Like ``containerd``, on the containerd 2.3 built by scripts/build-components."""
    yield from _started(tmp_path / "containerd2", component_dir("containerd"))


@pytest.fixture(params=CONTAINERD_VERSIONS)
def containerd_bin_dir(request: pytest.FixtureRequest) -> Path | None:
    """Run once per containerd version: None (Debian's 1.6 from PATH) or 2.3's binary dir.

    For tests that start their own nodes: ``PrivateContainerd(dir, bin_dir=...)``.
    """
    if request.param == "1.6":
        return None
    return component_dir("containerd")


@pytest.fixture
def any_containerd(tmp_path: Path, containerd_bin_dir: Path | None) -> Iterator[PrivateContainerd]:
    """A started private containerd, once on 1.6 (id "1.6") and once on 2.3 (id "2.3")."""
    yield from _started(tmp_path / "containerd", containerd_bin_dir)


def _started(base: Path, bin_dir: Path | None) -> Iterator[PrivateContainerd]:
    _require_containerd()
    c = PrivateContainerd(base, bin_dir=bin_dir)
    try:
        c.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[UpstreamRegistry]:
    """A real Distribution registry on loopback, the upstream containerd falls back to."""
    registry = UpstreamRegistry(tmp_path / "upstream")
    try:
        registry.start()
        yield registry
    finally:
        registry.close()
