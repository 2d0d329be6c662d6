"""Issue 13 item 7: the READMEs write secrets (the cluster key, the kubeconfig with its
token) under ``umask 077``, so the file is never readable by others, not even between its
creation and a ``chmod``. The snippets are run as written (paths moved into a temp dir),
under a permissive ``umask 022``, and what they write is loaded by spegeld itself.
"""

from __future__ import annotations

import base64
import re
import stat
import subprocess
from pathlib import Path

import pytest
import trustme
import yaml

from spegeld.gossip import load_key_file
from spegeld.kube import load_kubeconfig
from tests._components import component_binary

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "systemd" / "README.md", REPO / "deploy" / "README.md"]
SHELL_TIMEOUT = 30
# A redirection that creates a secret file: the cluster key or a kubeconfig.
SECRET_WRITE = re.compile(r">\s*(\S*(?:\.key|kubeconfig))\b")


def sh_blocks(doc: Path) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", doc.read_text(), flags=re.DOTALL)


def run_snippet(script: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    # umask 022 first: the snippet itself must make the file private, not the caller's umask.
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"umask 022\n{script}"], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=SHELL_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_secret_a_readme_writes_is_written_under_umask_077(doc: Path) -> None:
    writes = [
        line
        for block in sh_blocks(doc)
        for line in block.splitlines()
        if SECRET_WRITE.search(line.split("#", 1)[0])
    ]
    assert writes, f"{doc.name}: expected a key file or kubeconfig being written"
    for line in writes:
        assert line.lstrip().startswith("(umask 077; "), f"{doc.name}: {line}"


def test_readme_cluster_key_snippets_make_a_private_key_spegeld_loads(tmp_path: Path) -> None:
    """README.md's by-hand key and the systemd install's gossip key, run as written."""
    etc = tmp_path / "etc-spegeld"
    for doc, name in ((REPO / "README.md", "cluster.key"), (DOCS[1], "gossip.key")):
        (block,) = [b for b in sh_blocks(doc) if f"> /etc/spegeld/{name}" in b]
        lines = [
            line
            for line in block.splitlines()
            if re.fullmatch(r"install -d .*/etc/spegeld", line)
            or (name in line and "umask" in line)
        ]
        assert len(lines) == 2, (doc, lines)  # the directory, then the key
        run_snippet("\n".join(lines).replace("/etc/spegeld", str(etc)), tmp_path)
        assert mode(etc) == 0o700
        key = etc / name
        assert mode(key) == 0o600, f"{doc}: {oct(mode(key))}"
        keyring, warnings = load_key_file(key)
        assert warnings == []  # among them: group or other may read it
        assert len(keyring.fingerprint()) > 0


def test_deploy_readme_kubeconfig_is_private_and_loads_without_warnings(tmp_path: Path) -> None:
    """Step 3 of deploy/README.md with the real kubectl reading an admin kubeconfig (it
    only reads the file: no API server is needed for `config view`)."""
    ca = trustme.CA()
    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "lab", "cluster": {
                "server": "https://127.0.0.1:6443",
                "certificate-authority-data": base64.b64encode(ca.cert_pem.bytes()).decode()}}],
            "users": [{"name": "admin", "user": {"token": "admin-token"}}],
            "contexts": [{"name": "admin", "context": {"cluster": "lab", "user": "admin"}}],
            "current-context": "admin",
        })
    )  # fmt: skip
    kubectl_dir = component_binary("kubectl").parent
    env = {"KUBECONFIG": str(admin), "PATH": f"{kubectl_dir}:/usr/bin:/bin",
           "TOKEN": "minted-token-value"}  # fmt: skip
    blocks = sh_blocks(REPO / "deploy" / "README.md")
    (step3,) = [b for b in blocks if "cat > kubeconfig" in b]
    run_snippet(step3, tmp_path, env)
    written = tmp_path / "kubeconfig"
    assert mode(written) == 0o600
    creds = load_kubeconfig(written)
    assert creds.warnings == ()
    assert creds.server == "https://127.0.0.1:6443"
    assert creds.ca_pem == ca.cert_pem.bytes()
    assert creds.bearer_token() == "minted-token-value"
