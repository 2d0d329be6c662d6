"""KUBECONFIG is honoured like kubectl: a colon-separated list, missing files skipped.

spegeld does not merge the files as kubectl does; it takes the first existing file with a
current-context (or defining the asked-for context). Where both apply, the server chosen is
checked against the real kubectl's own choice (`kubectl config view --minify`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from spegeld.errors import KubeconfigError
from spegeld.kube import discover
from tests.test_kube_credentials import ENV, account, kubeconfig, write


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _kubectl_server(value: str, context: str | None = None) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (scripts/setup installs it)")
    cmd = [kubectl, "config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"]
    if context:
        cmd += ["--context", context]
    env = {"PATH": os.environ.get("PATH", "/usr/bin"), "KUBECONFIG": value, "HOME": "/nonexistent"}
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=30, check=True
    ).stdout


def test_first_file_with_a_current_context_wins(tmp_path: Path, ca: trustme.CA) -> None:
    no_current = write(tmp_path / "a", kubeconfig(current=None))
    first = write(tmp_path / "b", kubeconfig(current="elsewhere"))
    second = write(tmp_path / "c", kubeconfig())
    missing = tmp_path / "missing"
    value = os.pathsep.join(map(str, [missing, no_current, first, second]))
    creds = discover(None, None, {**ENV, "KUBECONFIG": value}, account(tmp_path, ca))
    assert creds is not None and creds.source.startswith("kubeconfig ")
    assert creds.server == "https://wrong.example:1" == _kubectl_server(value)


def test_explicit_context_picks_the_first_file_defining_it(tmp_path: Path) -> None:
    plain = kubeconfig()
    plain["contexts"] = plain["contexts"][:1]  # only admin@talos
    first = write(tmp_path / "a", plain)
    second = write(tmp_path / "b", kubeconfig())
    value = os.pathsep.join(map(str, [first, second]))
    creds = discover(None, "elsewhere", {"KUBECONFIG": value})
    assert creds is not None and creds.server == "https://wrong.example:1"
    assert creds.server == _kubectl_server(value, "elsewhere")


def test_flag_wins_over_the_environment(tmp_path: Path) -> None:
    flag = write(tmp_path / "flag", kubeconfig())
    env = write(tmp_path / "env", kubeconfig(current="elsewhere"))
    creds = discover(flag, None, {"KUBECONFIG": str(env)})
    assert creds is not None and creds.server == "https://127.0.0.1:7445"


def test_environment_wins_over_in_cluster(tmp_path: Path, ca: trustme.CA) -> None:
    path = write(tmp_path / "k", kubeconfig())
    creds = discover(None, None, {**ENV, "KUBECONFIG": str(path)}, account(tmp_path, ca))
    assert creds is not None and creds.source.startswith("kubeconfig ")
    # An empty KUBECONFIG is unset, as for kubectl.
    pod = discover(None, None, {**ENV, "KUBECONFIG": ""}, account(tmp_path, ca))
    assert pod is not None and pod.source == "in-cluster service account"


def test_unusable_lists_are_clear_errors(tmp_path: Path) -> None:
    missing = f"{tmp_path / 'x'}{os.pathsep}{tmp_path / 'y'}"
    with pytest.raises(KubeconfigError, match="none of its files exists"):
        discover(None, None, {"KUBECONFIG": missing})
    bare = write(tmp_path / "bare", kubeconfig(current=None))
    with pytest.raises(KubeconfigError, match="no file sets a current-context"):
        discover(None, None, {"KUBECONFIG": str(bare)})
    with pytest.raises(KubeconfigError, match="no file defines context 'nope'"):
        discover(None, "nope", {"KUBECONFIG": str(bare)})
    broken = write(tmp_path / "broken", "{ not yaml")
    with pytest.raises(KubeconfigError, match="broken"):
        discover(None, None, {"KUBECONFIG": str(broken)})
