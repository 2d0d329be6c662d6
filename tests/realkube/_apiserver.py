"""A real etcd + kube-apiserver (built by scripts/build-components), optionally in a netns.

``RealKubeApi`` starts etcd (data dir under the test's directory, client URL on a
loopback port) and kube-apiserver (TLS from ``_pki``, RBAC, a service-account signing
key, an admin client certificate in ``system:masters``), waits for ``/readyz`` with a
deadline, and stops both by PID. With ``netns`` both run inside that namespace (etcd on
the namespace's own loopback) and every kubectl call this class makes runs there too, so
both ends of each connection stay in namespaces the test created.

Only what the election and doctor need is on: no controller-manager (so nothing deletes
namespaces or mints ServiceAccount secrets), no cloud provider, no aggregated APIs.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml
from spegeld_harness import free_port

from tests._components import component_binary

from ._pki import Pki, make_pki

READY_TIMEOUT = 90.0  # measured 4-8 s to /readyz here on 2 busy cores; generous for CI
STOP_TIMEOUT = 15.0  # kube-apiserver drains for up to --shutdown-delay-duration (0 here)
KUBECTL_TIMEOUT = 60.0
UNREADY_TIMEOUT = 30.0  # etcd stopped: /readyz failed within 1.1 s here; generous for CI
SERVICE_RANGE = "10.96.0.0/24"  # required flag; no Service is created by these tests
ISSUER = "https://kubernetes.default.svc.cluster.local"  # what kubeadm sets
# The apiserver's own identity Lease (kube-system) would be renewed every 10 s and show in
# apiserver_request_total beside spegeld's; off, the Lease counters are spegeld's alone.
FEATURE_GATES = "APIServerIdentity=false,UnknownVersionInteroperabilityProxy=false"
# Every request a spegeld-namespace ServiceAccount makes (Lease calls, and the preflight's
# /readyz, /version and access reviews), one JSON line each, written as each ends:
# per-request records with the user, which apiserver_request_total cannot give.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:spegeld"]
  - level: None
"""
METHODS = {"get": "GET", "list": "GET", "watch": "GET", "create": "POST", "update": "PUT",
           "patch": "PATCH", "delete": "DELETE", "deletecollection": "DELETE"}  # fmt: skip


def _pid_rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _Child:
    """One long-running child, logging to a file, stopped by its PID."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._out: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=self._out, stdin=subprocess.DEVNULL
        )

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._out.close()

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


class RealKubeApi:
    """etcd + kube-apiserver at ``https://host:port``; call ``start()``, then ``stop()``."""

    def __init__(self, base: Path, host: str = "127.0.0.1", port: int | None = None, *,
                 netns: str | None = None) -> None:  # fmt: skip
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.netns = netns
        # Inside our own namespace the ports are ours; on the host's loopback, pick free ones.
        self.port = port or (6443 if netns else free_port(host))
        self.etcd_client = 2379 if netns else free_port("127.0.0.1")
        self.etcd_peer = 2380 if netns else free_port("127.0.0.1")
        self.pki: Pki = make_pki(base / "pki", [host])
        self.audit_policy = base / "audit-policy.yaml"
        self.audit_policy.write_text(AUDIT_POLICY)
        self.audit_log = base / "audit.jsonl"
        self.admin_kubeconfig = self._write_admin_kubeconfig(base / "admin.kubeconfig")
        self.etcd: _Child | None = None
        self.apiserver: _Child | None = None
        self.start_seconds = 0.0  # etcd start to apiserver /readyz, the last start()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_pem(self) -> str:
        return self.pki.ca_pem.read_text()

    def _prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def _write_admin_kubeconfig(self, path: Path) -> Path:
        def data(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "real", "cluster": {
                "server": self.url, "certificate-authority-data": data(self.pki.ca_pem)}}],
            "users": [{"name": "admin", "user": {
                "client-certificate-data": data(self.pki.admin_cert),
                "client-key-data": data(self.pki.admin_key)}}],
            "contexts": [{"name": "admin", "context": {"cluster": "real", "user": "admin"}}],
            "current-context": "admin",
        }  # fmt: skip
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        try:
            self._start_etcd()
            self.start_apiserver()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.etcd_client}"
        peer = f"http://127.0.0.1:{self.etcd_peer}"
        self.etcd = _Child([
            *self._prefix(), str(component_binary("etcd")), "--name", "default",
            "--data-dir", str(self.base / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"default={peer}",
            "--listen-metrics-urls", "",
            # A throwaway store: fsync buys nothing and costs seconds on a busy disk.
            "--unsafe-no-fsync", "--log-level", "warn",
        ], self.base / "etcd.log")  # fmt: skip

    def start_apiserver(self, *, expired_cert: bool = False) -> None:
        """(Re)start kube-apiserver on the running etcd; waits for /readyz unless expired."""
        if self.apiserver is not None:
            self.apiserver.stop()
        cert, key = (
            (self.pki.expired_cert, self.pki.expired_key) if expired_cert
            else (self.pki.serving_cert, self.pki.serving_key)
        )  # fmt: skip
        self.apiserver = _Child([
            *self._prefix(), str(component_binary("kube-apiserver")),
            "--etcd-servers", f"http://127.0.0.1:{self.etcd_client}",
            "--bind-address", self.host, "--advertise-address", self.host,
            "--secure-port", str(self.port),
            "--tls-cert-file", str(cert), "--tls-private-key-file", str(key),
            "--client-ca-file", str(self.pki.ca_pem),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", ISSUER,
            "--service-account-key-file", str(self.pki.sa_public),
            "--service-account-signing-key-file", str(self.pki.sa_private),
            "--service-cluster-ip-range", SERVICE_RANGE,
            # No kubernetes Service endpoints: a loopback address is not a valid endpoint.
            "--endpoint-reconciler-type", "none",
            "--feature-gates", FEATURE_GATES,
            "--cert-dir", str(self.base / "apiserver-certs"),
            "--profiling=false", "--shutdown-delay-duration", "0s",
            "--audit-policy-file", str(self.audit_policy),
            "--audit-log-path", str(self.audit_log), "--audit-log-format", "json",
        ], self.base / "apiserver.log")  # fmt: skip
        self.wait_ready(verify=not expired_cert)

    def wait_ready(self, *, verify: bool = True) -> None:
        """Until /readyz says ok: through kubectl as the admin, or (``verify=False``, for
        a certificate no client accepts) anonymously with curl -k, which /readyz allows."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            for child in (self.etcd, self.apiserver):
                if child is None or not child.running:
                    raise RuntimeError(f"{child and child.log.name} exited:\n"
                                       f"{child.tail() if child else ''}")  # fmt: skip
            if verify:
                done = self.kubectl_run("get", "--raw", "/readyz", timeout=10)
            else:
                done = subprocess.run(
                    [*self._prefix(), "curl", "-sk", "--max-time", "5", f"{self.url}/readyz"],
                    capture_output=True, text=True, timeout=10, check=False,
                )  # fmt: skip
            if done.returncode == 0 and done.stdout.strip() == "ok":
                return
            if time.monotonic() > deadline:
                assert self.apiserver is not None
                raise RuntimeError(f"kube-apiserver not ready after {READY_TIMEOUT} s:\n"
                                   f"{done.stderr}\n{self.apiserver.tail()}")  # fmt: skip
            time.sleep(0.2)

    @contextlib.contextmanager
    def etcd_stopped(self) -> Iterator[int]:
        """etcd frozen with SIGSTOP (its PID is yielded), then SIGCONT and /readyz again.

        ``ip netns exec`` execs its command, so the child's PID is etcd's own. The
        apiserver keeps running and answering; only its storage stops responding."""
        assert self.etcd is not None and self.etcd.running
        pid = self.etcd.proc.pid
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "etcd"
        os.kill(pid, signal.SIGSTOP)
        try:
            self._wait_etcd_failing()
            yield pid
        finally:
            os.kill(pid, signal.SIGCONT)
        self.wait_ready()

    def _wait_etcd_failing(self) -> None:
        """Until /readyz itself reports etcd failing: the apiserver keeps its last etcd
        verdict for up to about a second (measured), and a failing /readyz takes 4 s."""
        deadline = time.monotonic() + UNREADY_TIMEOUT
        while True:
            done = subprocess.run(
                [*self._prefix(), "curl", "-sk", "--max-time", "10", f"{self.url}/readyz"],
                capture_output=True, text=True, timeout=15, check=False,
            )  # fmt: skip
            if "[-]etcd failed" in done.stdout:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"/readyz still not failing on etcd: {done.stdout[-300:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        for child in (self.apiserver, self.etcd):
            if child is not None:
                child.stop()

    def rss_mib(self) -> dict[str, float]:
        return {name: _pid_rss_mib(child.proc.pid)
                for name, child in (("etcd", self.etcd), ("kube-apiserver", self.apiserver))
                if child is not None and child.running}  # fmt: skip

    # -- kubectl as the admin ------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment for kubectl (and shell snippets) as the admin."""
        kubectl_dir = component_binary("kubectl").parent
        return {**os.environ, "KUBECONFIG": str(self.admin_kubeconfig),
                "PATH": f"{kubectl_dir}:{os.environ.get('PATH', '')}"}  # fmt: skip

    def kubectl_run(self, *args: str, stdin: str | None = None,
                    timeout: float = KUBECTL_TIMEOUT) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            [*self._prefix(), str(component_binary("kubectl")), *args],
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
            env=self.env(),
        )  # fmt: skip

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        done = self.kubectl_run(*args, stdin=stdin)
        if done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def shell(self, script: str, cwd: Path) -> str:
        """Run a shell snippet (e.g. one from deploy/README.md) as the admin, in the netns."""
        done = subprocess.run(
            [*self._prefix(), "bash", "-euo", "pipefail", "-c", script], cwd=cwd,
            capture_output=True, text=True, timeout=KUBECTL_TIMEOUT, check=False, env=self.env(),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"shell snippet failed: {done.stderr.strip()}\n{script}")
        return done.stdout

    def requests(self) -> list[dict[str, Any]]:
        """Every request by a spegeld ServiceAccount so far, from the audit log: method,
        path, code, user, at (wall time)."""
        if not self.audit_log.exists():
            return []
        records = []
        for line in self.audit_log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written this instant
            received = datetime.datetime.fromisoformat(event["requestReceivedTimestamp"])
            verb = event["verb"]
            if "objectRef" not in event:  # a non-resource URL: the verb is the HTTP method's
                verb = {"post": "create", "put": "update"}.get(verb, verb)
            records.append({
                "method": METHODS.get(verb, verb.upper()),
                "path": event["requestURI"],
                "code": event.get("responseStatus", {}).get("code"),
                "user": event.get("user", {}).get("username"),
                "at": received.timestamp(),
            })  # fmt: skip
        return records

    def request_counts(self, resource: str = "leases") -> dict[tuple[str, str], float]:
        """``apiserver_request_total`` for ``resource``, summed by (verb, code)."""
        counts: dict[tuple[str, str], float] = {}
        for line in self.kubectl("get", "--raw", "/metrics").splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels_text, _, value = line.partition("} ")
            labels = dict(
                part.split("=", 1) for part in labels_text.removeprefix(
                    "apiserver_request_total{").split(",") if "=" in part
            )  # fmt: skip
            if labels.get("resource", "").strip('"') != resource:
                continue
            key = (labels["verb"].strip('"'), labels["code"].strip('"'))
            counts[key] = counts.get(key, 0.0) + float(value)
        return counts
