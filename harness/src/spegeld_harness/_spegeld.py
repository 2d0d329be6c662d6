"""A real ``spegeld run`` process per simulated node, stopped by its PID.

Plain synchronous code, like the rest of the harness. The daemon logs JSON
lines to ``<base_dir>/spegeld.log``; readiness is ``GET /readyz`` answering 200.
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from spegeld_harness._containerd import PrivateContainerd

_LIVE: set[SpegeldProcess] = set()


@atexit.register
def _stop_all() -> None:
    for node in list(_LIVE):
        node.stop()


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    """A port free on ``host`` right now (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def write_cluster_key(path: Path) -> Path:
    """A fresh gossip key file, readable by its owner only."""
    path.write_text(f"1:{base64.b64encode(secrets.token_bytes(32)).decode()}\n")
    path.chmod(0o600)
    return path


class SpegeldProcess:
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
        key_file: Path | None = None,
        peers: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.env = env  # extra environment (NOTIFY_SOCKET, SPEGELD_CONFIG, ...)
        self.containerd = containerd
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.gossip_port = gossip_port or free_port(host, socket.SOCK_DGRAM)
        self.key_file = key_file
        self.peers = list(peers)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def gossip_address(self) -> str:
        return f"{self.host}:{self.gossip_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "spegeld.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "spegeld", "run",
            "--node-name", self.base_dir.name,
            "--containerd-sock", str(self.containerd.socket),
            "--containerd-content-path", str(self.containerd.content_path),
            "--registry-addr", self.address,
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

    def launch(self, *, pass_fds: Sequence[int] = ()) -> Self:
        """Start the process without waiting for it to be ready."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env} if self.env else None
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env=env, pass_fds=tuple(pass_fds),
            )  # fmt: skip
        _LIVE.add(self)
        return self

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; its exit code."""
        assert self._proc is not None
        code = self._proc.wait(timeout)
        self._proc = None
        _LIVE.discard(self)
        return code

    def detach(self) -> None:
        """Leave the process running after this interpreter exits (``spegeld demo --keep``)."""
        self._proc = None
        _LIVE.discard(self)

    def poll(self) -> int | None:
        """The exit code if the process has ended on its own (or by a signal), else None."""
        return self._proc.poll() if self._proc is not None else None

    def send_signal(self, signum: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def start(self) -> Self:
        self.launch()
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"spegeld exited with {self._proc.returncode}\n{self.log_tail()}"
                )
            try:
                if self.get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"spegeld not ready at {self.url}\n{self.log_tail()}")
            time.sleep(0.05)

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

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by PID, SIGKILL after ``timeout``; the exit code."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.send_signal(signal.SIGCONT)  # a stopped daemon must see the SIGTERM
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            return proc.returncode
        finally:
            self._proc = None
            _LIVE.discard(self)

    def kill(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            self._proc = None
            _LIVE.discard(self)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
