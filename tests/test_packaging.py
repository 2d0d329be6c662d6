"""Dependencies, licence and notices: what pyproject.toml declares is what the code needs.

The import check walks the source with ``ast`` so it cannot rot: a new third-party import
without a declared requirement fails here, not on an operator's clean node. The slow test
installs the built wheel into a fresh venv WITHOUT constraints.txt (pip resolves from
PyPI as an operator's would) and runs ``pip check`` and ``spegeld --version``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src" / "spegeld"
# Modules that may import an optional extra, and which extra: `spegeld demo` only.
EXTRA_IMPORTERS = {"spegeld-harness": {SRC / "cli" / "demo.py"}}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        assert found, req
        names.add(_canonical(found.group(1)))
    return names


def _pyproject() -> dict[str, object]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _third_party_imports() -> dict[str, set[Path]]:
    """Top-level module → the files importing it (absolute imports, stdlib and spegeld aside)."""
    found: dict[str, set[Path]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "spegeld":
                    found.setdefault(top, set()).add(path)
    return found


def test_every_imported_module_is_a_declared_requirement() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    declared = _requirement_names(project["dependencies"])
    providers = md.packages_distributions()
    imports = _third_party_imports()
    assert {"trio", "h11", "h2", "httpx", "yaml"} <= set(imports)  # the walk sees imports
    missing = []
    for module, files in sorted(imports.items()):
        dists = {_canonical(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported by {sorted(map(str, files))}) is not installed"
        if dists & declared:
            continue
        allowed = set().union(*(EXTRA_IMPORTERS.get(d, set()) for d in dists))
        if files <= allowed:
            continue
        missing.append(f"{module} ({', '.join(sorted(dists))}) in {sorted(map(str, files))}")
    assert not missing, "imported but not declared in [project].dependencies: " + "; ".join(missing)


def test_security_floors_and_build_requirements() -> None:
    data = _pyproject()
    deps = data["project"]["dependencies"]  # type: ignore[index]
    assert "h11>=0.16" in deps  # CVE-2025-43859
    assert not any(_canonical(d).startswith("anyio") for d in deps)  # trio only, no anyio
    # The SPDX licence string and license-files need setuptools 77 (PEP 639).
    assert data["project"]["license"] == "Apache-2.0"  # type: ignore[index]
    assert data["build-system"]["requires"] == ["setuptools>=77"]  # type: ignore[index]
    # The installed versions meet the floors (the venv is what the tests prove).
    assert tuple(int(p) for p in md.version("h11").split(".")[:2]) >= (0, 16)


def test_committed_wheel_notices_equal_a_fresh_generation(tmp_path: Path) -> None:
    out = tmp_path / "NOTICES"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "notices.py"), "--wheel", "-o", str(out)],
        check=True,
        timeout=60,
    )
    assert out.read_text() == (REPO / "THIRD_PARTY_NOTICES").read_text(), (
        "THIRD_PARTY_NOTICES is stale: run .venv/bin/python scripts/notices.py --wheel "
        "-o THIRD_PARTY_NOTICES"
    )
    text = out.read_text()
    for dist in ("trio", "h11", "httpx", "grpclib", "protobuf"):
        assert re.search(rf"^{dist} \S+: \S", text, re.MULTILINE | re.IGNORECASE), dist


def test_bundle_notices_carry_texts_cpython_and_glibc(tmp_path: Path) -> None:
    out = tmp_path / "NOTICES"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "notices.py"), "--bundle", "-o", str(out)],
        check=True,
        timeout=60,
    )
    text = out.read_text()
    assert "Permission is hereby granted" in text  # an MIT text (h11's, trio's, ...)
    assert re.search(r"^CPython 3\.\d+\.\d+: PSF-2\.0", text, re.MULTILINE)
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in text
    assert re.search(r"^Shared libraries libc\.so\.6: Debian package libc6$", text, re.MULTILINE)
    assert "GNU Lesser General Public" in text  # glibc's LGPL, from libc6's copyright


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """spegeld's wheel, built once per session (pip fetches setuptools>=77 in isolation)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        timeout=120,
    )
    (found,) = out.glob("spegeld-*.whl")
    return found


@pytest.mark.slow
def test_wheel_ships_licence_and_notices(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        licences = {n.rsplit("/", 1)[1] for n in names if ".dist-info/licenses/" in n}
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert licences == {"LICENSE", "THIRD_PARTY_NOTICES"}
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Dist: h11>=0.16" in metadata
    assert not any("spegeld_harness" in n for n in names)


@pytest.mark.slow
def test_wheel_installs_cleanly_without_constraints(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    # No -c constraints.txt: pip resolves the declared ranges as an operator's would.
    subprocess.run([*pip, "install", "-q", str(wheel)], check=True, timeout=180)
    check = subprocess.run([*pip, "check"], check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    version = subprocess.run(
        [str(venv / "bin" / "spegeld"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert version.stdout.startswith(f"spegeld {md.version('spegeld')} (Python ")
    same = subprocess.run(
        [str(venv / "bin" / "spegeld"), "version"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert same.stdout == version.stdout


def test_version_flag_equals_version_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from spegeld.cli import cli

    # A config file gives the `version` subcommand a default map; --version must not read it.
    config = tmp_path / "c.toml"
    config.write_text("nodes = 3\n")
    runner = CliRunner()
    flag = runner.invoke(cli, ["--config", str(config), "--version"])
    command = runner.invoke(cli, ["version"])
    assert flag.exit_code == command.exit_code == 0, flag.output
    assert flag.output == command.output
    assert flag.output.startswith(f"spegeld {md.version('spegeld')} (Python ")
