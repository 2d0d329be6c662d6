"""Run Spegel v0.7.4 (``spegel registry``) beside a private containerd, for the benchmarks.

Benchmark-only: Spegel cannot be built on CI (the Go module proxy refuses
``github.com/spegel-org/spegel``), so nothing in the test suite uses this module.
The binary comes from ``scripts/build-components --print-path spegel``.

What running Spegel off Kubernetes, on loopback, takes (read from v0.7.4's ``main.go`` and
``pkg/``; facts only, no code copied):

* ``KUBERNETES_SERVICE_HOST`` must be unset: with it set, Spegel's preflight refuses any
  distro but Distroless.
* Bootstrap: ``--bootstrap-kind=static`` with ``--static-bootstrap-peers`` in libp2p's form
  ``/ip4/H/tcp/P/p2p/<peer id>``: the peer id is required. Node 1 starts with an empty list
  (it waits for someone to dial it); its id is read from its ``starting p2p router`` log line,
  and node 2 bootstraps from it. HTTP bootstrap is no use here: the address it serves comes from
  the libp2p host's own addresses, from which Spegel filters every loopback address.
* Every node must listen on the *same registry port*: a peer found in the DHT is dialled at
  its IP and the asking node's own registry port (``PeerMetadata.RegistryPort``).
* Spegel advertises a blob only when containerd labelled it
  ``containerd.io/distribution.source.<registry>=<repository>`` (a pull does; ``ctr images
  import`` does not). :func:`label_sources` adds that label, as a pull would have.
* Spegel drops every loopback address from what its libp2p host advertises, so a peer
  found through the DHT on ``127.0.0.x`` comes with no address and every proxied request
  fails with ``empty list of address ports``. The benchmark therefore enters a private
  network namespace of its own (:func:`enter_private_netns`: ``unshare(CLONE_NEWNET)``,
  gone when its last process exits) and gives its ``lo`` two non-loopback addresses,
  :data:`NODE_ADDRS`. Traffic between them still goes through ``lo``, so it costs what
  ``127.0.0.x`` costs, and nothing touches the host's network.
* Readiness: ``GET /readyz`` on the registry address is 200 only once the DHT routing table
  has a peer, so a lone node is never ready.
* Spegel mirrors requests with ``?ns=<registry>`` (containerd's mirror form), like spegeld.

``bench/rolling_pull.py`` runs one Spegel per node of ``spegeld_harness.Cluster`` instead:
inside the node's network namespace (``netns=``), on the node's own bridge address (not
loopback, so no private namespace is needed there), with every HTTP request made by curl
from inside that namespace, and containerd's hosts.toml written by ``spegel configuration``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from spegeld_harness import Cluster, PrivateContainerd

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build-components"
VERSION = "v0.7.4"
# Spegel's own default (``--mirror-resolve-timeout``), set explicitly so the report says it.
RESOLVE_TIMEOUT = "20ms"
# Spegel's default (``--mirror-resolve-retries``): peers tried before a 404.
RESOLVE_RETRIES = 3
# Start-up (containerd connect, DHT bootstrap) takes well under a second on loopback; the
# bootstrap retry backs off to 10 s, so allow a few rounds of it.
READY_TIMEOUT = 45.0
# SIGTERM gives Spegel's HTTP servers up to 30 s to drain; the benchmark's connections are
# all closed by then, so a few seconds is plenty before SIGKILL.
STOP_TIMEOUT = 10.0
SOURCE_LABEL = "containerd.io/distribution.source."
# Spegel's two nodes, on the private namespace's lo: not loopback addresses to libp2p (see
# the module docstring), and never routed anywhere (the namespace has no other interface).
NODE_ADDRS = ("10.253.0.2", "10.253.0.3")
# On a cluster node every port is free (its namespace is its own): Spegel's defaults.
CLUSTER_PORTS = {"registry": 5000, "router": 5001, "metrics": 9090}
CLONE_NEWNET = 0x40000000  # <sched.h>; os.unshare arrives only in Python 3.12


def enter_private_netns(addresses: tuple[str, ...] = NODE_ADDRS) -> None:
    """Move this process (and every child it starts from now on) into a new network
    namespace with ``lo`` up, ``127.0.0.0/8`` on it as usual, plus ``addresses``.
    Call before starting any thread: ``unshare`` moves the calling thread only."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise SystemExit(f"unshare(CLONE_NEWNET) failed: {os.strerror(errno)} (needs root)")
    commands = [["ip", "link", "set", "lo", "up"]]
    commands += [["ip", "addr", "add", f"{a}/32", "dev", "lo"] for a in addresses]
    for argv in commands:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def component_path(name: str) -> tuple[Path | None, str]:
    """``scripts/build-components --print-path name``: the directory, or why not."""
    try:
        result = subprocess.run(
            [str(BUILD), "--print-path", name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"scripts/build-components failed: {exc}"
    out = result.stdout.strip()
    if result.returncode == 0 and out:
        return Path(out), ""
    return None, (result.stderr or result.stdout).strip() or f"exit {result.returncode}"


def spegel_binary() -> tuple[Path | None, str]:
    """Spegel's binary, or why it is not there (not built, e.g. on CI)."""
    directory, why = component_path("spegel")
    if directory is None:
        return None, why
    binary = directory / "spegel"
    if not os.access(binary, os.X_OK):
        return None, f"{binary} is missing or not executable"
    return binary, ""


def common_free_port(hosts: list[str]) -> int:
    """A TCP port free on every host in ``hosts`` (Spegel needs one registry port for all)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((hosts[0], 0))
            port: int = s.getsockname()[1]
        try:
            for host in hosts[1:]:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise SystemExit(f"no TCP port free on all of {hosts} after 50 tries")


def label_sources(
    cd: PrivateContainerd, registry: str, repository: str, digests: list[str]
) -> None:
    """Label blobs with their distribution source, as a pull through CRI or ``ctr pull`` does:
    Spegel advertises only labelled content."""
    for digest in digests:
        cd.ctr("content", "label", digest, f"{SOURCE_LABEL}{registry}={repository}")


@dataclass
class SpegelNode:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    registry_addr: str
    router_addr: str
    metrics_addr: str
    argv: list[str]
    netns: str | None = None  # the node's network namespace (rolling_pull's cluster)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def peer_id(self, timeout: float = READY_TIMEOUT) -> str:
        """The libp2p peer id, from the ``starting p2p router`` log line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                if "starting p2p router" not in line:
                    continue
                try:
                    peer: str = json.loads(line)["id"]
                except (ValueError, KeyError, TypeError):
                    continue
                return peer
            if not self.alive():
                break
            time.sleep(0.05)
        raise SystemExit(f"{self.name}: no peer id in its log:\n{self.log_tail()}")

    def bootstrap_addr(self) -> str:
        host, _, port = self.router_addr.rpartition(":")
        return f"/ip4/{host}/tcp/{port}/p2p/{self.peer_id()}"

    def request(self, url: str, *, head: bool = False) -> tuple[int, str]:
        """Status and body of a GET (or HEAD) of ``url``; status 0 when it cannot connect.
        In a namespace, curl from inside it (the host cannot reach the node's address)."""
        if self.netns is None:
            req = urllib.request.Request(url, method="HEAD" if head else "GET")
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    return resp.status, resp.read().decode(errors="replace")
            except urllib.error.HTTPError as exc:
                return exc.code, ""
            except (urllib.error.URLError, OSError):
                return 0, ""
        argv = ["ip", "netns", "exec", self.netns, "curl", "--silent", "--noproxy", "*",
                "--max-time", "5", "--write-out", "\n%{http_code}"]  # fmt: skip
        if head:
            argv.append("--head")
        try:
            result = subprocess.run(
                [*argv, url], capture_output=True, text=True, timeout=15, check=False
            )
        except subprocess.TimeoutExpired:
            return 0, ""
        body, _, code = result.stdout.rpartition("\n")
        return (int(code) if code.isdigit() else 0), body

    def head(self, path: str) -> int:
        """HEAD ``path`` on this node's registry: the status (0: no connection)."""
        return self.request(f"http://{self.registry_addr}{path}", head=True)[0]

    def metric_sum(self, name: str, *label_values: str) -> float:
        """The sum of the samples of ``name`` whose labels contain every ``label_values``
        (e.g. ``'cache="hit"'``) in this node's /metrics; 0 if it cannot be read."""
        status, text = self.request(f"http://{self.metrics_addr}/metrics")
        total = 0.0
        if status != 200:
            return total
        for line in text.splitlines():
            if line.startswith(name) and all(v in line for v in label_values):
                try:
                    total += float(line.rsplit(" ", 1)[1])
                except (IndexError, ValueError):
                    continue
        return total

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Wait for ``/readyz`` 200 (a peer in the routing table); seconds waited."""
        t0 = time.monotonic()
        url = f"http://{self.registry_addr}/readyz"
        while True:
            if not self.alive():
                raise SystemExit(f"{self.name} exited during start-up:\n{self.log_tail()}")
            if self.request(url)[0] == 200:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise SystemExit(
                    f"{self.name} not ready at {url} after {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM by PID, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spegel_argv(
    binary: Path,
    cd: PrivateContainerd,
    *,
    registry_addr: str,
    router_addr: str,
    metrics_addr: str,
    data_dir: Path,
    mirrored: list[str],
    bootstrap: list[str],
    resolve_timeout: str = RESOLVE_TIMEOUT,
) -> list[str]:
    argv = [str(binary), "--log-level", "INFO", "registry"]
    argv += ["--containerd-sock", str(cd.socket), "--containerd-namespace", cd.namespace]
    argv += ["--containerd-content-path", str(cd.content_path)]
    argv += ["--registry-addr", registry_addr, "--router-addr", router_addr]
    argv += ["--metrics-addr", metrics_addr, "--data-dir", str(data_dir)]
    argv += ["--bootstrap-kind", "static"]
    if bootstrap:
        argv += ["--static-bootstrap-peers", *bootstrap]
    argv += ["--mirror-resolve-timeout", resolve_timeout]
    argv += ["--mirror-resolve-retries", str(RESOLVE_RETRIES)]
    if mirrored:
        argv += ["--mirrored-registries", *mirrored]
    return argv


def start_spegel(
    binary: Path,
    name: str,
    work: Path,
    cd: PrivateContainerd,
    host: str,
    registry_port: int,
    *,
    mirrored: list[str],
    bootstrap: list[str],
    netns: str | None = None,
    ports: tuple[int, int] | None = None,
    resolve_timeout: str = RESOLVE_TIMEOUT,
) -> SpegelNode:
    """Start ``spegel registry`` for one node on ``host`` (not waiting for readiness).

    ``netns``: run it inside that network namespace (``host`` is its address there), with
    ``ports`` (router, metrics), which this process cannot probe from outside."""
    if ports is None:
        router_port, metrics_port = common_free_port([host]), common_free_port([host])
    else:
        router_port, metrics_port = ports
    data_dir = work / f"{name}-data"
    data_dir.mkdir()
    registry_addr = f"{host}:{registry_port}"
    router_addr = f"{host}:{router_port}"
    metrics_addr = f"{host}:{metrics_port}"
    argv = spegel_argv(
        binary,
        cd,
        registry_addr=registry_addr,
        router_addr=router_addr,
        metrics_addr=metrics_addr,
        data_dir=data_dir,
        mirrored=mirrored,
        bootstrap=bootstrap,
        resolve_timeout=resolve_timeout,
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    log = work / f"{name}.log"
    # ip netns exec execs the program: the PID is Spegel's own, and stop() signals it.
    prefix = [] if netns is None else ["ip", "netns", "exec", netns]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return SpegelNode(name, proc, log, registry_addr, router_addr, metrics_addr, argv, netns)


def configure_hosts(binary: Path, hosts_dir: Path, registry: str, mirror: str) -> str:
    """``spegel configuration``: containerd's hosts.toml for ``registry`` under ``hosts_dir``,
    Spegel at ``mirror`` first, the registry itself as the fall-back server (Spegel's own
    template: ``dial_timeout = '200ms'``, tags resolved). The file's text."""
    argv = [str(binary), "configuration", "--containerd-registry-config-path", str(hosts_dir),
            "--mirrored-registries", registry, "--mirror-targets", mirror]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"spegel configuration failed: {result.stderr.strip()[-500:]}")
    host = registry.split("://", 1)[-1]
    return (hosts_dir / host / "hosts.toml").read_text()


def start_pair(
    binary: Path,
    work: Path,
    first: tuple[PrivateContainerd, str],
    second: tuple[PrivateContainerd, str],
    *,
    mirrored: list[str],
) -> tuple[SpegelNode, SpegelNode]:
    """Two Spegel nodes on one registry port: node 1 alone, node 2 bootstrapping from it.
    Returns once both answer ``/readyz``; stops what it started if that fails."""
    port = common_free_port([first[1], second[1]])
    started: list[SpegelNode] = []
    try:
        one = start_spegel(
            binary, "spegel-1", work, first[0], first[1], port, mirrored=mirrored, bootstrap=[]
        )
        started.append(one)
        two = start_spegel(
            binary,
            "spegel-2",
            work,
            second[0],
            second[1],
            port,
            mirrored=mirrored,
            bootstrap=[one.bootstrap_addr()],
        )
        started.append(two)
        two.wait_ready()
        one.wait_ready()
    except BaseException:
        for node in reversed(started):
            node.stop()
        raise
    return one, two


def start_on_cluster(
    binary: Path, cluster: Cluster, work: Path, *, resolve_timeout: str = RESOLVE_TIMEOUT
) -> list[SpegelNode]:
    """One Spegel per node of ``cluster`` (started without spegeld), inside the node's
    namespace on its bridge address, node 1 alone and every other node bootstrapping from
    it; each node's hosts.toml rewritten by ``spegel configuration`` to ask its own Spegel
    first. Returns once all answer ``/readyz``; stops what it started if that fails.

    No ``--mirrored-registries`` (the Helm chart's default, every registry): containerd
    drops the port from its ``distribution.source.<host>`` label (``10.231.0.1``), while
    the whitelist would hold ``10.231.0.1:5000``, so every layer would be filtered out.
    """
    upstream = f"http://{cluster.upstream_address}"
    ports = (CLUSTER_PORTS["router"], CLUSTER_PORTS["metrics"])
    started: list[SpegelNode] = []
    try:
        for node in cluster.nodes:
            bootstrap = [started[0].bootstrap_addr()] if started else []
            spegel = start_spegel(
                binary, f"spegel-{node.index}", work, node.containerd, node.address,
                CLUSTER_PORTS["registry"], mirrored=[], bootstrap=bootstrap, netns=node.netns,
                ports=ports, resolve_timeout=resolve_timeout,
            )  # fmt: skip
            started.append(spegel)
            cluster.track(spegel.pid)
            configure_hosts(binary, node.hosts_dir, upstream, f"http://{spegel.registry_addr}")
        for spegel in started:
            spegel.wait_ready()
    except BaseException:
        for spegel in reversed(started):
            spegel.stop()
        raise
    return started


def wait_findable(nodes: list[SpegelNode], reference: str, timeout: float = 60) -> None:
    """Until each node's Spegel answers 200 to a HEAD of the reference's tag (found in the
    DHT: the holder advertises the tag when its image is complete, after every blob).

    The tag only, where ``Cluster.wait_findable`` also asks for every blob: with v0.7.4 a
    HEAD of a blob made shortly before containerd's GET of it often turned that GET into a
    miss on a node with two providers ("waited too long for new peer with no inflight
    fetches", at a 20 ms and a 200 ms resolve timeout alike), sending the layer to the
    upstream. containerd itself HEADs only the manifest, so a blob HEAD is no real client's.
    """
    host, _, rest = reference.partition("/")
    repository, _, tag = rest.rpartition(":")
    path = f"/v2/{repository}/manifests/{tag}?ns={host}"
    deadline = time.monotonic() + timeout
    for node in nodes:
        while node.head(path) != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} does not find {reference} ({path})")
            time.sleep(0.1)
