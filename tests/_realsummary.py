"""At the end of a run: each real component, its version, and the tests that used it.

Tests say which real component they start with a marker (pyproject.toml); this counts the
tests that passed per marker and names the files they are in.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict

import pytest

from tests._components import _lookup

# marker → (component, how to read its version)
_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "containerd2": ("containerd (built)", ("containerd",)),
    "kubeapiserver": (
        "kube-apiserver, etcd, kubectl (built)",
        ("kube-apiserver", "etcd", "kubectl"),
    ),
    "talos": ("Talos machinery validator (built)", ("talosvalidate",)),
}

_passed: dict[str, set[str]] = defaultdict(set)  # marker → passed test node ids


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call" or not report.passed:
        return
    markers = set(report.keywords)
    for marker in ("containerd", *_COMPONENTS):
        if marker in markers:
            if marker == "containerd" and "containerd2" in markers:
                continue  # counted under containerd2
            _passed[marker].add(report.nodeid)


def _debian_containerd() -> str:
    binary = shutil.which("containerd")
    if binary is None:
        return "missing"
    version = [binary, "--version"]
    out = subprocess.run(version, capture_output=True, text=True, timeout=10, check=False).stdout
    match = re.search(r"\s(v?\d+\.\d+\.\d+)", out)
    return match.group(1) if match else out.strip()


def _built_version(name: str) -> str:
    found, _ = _lookup(name)
    return found.name.removeprefix(f"{name}-") if found is not None else "not built"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _passed:
        return
    write = terminalreporter.write_line
    terminalreporter.section("real components")
    rows = [("containerd", "containerd (Debian)", _debian_containerd())]
    for marker, (label, names) in _COMPONENTS.items():
        rows.append((marker, label, " / ".join(_built_version(n) for n in names)))
    for marker, label, version in rows:
        ids = _passed.get(marker, set())
        files = sorted({nodeid.split("::")[0].removeprefix("tests/") for nodeid in ids})
        write(f"{label} {version}: {len(ids)} tests passed in {', '.join(files) or 'none'}")
