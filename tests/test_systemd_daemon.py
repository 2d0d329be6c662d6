"""`spegeld run` under a real sd_notify socket, a watchdog and an inherited listening socket.

The test plays systemd's part: it binds the AF_UNIX datagram socket named by
NOTIFY_SOCKET and reads what the daemon sends, sets WATCHDOG_USEC, sends SIGHUP and
SIGTERM by PID, and passes a listening TCP socket as fd 3 with LISTEN_FDS/LISTEN_PID.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spegeld_harness import PrivateContainerd, SpegeldProcess, write_cluster_key

pytestmark = [pytest.mark.containerd]

WATCHDOG_USEC = 600_000  # pings expected every 0.3 s


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout: float) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields:
                return self.messages[-1]
        raise AssertionError(f"no {key} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def log_messages(node: SpegeldProcess) -> list[str]:
    found = []
    for line in node.log_path.read_text().splitlines():
        try:
            found.append(json.loads(line)["msg"])
        except (ValueError, KeyError):
            continue
    return found


def test_ready_only_when_ready_watchdog_reload_and_stopping(
    tmp_path: Path, notify: NotifySocket
) -> None:
    containerd = PrivateContainerd(tmp_path / "containerd")
    config = tmp_path / "spegeld.toml"
    config.write_text('mirrored-registries = "docker.io"\n')
    node = SpegeldProcess(
        tmp_path / "node", containerd, key_file=write_cluster_key(tmp_path / "key"),
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC),
             "SPEGELD_CONFIG": str(config)},
    )  # fmt: skip
    try:
        # containerd is not up yet: the daemon runs, but is not ready, and must not say so.
        node.launch()
        deadline = time.monotonic() + 15
        while node.get_or_none("/healthz") != 200:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.05)
        assert node.get("/readyz")[0] == 503
        early = [m for _, m in notify.messages] + [notify.receive(1.5) or {}]
        assert not any("READY" in m for m in early), early
        assert node.get("/readyz")[0] == 503

        containerd.start()
        _, ready = notify.wait_for("READY", 20)
        assert node.get("/readyz")[0] == 200  # READY=1 means what it says
        assert "peers alive, coordinator" in ready["STATUS"]

        # The watchdog keeps its cadence from the trio loop.
        pings_from = time.monotonic()
        while time.monotonic() - pings_from < 3:
            notify.receive(0.5)
        pings = [t for t, m in notify.messages if "WATCHDOG" in m and t >= pings_from]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 7, pings  # every 0.3 s for 3 s
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1; the process lives on.
        config.write_text('mirrored-registries = "ghcr.io"\n')
        node.send_signal(signal.SIGHUP)
        _, reloading = notify.wait_for("RELOADING", 10)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY", 10)
        assert node.get("/healthz")[0] == 200
        messages = log_messages(node)
        assert any(m.startswith("reload: cluster key reloaded") for m in messages)
        assert "reload: mirrored_registries changed; restart spegeld to apply" in messages

        # SIGTERM: STOPPING=1, then exit 0.
        node.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", 10)
        assert node.wait(30) == 0
    finally:
        node.stop()
        containerd.close()


def test_socket_activation_serves_the_inherited_socket(
    tmp_path: Path, containerd: PrivateContainerd
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    class Activated(SpegeldProcess):
        def argv(self) -> list[str]:
            # systemd's contract: the socket at fd 3, LISTEN_PID naming the service itself
            # (exec keeps the PID, so the wrapper sets its own).
            wrapper = (
                "import os, sys; "
                f"os.dup2({listener.fileno()}, 3); os.close({listener.fileno()}); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
                "LISTEN_FDNAMES='registry'); "
                "os.execv(sys.argv[1], sys.argv[1:])"
            )
            return [sys.executable, "-c", wrapper, *super().argv()]

    node = Activated(tmp_path / "node", containerd, port=port)
    try:
        node.launch(pass_fds=[listener.fileno()])
        listener.close()  # only the daemon holds it now
        deadline = time.monotonic() + 15
        while node.get_or_none("/readyz") != 200:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.05)
        status = node.status()
        assert status["registry"] == [f"127.0.0.1:{port}"]
        assert f"registry mirror listening on 127.0.0.1:{port}" in log_messages(node)
        assert node.stop() == 0
    finally:
        node.stop()


def test_a_wrong_listen_pid_is_ignored_and_the_daemon_binds_its_own_port(
    tmp_path: Path, containerd: PrivateContainerd
) -> None:
    node = SpegeldProcess(
        tmp_path / "node", containerd,
        env={"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"},  # meant for another process
    )  # fmt: skip
    try:
        node.start()
        assert node.status()["registry"] == [f"127.0.0.1:{node.port}"]
    finally:
        node.stop()


def get_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_socket_activation_with_the_mirror_and_peer_sockets(
    tmp_path: Path, containerd: PrivateContainerd
) -> None:
    """systemd/spegeld.socket and spegeld-peer.socket, as systemd passes them: two fds named
    by their FileDescriptorName=. Each must land on its own listener: the mirror (status,
    no node signature) and the peer listener (pull API only, signed requests only)."""
    from tests.test_systemd_units import PEER_SOCKET, SOCKET, values

    (mirror_name,) = values(SOCKET, "FileDescriptorName")
    (peer_name,) = values(PEER_SOCKET, "FileDescriptorName")
    mirror_sock = socket.create_server(("127.0.0.1", 0))
    peer_sock = socket.create_server(("127.0.0.1", 0))
    mirror_port, peer_port = mirror_sock.getsockname()[1], peer_sock.getsockname()[1]
    fds = [mirror_sock.fileno(), peer_sock.fileno()]

    class Activated(SpegeldProcess):
        def argv(self) -> list[str]:
            # fds 3 and 4 in the units' order, named as systemd names them.
            wrapper = (
                "import os, sys; "
                f"os.dup2({fds[0]}, 3); os.dup2({fds[1]}, 4); "
                f"os.close({fds[0]}); os.close({fds[1]}); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', "
                f"LISTEN_FDNAMES='{mirror_name}:{peer_name}'); "
                "os.execv(sys.argv[1], sys.argv[1:])"
            )
            return [sys.executable, "-c", wrapper, *super().argv()]

    node = Activated(
        tmp_path / "node", containerd, port=mirror_port, peer_port=peer_port,
        key_file=write_cluster_key(tmp_path / "key"),
    )  # fmt: skip
    try:
        assert min(fds) > 4  # dup2 onto 3 and 4 must not clobber the sources
        node.launch(pass_fds=fds)
        mirror_sock.close()
        peer_sock.close()  # only the daemon holds the ports now
        deadline = time.monotonic() + 15
        while node.get_or_none("/readyz") != 200:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.05)
        assert node.status()["registry"] == [f"127.0.0.1:{mirror_port}"]
        assert node.get("/v2/")[0] == 200  # containerd's side: no signature needed

        assert get_status(peer_port, "/status") == 404  # never on the peer listener
        assert get_status(peer_port, "/metrics") == 404
        assert get_status(peer_port, "/v2/") == 401  # unsigned: not a node
        assert node.stop() == 0
    finally:
        node.stop()
