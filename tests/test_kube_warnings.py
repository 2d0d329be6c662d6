"""Issue 13 item 7: a kubeconfig that turns off the API server's authentication is said
once, at start, in words that say what it means and how to fix it.

The daemon runs for real (``spegeld run`` as a process, its JSON log read back); containerd
is not started, because the warnings come before anything else and a daemon without
containerd still serves ``/healthz``. ``spegeld doctor`` runs against a real TLS server on
loopback, with a certificate from a throwaway CA.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from spegeld_harness import PrivateContainerd, SpegeldProcess

from spegeld.kube import load_kubeconfig

INSECURE = "insecure-skip-tls-verify is true"
PLAIN_HTTP = "uses plain http"
START_TIMEOUT = 20.0  # a cold `python -m spegeld run` reaches /healthz in about 1 s here


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_kubeconfig(path: Path, cluster: dict[str, Any]) -> Path:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": cluster}],
        "users": [{"name": "spegeld", "user": {"token": "t0ken-not-a-secret-here"}}],
        "contexts": [{"name": "spegeld", "context": {"cluster": "lab", "user": "spegeld"}}],
        "current-context": "spegeld",
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)  # a looser mode draws its own warning, not the one tested here
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (the daemon's election just fails to connect)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clusters(ca: trustme.CA) -> dict[str, dict[str, Any]]:
    port = closed_port()
    return {
        "insecure": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True},
        "http": {"server": f"http://127.0.0.1:{port}"},
        "normal": {
            "server": f"https://127.0.0.1:{port}",
            "certificate-authority-data": ca_data(ca),
        },
    }


def ca_data(ca: trustme.CA) -> str:
    return base64.b64encode(ca.cert_pem.bytes()).decode("ascii")


# -- the loader ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["insecure", "http", "normal"])
def test_the_loader_warns_once_per_setting(
    kind: str, ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_kubeconfig(tmp_path / "kubeconfig", clusters(ca)[kind])
    with caplog.at_level(logging.WARNING, logger="spegeld.kube"):
        creds = load_kubeconfig(path)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == list(creds.warnings)
    if kind == "normal":
        assert lines == []
        return
    (line,) = lines
    assert line.startswith(f"kubeconfig {path}, cluster 'lab': ")
    assert "t0ken" not in line
    if kind == "insecure":
        assert INSECURE in line
        assert "impersonate" in line  # what it means
        assert "remove insecure-skip-tls-verify" in line  # the fix
        assert "certificate-authority-data" in line
    else:
        assert PLAIN_HTTP in line
        assert "unencrypted" in line
        assert "https://" in line and "certificate-authority-data" in line


# -- the daemon ----------------------------------------------------------------------------


def log_records(node: SpegeldProcess) -> list[dict[str, Any]]:
    records = []
    for line in node.log_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a traceback would show in the assertion's log tail instead
    return records


@pytest.fixture(scope="module")
def daemon_logs(
    ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, list[dict[str, Any]]]]:
    """One real daemon per kubeconfig, started together, stopped once each is healthy."""
    base = tmp_path_factory.mktemp("kubewarn")
    containerd = PrivateContainerd(base / "containerd")  # never started: not needed here
    nodes = {}
    for kind, cluster in clusters(ca).items():
        kubeconfig = write_kubeconfig(base / f"{kind}.kubeconfig", cluster)
        nodes[kind] = SpegeldProcess(
            base / kind, containerd, extra_args=["--kubeconfig", str(kubeconfig)]
        )
    try:
        for node in nodes.values():
            node.launch()
        deadline = time.monotonic() + START_TIMEOUT
        for node in nodes.values():
            while node.get_or_none("/healthz") != 200:
                assert node.poll() is None, node.log_tail()
                assert time.monotonic() < deadline, node.log_tail()
                time.sleep(0.05)
        for node in nodes.values():
            assert node.stop() == 0, node.log_tail()
        yield {kind: log_records(node) for kind, node in nodes.items()}
    finally:
        for node in nodes.values():
            node.stop()
        containerd.close()


def kube_warnings(records: list[dict[str, Any]]) -> list[str]:
    return [
        r["msg"]
        for r in records
        if r.get("level") == "warning" and str(r.get("logger", "")).startswith("spegeld.kube")
    ]


def test_a_running_daemon_warns_exactly_once(daemon_logs: dict[str, list[dict[str, Any]]]) -> None:
    insecure = kube_warnings(daemon_logs["insecure"])
    plain = kube_warnings(daemon_logs["http"])
    assert len(insecure) == 1 and INSECURE in insecure[0], insecure
    assert len(plain) == 1 and PLAIN_HTTP in plain[0], plain
    # Nothing else repeats it (the election's retries, the runtime diagnosis, a reload).
    everything = {kind: [str(r.get("msg")) for r in log] for kind, log in daemon_logs.items()}
    assert sum(INSECURE in m for m in everything["insecure"]) == 1
    assert sum(PLAIN_HTTP in m for m in everything["http"]) == 1


def test_a_normal_kubeconfig_draws_no_warning(
    daemon_logs: dict[str, list[dict[str, Any]]],
) -> None:
    records = daemon_logs["normal"]
    assert records, "the daemon logged nothing at all"
    assert kube_warnings(records) == []
    assert not any(
        INSECURE in str(r.get("msg")) or PLAIN_HTTP in str(r.get("msg")) for r in records
    )


# -- doctor --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(ca: trustme.CA) -> Iterator[int]:
    """A TLS server on loopback that completes handshakes and then closes: enough for
    doctor's TLS step (the HTTP steps after it fail, which these tests do not look at)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def doctor_tls(kubeconfig: Path) -> tuple[dict[str, Any], str]:
    result = subprocess.run(
        [sys.executable, "-m", "spegeld", "doctor", "--only", "api", "--json", "--timeout", "2",
         "--kubeconfig", str(kubeconfig)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    report = json.loads(result.stdout)
    (tls,) = [c for c in report["checks"] if c["check"] == "api.tls"]
    return tls, result.stderr


def test_doctor_never_calls_an_unverified_certificate_verified(
    ca: trustme.CA, tls_server: int, tmp_path: Path
) -> None:
    server = f"https://127.0.0.1:{tls_server}"
    normal = write_kubeconfig(
        tmp_path / "normal",
        {"server": server, "certificate-authority-data": ca_data(ca)},
    )
    insecure = write_kubeconfig(
        tmp_path / "insecure", {"server": server, "insecure-skip-tls-verify": True}
    )
    tls, stderr = doctor_tls(normal)
    assert (tls["status"], tls["verdict"]) == ("ok", "certificate verified"), tls
    assert INSECURE not in stderr
    tls, stderr = doctor_tls(insecure)
    assert tls["status"] == "warn", tls
    assert "verification is OFF (insecure-skip-tls-verify)" in tls["verdict"], tls
    assert stderr.count(INSECURE) == 1, stderr  # the loader's line, with the fix


# -- a healthy API server ----------------------------------------------------------------


@pytest.mark.kubeapiserver
@pytest.mark.slow
def test_with_a_healthy_api_server_the_warning_is_still_said_once(tmp_path: Path) -> None:
    """The real kube-apiserver, a kubeconfig minted as deploy/README.md says, then switched
    to insecure-skip-tls-verify. Every API check passes except the unverified TLS, and the
    daemon's preflight must not say it a second time."""
    from tests.realkube._accounts import follow_readme
    from tests.realkube._apiserver import RealKubeApi

    api = RealKubeApi(tmp_path / "api")
    api.start()
    containerd = PrivateContainerd(tmp_path / "containerd")  # never started: not needed
    node = None
    try:
        minted = follow_readme(api, tmp_path / "readme")
        document = yaml.safe_load(minted.read_text())
        cluster = document["clusters"][0]["cluster"]
        del cluster["certificate-authority-data"]
        cluster["insecure-skip-tls-verify"] = True
        insecure = tmp_path / "insecure.kubeconfig"
        insecure.write_text(yaml.safe_dump(document))  # the README's token and context
        insecure.chmod(0o600)
        node = SpegeldProcess(
            tmp_path / "node", containerd, extra_args=["--kubeconfig", str(insecure)]
        )
        node.launch()
        deadline = time.monotonic() + START_TIMEOUT
        while not any(str(r.get("msg", "")).startswith("preflight") for r in log_records(node)):
            assert node.poll() is None, node.log_tail()
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.1)
        assert node.stop() == 0, node.log_tail()
        messages = [str(r.get("msg")) for r in log_records(node)]
        assert "preflight: Kubernetes API reachable; Lease permissions ok" in messages, messages
        assert sum("insecure-skip-tls-verify" in m for m in messages) == 1, messages
        assert len(kube_warnings(log_records(node))) == 1
    finally:
        if node is not None:
            node.stop()
        containerd.close()
        api.stop()
