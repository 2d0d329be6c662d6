"""``spegeld run`` as a process: readiness, containerd coming and going, signals, bad flags."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from spegeld_harness import PrivateContainerd, SpegeldProcess, build_image, free_port

pytestmark = pytest.mark.containerd


def wait_status(node: SpegeldProcess, path: str, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if node.get(path)[0] == want:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{path} never answered {want}"
        time.sleep(0.05)


def test_ready_only_once_containerd_is_synced_and_survives_restarts(tmp_path: Path) -> None:
    containerd = PrivateContainerd(tmp_path / "containerd")
    node = SpegeldProcess(tmp_path / "node", containerd)
    log_path = tmp_path / "spegeld.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(node.argv(), stderr=log, start_new_session=True)
    try:
        wait_status(node, "/healthz", 200, 10)
        assert node.get("/readyz")[0] == 503, "not ready without containerd"
        assert proc.poll() is None, "containerd being down must not end the daemon"
        containerd.start()
        wait_status(node, "/readyz", 200, 10)
        image = build_image("example.com/team/app:v1", [1000], seed=71)
        containerd.import_image(image.write_oci_archive(tmp_path / "app.tar"))
        layer = image.platforms[0].layers[0]
        wait_status(node, f"/v2/team/app/blobs/{layer}", 200, 5)
        containerd.kill()
        containerd.start()
        assert node.get(f"/v2/team/app/blobs/{layer}")[0] == 200, "served from the content dir"
        containerd.remove_image(image.name)
        wait_status(node, "/v2/team/app/manifests/v1?ns=example.com", 404, 10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        text = log_path.read_text()
        assert "Traceback" not in text
        assert "containerd is back" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        containerd.close()


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--registry-addr", "nope", "is not HOST:PORT"),
        ("--registry-addr", "1.2.3.4:99999", "is not HOST:PORT"),
        ("--static-peer", "x", "is not HOST:PORT"),
        ("--grace-period", "-1", "grace-period"),
        ("--peer", "nope", "is not HOST:PORT"),
        ("--gossip-addr", "1.2.3.4", "is not HOST:PORT"),
        ("--gossip-addr", "127.0.0.1:0", "needs a fixed port"),
    ],
)
def test_bad_flags_are_one_line_errors(flag: str, value: str, needle: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spegeld", "run", flag, value],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert needle in result.stderr


def test_gossip_without_a_key_is_refused_plainly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "spegeld", "run", "--containerd-sock", str(tmp_path / "none.sock")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "gossip needs a cluster key" in result.stderr
    key = tmp_path / "key"
    key.write_text("1:short\n")
    bad = subprocess.run(
        [sys.executable, "-m", "spegeld", "run", "--cluster-key-file", str(key)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert str(key) in bad.stderr and "short" not in bad.stderr.replace(str(key), "")


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "spegeld", "run", "--registry-addr", f"127.0.0.1:{port}",
             "--containerd-sock", str(tmp_path / "none.sock"), "--log-format", "text",
             "--insecure-gossip", "--gossip-addr", f"127.0.0.1:{free_port('127.0.0.1')}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
