"""The listener flags (issue 13): defaults, validation, and how socket activation's named
sockets map to the three listeners."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from spegeld_harness import free_port

from spegeld.cli.run import node_config, run, split_inherited
from spegeld.config import NodeConfig
from spegeld.errors import ConfigError
from spegeld.mirror._server import beyond_loopback
from spegeld.netaddr import wildcard_host
from spegeld.systemd import InheritedSocket


def config_of(*args: str) -> NodeConfig:
    ctx = run.make_context("run", ["--insecure-gossip", *args])
    return node_config(**ctx.params)


def test_the_mirror_is_loopback_and_peers_get_5001_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("SPEGELD_REGISTRY_ADDR", "SPEGELD_PEER_ADDR", "SPEGELD_METRICS_ADDR"):
        monkeypatch.delenv(name, raising=False)
    cfg = config_of()
    assert (cfg.mirror_host, cfg.mirror_port) == ("127.0.0.1", 5000)
    # An empty host: every address, dual-stack "::" where the kernel has IPv6.
    assert (cfg.peer_host, cfg.peer_port) == (wildcard_host(), 5001)
    assert cfg.metrics_host is None


def test_listener_flags_are_parsed() -> None:
    cfg = config_of("--peer-addr", "10.0.0.5:6001", "--metrics-addr", ":9090")
    assert (cfg.peer_host, cfg.peer_port) == ("10.0.0.5", 6001)
    assert (cfg.metrics_host, cfg.metrics_port) == (wildcard_host(), 9090)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--peer-addr", ":0", "peers need a fixed port"),
        ("--peer-addr", "nope", "is not HOST:PORT"),
        ("--metrics-addr", "1.2.3.4:99999", "is not HOST:PORT"),
    ],
)
def test_bad_listener_flags_are_config_errors(flag: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_of(flag, value)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened = [socket.socket() for _ in range(4)]
    yield opened
    for sock in opened:
        sock.close()


def test_passed_sockets_go_to_the_listener_their_name_says(sockets: list[socket.socket]) -> None:
    names = ["registry", "peer", "metrics", "spegeld.socket"]
    passed = [
        InheritedSocket(name, trio.socket.from_stdlib_socket(sock))
        for name, sock in zip(names, sockets, strict=True)
    ]
    found = split_inherited(passed)
    assert [s.name for s in found["mirror"]] == ["registry", "spegeld.socket"]
    assert [s.name for s in found["peer"]] == ["peer"]
    assert [s.name for s in found["metrics"]] == ["metrics"]


def test_a_taken_peer_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mirror = f"127.0.0.1:{free_port('127.0.0.1')}"
        result = subprocess.run(
            [sys.executable, "-m", "spegeld", "run", "--registry-addr", mirror,
             "--peer-addr", f"127.0.0.1:{port}", "--containerd-sock", str(tmp_path / "none.sock"),
             "--log-format", "text", "--insecure-gossip",
             "--gossip-addr", f"127.0.0.1:{free_port('127.0.0.1', socket.SOCK_DGRAM)}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"the peer listener cannot listen on 127.0.0.1:{port}" in result.stderr


def test_a_mirror_beyond_loopback_is_what_the_start_warning_names() -> None:
    """The daemon warns when the unauthenticated mirror listens beyond loopback (an
    upgraded node whose config still says 0.0.0.0:5000): these are the addresses named."""
    assert beyond_loopback([("127.0.0.1", 5000), ("127.9.9.9", 1), ("::1", 5000)]) == []
    assert beyond_loopback([("0.0.0.0", 5000), ("127.0.0.1", 5000)]) == [("0.0.0.0", 5000)]
    assert beyond_loopback([("::", 5000), ("fe80::1%eth0", 5000)]) == [
        ("::", 5000),
        ("fe80::1%eth0", 5000),
    ]
