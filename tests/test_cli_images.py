"""``spegeld images`` as a user runs it: a real process, real containerd, real exit codes."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from spegeld_harness import PrivateContainerd, build_image

SPEGELD = [sys.executable, "-m", "spegeld"]


# Root passes every permission check through these two capabilities; without them
# root meets file modes like anyone else (and can still run the venv under /root).
NO_DAC = "-dac_override,-dac_read_search"


def run(*args: str | Path, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [*SPEGELD, *map(str, args)]
    if unprivileged:
        argv = ["setpriv", f"--bounding-set={NO_DAC}", f"--inh-caps={NO_DAC}", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEGELD_")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_socket(tmp_path: Path) -> None:
    sock = tmp_path / "nope.sock"
    assert_one_line_error(run("images", "--containerd-sock", sock), str(sock), "does not exist")


def test_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("plain file")
    assert_one_line_error(run("images", "--containerd-sock", path), str(path), "not a socket")


def test_socket_without_permission(tmp_path: Path) -> None:
    assert shutil.which("setpriv"), "util-linux's setpriv drops root's override capabilities"
    sock = tmp_path / "containerd.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock))
        server.listen()
        nobody = pwd.getpwnam("nobody")
        os.chown(sock, nobody.pw_uid, nobody.pw_gid)
        sock.chmod(0o600)  # owner only, like containerd's root-owned socket
        result = run("images", "--containerd-sock", sock, unprivileged=True)
    assert_one_line_error(result, str(sock), "permission denied")


@pytest.mark.containerd
def test_images_lists_tags_and_digests(containerd: PrivateContainerd, tmp_path: Path) -> None:
    image = build_image("example.com/team/app:v1", [1000, 2000], seed=31)
    containerd.import_image(image.write_oci_archive(tmp_path / "app.tar"))
    result = run(
        "images", "--json", "--containerd-sock", containerd.socket,
        "--containerd-content-path", containerd.content_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tags"] == {"example.com/team/app:v1": image.digest}
    got = {d["digest"]: (d["mediaType"], d["size"]) for d in data["digests"]}
    assert got == {d: (b.media_type, b.size) for d, b in image.blobs.items()}
    table = run("images", "--containerd-sock", containerd.socket)
    assert table.returncode == 0
    assert "example.com/team/app:v1" in table.stdout
    assert "1 tags, 4 digests" in table.stdout


@pytest.mark.containerd
def test_unknown_namespace_is_empty_with_a_warning(containerd: PrivateContainerd) -> None:
    args = ("--containerd-sock", containerd.socket, "--containerd-namespace", "nosuch")
    result = run("images", "--json", *args)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tags"] == {} and data["digests"] == []
    assert any("'nosuch' does not exist" in w for w in data["warnings"])
    table = run("images", *args)
    assert table.returncode == 0
    assert "warning:" in table.stderr and "'nosuch' does not exist" in table.stderr


@pytest.mark.containerd
def test_environment_twin_sets_the_socket(containerd: PrivateContainerd) -> None:
    env = {**os.environ, "SPEGELD_CONTAINERD_SOCK": str(containerd.socket)}
    result = subprocess.run(
        [*SPEGELD, "images", "--json"], capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["namespace"] == "k8s.io"
