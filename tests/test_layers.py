"""Imports point one way (DESIGN.md §3): oci ← store ← routing ← {gossip, …} ← app ← cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "spegeld"

# Lower ranks may be imported by higher ones; equal ranks only within one package.
RANKS = {
    "errors": 0,
    "metrics": 0,
    "oci": 1,
    "config": 1,
    "mirrorconfig": 1,
    "containerd": 2,
    "store": 3,
    "routing": 4,
    "gossip": 5,
    "mirror": 5,
    "election": 5,
    "kube": 2,
    "systemd": 5,
    "status": 5,  # the typed /status model: produced by app, read by cli and doctor
    "doctor": 6,  # checks every layer below: kube, containerd, gossip
    "app": 7,
    "cli": 8,
    "__main__": 9,
}


def _package(module_path: Path) -> str:
    parts = module_path.relative_to(SRC).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith("spegeld."):
                found.add(name.split(".")[1])
    return found


MODULES = sorted(
    p
    for p in SRC.rglob("*.py")
    if ("_gen" not in p.parts and p.name != "__init__.py")
    or (p.name == "__init__.py" and p.parent != SRC and "_gen" not in p.parts)
)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_one_way(path: Path) -> None:
    own = _package(path)
    assert own in RANKS, f"{own} has no layer: add it to RANKS and DESIGN's picture"
    for imported in _imports(path):
        if imported == own:
            continue
        assert imported in RANKS, f"{path.name} imports spegeld.{imported}, which has no layer"
        assert RANKS[imported] < RANKS[own], (
            f"{path.relative_to(SRC)} ({own}) imports spegeld.{imported}: imports must point "
            "down the layers"
        )


def test_asyncio_only_in_the_bridge() -> None:
    users = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "_gen" not in p.parts and "asyncio" in {n.split(".")[0] for n in _module_names(p)}
    )
    assert users == ["containerd/_bridge.py"]


def _module_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_product_leaves_the_harness_out() -> None:
    """spegeld_harness is a separate distribution: only `spegeld demo` reaches for it."""
    users = sorted(
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if "_gen" not in p.parts and "spegeld_harness" in _top_level_imports(p)
    )
    assert users == ["cli/demo.py"]


def _top_level_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found
