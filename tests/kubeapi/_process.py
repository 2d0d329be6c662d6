"""The test API server as a child process (optionally inside a network namespace).

Shared by the doctor's namespace tests, the multi-daemon election tests and
bench/election.py. Stopped by its PID.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
LEASE_VERBS = ("get", "create", "update")


def service_account_jwt(name: str, expires: float, namespace: str = "spegeld") -> str:
    """A token shaped like a ServiceAccount's; the server only compares the string."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    claims = {"sub": f"system:serviceaccount:{namespace}:{name}", "exp": int(expires)}
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def lease_account(name: str, token: str, verbs: tuple[str, ...] = LEASE_VERBS) -> dict[str, Any]:
    return {
        "user": f"system:serviceaccount:spegeld:{name}",
        "token": token,
        "grants": [{"resource": "leases", "namespace": "spegeld", "verbs": list(verbs)}],
    }


def write_kubeconfig(path: Path, server: str, ca_pem: str, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem.encode()).decode()}}],
        "users": [{"name": "spegeld", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "spegeld"}}],
        "current-context": "test",
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class KubeApiProcess:
    """``python -m tests.kubeapi`` with the given accounts, ready when constructed."""

    def __init__(
        self,
        state_dir: Path,
        host: str,
        port: int,
        accounts: list[dict[str, Any]],
        *extra: str,
        netns: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True)
        config = state_dir / "config.json"
        config.write_text(json.dumps({
            "namespaces": ["default", "kube-system", "spegeld"], "accounts": accounts}))  # fmt: skip
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self._log = (state_dir / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.kubeapi", "--listen", f"{host}:{port}",
             "--state-dir", str(state_dir), "--config", str(config), *extra],
            cwd=REPO, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not (state_dir / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError((state_dir / "server.log").read_text())
            time.sleep(0.05)
        self.url = (state_dir / "ready").read_text().strip()
        self.ca_pem = (state_dir / "ca.pem").read_text()

    def kubeconfig(self, path: Path, token: str) -> Path:
        return write_kubeconfig(path, self.url, self.ca_pem, token)

    def requests(self) -> list[dict[str, Any]]:
        """Every request handled so far: method, path, code, user, at (wall time)."""
        path = self.state_dir / "requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
