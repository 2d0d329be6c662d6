"""Where the real components built from Go modules live (scripts/build-components).

Tests find each binary through the build script, never through PATH: a kube-apiserver or
containerd that happens to be on a machine is not the pinned one.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-components"


@cache
def _lookup(name: str) -> tuple[Path | None, str]:
    result = subprocess.run(
        [str(SCRIPT), "--print-path", name], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode == 0 and result.stdout.strip():
        return Path(result.stdout.strip()), ""
    return None, (result.stderr or result.stdout).strip()


def component_dir(name: str) -> Path:
    """The directory holding ``name``'s binaries; fails the test when it is not built."""
    found, why = _lookup(name)
    if found is None:
        pytest.fail(
            f"{name} is not built ({why or 'no output'}): run scripts/setup "
            f"(or scripts/build-components {name})",
            pytrace=False,
        )
    return found


def component_binary(name: str, binary: str | None = None) -> Path:
    """One binary of a component, e.g. component_binary("containerd", "ctr")."""
    return component_dir(name) / (binary or name)


def component_version(name: str) -> str:
    """The pinned version, from the directory name (``<name>-<version>``)."""
    return component_dir(name).name.removeprefix(f"{name}-")


# The containerd versions a test runs on, as pytest parameters: Debian's 1.6 from PATH,
# and the 2.3 build (marked, so a machine without it skips those with a reason).
CONTAINERD_VERSIONS = [
    pytest.param("1.6", id="1.6"),
    pytest.param("2.3", id="2.3", marks=pytest.mark.containerd2),
]
