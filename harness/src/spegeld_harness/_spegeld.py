"""A real ``spegeld run`` process per simulated node, stopped by its PID.

Plain synchronous code, like the rest of the harness. The daemon logs JSON
lines to ``<base_dir>/spegeld.log``; readiness is ``GET /readyz`` answering 200.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spegeld_harness._containerd import PrivateContainerd
from spegeld_harness._process import ManagedProcess


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    """A port free on ``host`` right now (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def host_port(host: str, port: int) -> str:
    """``127.0.0.1:5000``, or ``[fd00::1]:5000`` for an IPv6 host (as URLs write it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_cluster_key(path: Path) -> Path:
    """A fresh gossip key file, readable by its owner only."""
    path.write_text(f"1:{base64.b64encode(secrets.token_bytes(32)).decode()}\n")
    path.chmod(0o600)
    return path


class SpegeldProcess(ManagedProcess):
    """``spegeld run`` against ``containerd``: its mirror on ``host:port``, its peer listener
    on ``host:peer_port`` (what other nodes fetch from), gossip on ``gossip_port``."""

    kind = "spegeld"
    log_banner = False  # the log is JSON lines
    log_tail_lines = 40
    # Each probe is an HTTP request (a curl process in a namespace): don't spin.
    probe_first_delay = 0.05
    probe_max_delay = 0.05

    def __init__(
        self,
        base_dir: Path,
        containerd: PrivateContainerd,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 15.0,
        gossip_port: int | None = None,
        peer_port: int | None = None,
        key_file: Path | None = None,
        peers: Sequence[str] = (),
        env: dict[str, str] | None = None,
        stop_timeout: float = 15.0,
    ) -> None:
        super().__init__(ready_timeout=ready_timeout, stop_timeout=stop_timeout)
        self.base_dir = base_dir
        self.env = env  # extra environment (NOTIFY_SOCKET, SPEGELD_CONFIG, ...)
        self.containerd = containerd
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_args = list(extra_args)
        self.gossip_port = gossip_port or free_port(host, socket.SOCK_DGRAM)
        self.peer_port = peer_port or free_port(host)
        self.key_file = key_file
        self.peers = list(peers)

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)

    @property
    def peer_address(self) -> str:
        """Where other nodes fetch from (``--peer-addr``; ``--static-peer`` names this)."""
        return host_port(self.host, self.peer_port)

    @property
    def gossip_address(self) -> str:
        return host_port(self.host, self.gossip_port)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "spegeld.log"

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "spegeld", "run",
            "--node-name", self.base_dir.name,
            "--containerd-sock", str(self.containerd.socket),
            "--containerd-content-path", str(self.containerd.content_path),
            "--registry-addr", self.address,
            "--peer-addr", self.peer_address,
            "--advertise-addr", self.host,
            "--state-dir", str(self.base_dir / "state"),
            "--log-format", "json",
            "--log-level", "debug",
            *self._gossip_args(),
            *self.extra_args,
        ]  # fmt: skip

    def _gossip_args(self) -> list[str]:
        if "--static-peer" in self.extra_args:
            return []
        args = ["--gossip-addr", self.gossip_address]
        args += (
            ["--cluster-key-file", str(self.key_file)] if self.key_file else ["--insecure-gossip"]
        )
        for peer in self.peers:
            args += ["--peer", peer]
        return args

    # -- lifecycle (the rest is ManagedProcess) ---------------------------------------------

    def _prepare(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)

    def _spawn_env(self) -> dict[str, str] | None:
        return {**os.environ, **self.env} if self.env else None

    def _label(self) -> str:
        return f"spegeld at {self.url}"

    def _probe(self) -> str | None:
        """Ready when ``GET /readyz`` answers 200."""
        try:
            status = self.get("/readyz")[0]
        except OSError as e:
            return f"GET /readyz: {type(e).__name__}: {e}"
        return None if status == 200 else f"GET /readyz -> {status}"

    def get(
        self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()

    def get_or_none(self, path: str) -> int | None:
        """The status code of ``GET path``, or None when nothing answers yet."""
        try:
            return self.get(path)[0]
        except OSError:
            return None

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/status")[2])
        return result

    def metric(self, sample: str) -> float:
        """The value of one exposition line, e.g. ``spegeld_bytes_served_total{source="peer"}``."""
        for line in self.get("/metrics")[2].decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
        return 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, pid={self.pid})"
