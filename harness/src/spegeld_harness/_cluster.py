"""A real cluster on one machine: N nodes, each in its own network namespace on a bridge.

Every node has its own containerd and its own ``spegeld run``; the mirror is set up with
``spegeld configure containerd`` and gossip is authenticated with a generated key. The
upstream is a Distribution registry (``docker-registry``) in a namespace of its own,
behind a ``tc tbf`` rate limit on its link (100 Mbit/s by default): the slow "internet".

Shared by ``spegeld demo``, the tests and ``bench/rolling_pull.py``. Plain synchronous
code, like the rest of the harness.

Cleanup: ``close()`` stops every process it started (by PID), deletes the namespaces and
the temporary directory. A cluster records what it creates in a state file under
``STATE_DIR`` as it goes, so a run that crashed (or was killed) leaves a record, and the
next :class:`Cluster` cleans those leftovers up before it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from spegeld_harness._containerd import HarnessUnavailable
from spegeld_harness._images import BuiltImage
from spegeld_harness._netns import NetnsContainerd, NetnsSpegeld, Network, run
from spegeld_harness._registry import UpstreamRegistry
from spegeld_harness._spegeld import write_cluster_key

STATE_DIR = Path("/run/spegeld-harness")  # tmpfs: emptied by a reboot, like namespaces
REGISTRY_PORT = 5000
GOSSIP_PORT = 7946
UPSTREAM_PORT = 5000
NAMESPACE_PREFIX = "spgc"

# command → the Debian package that provides it
TOOLS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "nft": "nftables",
    "curl": "curl",
    "containerd": "containerd",
    "ctr": "containerd",
    "docker-registry": "docker-registry",
}


def missing_requirement(containerd_bin_dir: Path | None = None) -> str | None:
    """One line naming what is missing to build a cluster here, or None.

    ``containerd_bin_dir``: the nodes run that directory's containerd and ctr (a 2.x
    build), so those two must be there instead of on PATH.
    """
    if os.geteuid() != 0:
        return "a cluster needs root (network namespaces, tc, containerd): run it as root"
    tools = dict(TOOLS)
    if containerd_bin_dir is not None:
        del tools["containerd"], tools["ctr"]
        absent = [b for b in ("containerd", "ctr") if not (containerd_bin_dir / b).is_file()]
        if absent:
            return (f"{' and '.join(absent)} not found in {containerd_bin_dir}: "
                    "run scripts/build-components containerd")  # fmt: skip
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing:
        return f"missing tools: apt-get install -y {' '.join(missing)}"
    return None


@dataclass(frozen=True)
class PullResult:
    node: str
    reference: str
    seconds: float
    from_peers: int  # bytes this node's mirror served from peers during the pull
    # Blob bytes the upstream served while the pull ran: pulls that overlap in time
    # share the count (measure a phase as a whole for concurrent pulls).
    from_upstream: int


@dataclass
class Node:
    index: int
    name: str
    netns: str
    address: str
    containerd: NetnsContainerd
    spegeld: NetnsSpegeld | None  # None in a baseline cluster: containerd only
    hosts_dir: Path

    def metric(self, sample: str) -> float:
        """A sample from this node's /metrics; 0 without a running spegeld."""
        if self.spegeld is None or self.spegeld.pid is None:
            return 0.0
        return self.spegeld.metric(sample)


@dataclass
class Cluster:
    """``with Cluster(nodes=3) as cluster:`` builds it; leaving the block tears it down."""

    nodes_wanted: int = 3
    upstream_rate: str = "100mbit"  # tc tbf rate on the upstream's link
    node_rate: str | None = None  # the same on every node's link (slow peers, for fault runs)
    with_spegeld: bool = True  # False: the baseline, containerd pulls straight upstream
    subnet: str = "10.231.0"  # a /24 that exists only inside the namespaces
    base_dir: Path | None = None
    keep: bool = False  # leave everything up at close() (the demo's --keep)
    # Every node runs this directory's containerd and ctr (e.g. the 2.3 that
    # scripts/build-components builds); None: Debian's 1.6 from PATH.
    containerd_bin_dir: Path | None = None
    # More `spegeld run` arguments for every node (e.g. ``("--tag-quorum", "1")`` where a
    # test pulls a tag from a single holder with the upstream stopped).
    spegeld_args: Sequence[str] = ()
    progress: Callable[[str], None] = field(default=lambda message: None)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes_wanted <= 200:
            raise ValueError("a cluster has 1 to 200 nodes")
        self._owns_dir = self.base_dir is None
        self.base = self.base_dir or Path(tempfile.mkdtemp(prefix="spegeld-cluster-"))
        self.network = Network(self.nodes_wanted + 1, self.subnet, prefix=NAMESPACE_PREFIX)
        self.upstream: UpstreamRegistry | None = None
        self._state = STATE_DIR / f"{os.getpid()}-{self.network.bridge}.json"
        self._pids: list[int] = []
        # Nodes start in a thread pool, and each records its PIDs: one writer at a time,
        # or two threads race on the same temporary file.
        self._record_lock = threading.RLock()

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close(force=True)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(force=exc is not None)

    @property
    def containerd_version(self) -> str:
        """The nodes' containerd version, e.g. ``"1.6.20"`` or ``"2.3.7"``."""
        if not self.nodes:
            raise RuntimeError("the cluster has no nodes yet: start() it first")
        return self.nodes[0].containerd.version

    @property
    def upstream_address(self) -> str:
        return f"{self.network.address(0)}:{UPSTREAM_PORT}"

    def start(self) -> None:
        problem = missing_requirement(self.containerd_bin_dir)
        if problem is not None:
            raise HarnessUnavailable(problem)
        clean_leftovers()
        self._record()
        self.progress(f"network: bridge and {self.nodes_wanted + 1} namespaces")
        self.network.create()
        self._record()
        upstream_ns = self.network.nodes[0]
        self.upstream = UpstreamRegistry(
            self.base / "upstream", host=self.network.address(0), port=UPSTREAM_PORT,
            netns=upstream_ns,
        )  # fmt: skip
        self.upstream.start()
        self._track(self.upstream.pid)
        limit_rate(upstream_ns, self.upstream_rate)
        self.progress(f"upstream: Distribution registry at {self.upstream_address}, "
                      f"link limited to {self.upstream_rate}")  # fmt: skip
        key = write_cluster_key(self.base / "cluster.key")
        if self.node_rate is not None:
            for netns in self.network.nodes[1:]:
                limit_rate(netns, self.node_rate)
        for i, netns in enumerate(self.network.nodes[1:], start=1):
            self.nodes.append(self._node(i, netns, key))
        with ThreadPoolExecutor(max_workers=min(8, len(self.nodes))) as pool:
            for started in [pool.submit(n.containerd.start) for n in self.nodes]:
                started.result()
            for node in self.nodes:
                self._track(node.containerd.pid)
            if self.with_spegeld:
                for done in [pool.submit(self._start_spegeld, n) for n in self.nodes]:
                    done.result()
        mode = ", gossiping" if self.with_spegeld else " (baseline: no spegeld)"
        self.progress(f"{len(self.nodes)} nodes up on containerd {self.containerd_version}{mode}")

    def _node(self, i: int, netns: str, key: Path) -> Node:
        address = self.network.address(i)
        name = f"node-{i}"
        containerd = NetnsContainerd(
            self.base / f"{name}-containerd", netns, bin_dir=self.containerd_bin_dir
        )
        hosts_dir = self.base / f"{name}-certs.d"
        spegeld = None
        if self.with_spegeld:
            seed = f"{self.network.address(1)}:{GOSSIP_PORT}"
            spegeld = NetnsSpegeld(
                netns, self.base / name, containerd, host=address, port=REGISTRY_PORT,
                gossip_port=GOSSIP_PORT, key_file=key, peers=[] if i == 1 else [seed],
                ready_timeout=60, extra_args=list(self.spegeld_args),
            )  # fmt: skip
            subprocess.run(
                [sys.executable, "-m", "spegeld", "configure", "containerd",
                 "--config-path", str(hosts_dir), "--mirror-target", f"http://{address}:{REGISTRY_PORT}",
                 "--mirrored-registries", f"http://{self.upstream_address}"],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
        else:
            # No mirror: the upstream itself, over plain HTTP. containerd 1.6 ignores a
            # hosts.toml without a [host] table ("invalid `host` tree") and tries HTTPS.
            upstream = f"http://{self.upstream_address}"
            registry_dir = hosts_dir / self.upstream_address
            registry_dir.mkdir(parents=True)
            (registry_dir / "hosts.toml").write_text(
                f'server = "{upstream}"\n\n'
                f'[host."{upstream}"]\n  capabilities = ["pull", "resolve"]\n'
            )
        return Node(i, name, netns, address, containerd, spegeld, hosts_dir)

    def _start_spegeld(self, node: Node) -> None:
        assert node.spegeld is not None
        node.spegeld.start()
        self._track(node.spegeld.pid)

    def close(self, *, force: bool = False) -> None:
        """Stop everything; with ``keep`` (and no failure), leave the cluster running."""
        if self.keep and not force:
            self._record()  # marked kept: only `spegeld demo --clean` tears it down
            for node in self.nodes:
                if node.spegeld is not None:
                    node.spegeld.detach()
                node.containerd.detach()
            if self.upstream is not None:
                self.upstream.detach()
            return
        for node in self.nodes:
            if node.spegeld is not None:
                node.spegeld.stop()
        for node in self.nodes:
            node.containerd.close()
        if self.upstream is not None:
            self.upstream.close()
        try:
            self.network.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._state.unlink()
            if self._owns_dir:
                shutil.rmtree(self.base, ignore_errors=True)

    # ---- the state file: what a crashed run leaves for the next one to clean -------------

    def track(self, pid: int | None) -> None:
        """Record a process started on the cluster's behalf (a restarted daemon, a fault
        injector's helper), so that the next run cleans it up if this one crashes."""
        self._track(pid)

    def _track(self, pid: int | None) -> None:
        if pid is not None:
            with self._record_lock:
                self._pids.append(pid)
                self._record()

    def _record(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = {
            "owner": os.getpid(),
            "owner_start": _start_time(os.getpid()),
            "namespaces": [self.network.bridge, *self.network.nodes],
            "processes": [[pid, _start_time(pid)] for pid in self._pids],
            "dir": str(self.base) if self._owns_dir else None,
            "kept": self.keep,
        }
        with self._record_lock:
            tmp = self._state.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self._state)

    # ---- using it -------------------------------------------------------------------------

    def push(self, image: BuiltImage, repository: str, tag: str) -> str:
        """Put ``image`` in the upstream; the reference nodes pull it by."""
        assert self.upstream is not None
        self.upstream.push(image, repository, tag)
        return f"{self.upstream_address}/{repository}:{tag}"

    def pull(self, node: Node, reference: str) -> PullResult:
        """``ctr images pull`` on ``node`` (inside its namespace), through its hosts.toml."""
        assert self.upstream is not None
        log_mark = self.upstream.log_position()
        peers_before = node.metric('spegeld_bytes_served_total{source="peer"}')
        started = time.monotonic()
        node.containerd.ctr("images", "pull", "--hosts-dir", str(node.hosts_dir), reference,
                            timeout=1800)  # fmt: skip
        seconds = time.monotonic() - started
        return PullResult(
            node=node.name,
            reference=reference,
            seconds=seconds,
            from_peers=int(node.metric('spegeld_bytes_served_total{source="peer"}') - peers_before),
            from_upstream=self.upstream.blob_bytes_served(log_mark),
        )

    def wait_findable(
        self, reference: str, image: BuiltImage, nodes: Sequence[Node], timeout: float = 30
    ) -> None:
        """Until each of ``nodes``' mirrors finds the image's top object, config and every
        layer by digest (locally or at a peer): gossip has spread the holders' keys.

        By digest, not the tag: a node answers a tag from peers only when ``--tag-quorum``
        holders agree (default 2), so with one holder the tag rightly goes to the upstream
        while every byte still comes from the peer.

        Every blob, not just the last layer: containerd 2.x announces each blob as it lands
        (a /content/create event per blob, in the order the parallel downloads finish), so
        its keys spread one by one; 1.6 announces the whole image when the pull ends.
        """
        repository = reference.split("/", 1)[1].rsplit(":", 1)[0]
        platform = image.platforms[0]
        ns = f"?ns={self.upstream_address}"
        paths = [f"/v2/{repository}/manifests/{image.digest}{ns}"] + [
            f"/v2/{repository}/blobs/{digest}{ns}" for digest in (platform.config, *platform.layers)
        ]
        deadline = time.monotonic() + timeout
        for node in nodes:
            if node.spegeld is None:
                continue
            for path in paths:
                while node.spegeld.get(path, method="HEAD")[0] != 200:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{node.name} does not find {reference} at any peer ({path})"
                        )
                    time.sleep(0.1)

    def describe(self) -> list[dict[str, Any]]:
        """How to poke at each node by hand (for ``spegeld demo --keep``)."""
        return [
            {
                "node": n.name,
                "netns": n.netns,
                "address": n.address,
                "registry": f"http://{n.address}:{REGISTRY_PORT}" if n.spegeld else None,
                "containerd": str(n.containerd.socket),
                "hosts_dir": str(n.hosts_dir),
            }
            for n in self.nodes
        ]


def limit_rate(netns: str, rate: str) -> None:
    """Shape what leaves ``netns`` through eth0 to ``rate`` (a token bucket, as a WAN link)."""
    run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "eth0", "root",
         "tbf", "rate", rate, "burst", "256kb", "latency", "400ms"])  # fmt: skip


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), or None.

    A PID plus its start time names one process for good: a PID the kernel has reused
    for another process has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def clean_leftovers(state_dir: Path = STATE_DIR, *, include_kept: bool = False) -> list[str]:
    """Tear down what crashed clusters recorded (and, with ``include_kept``, the ones
    ``spegeld demo --keep`` left running); what was cleaned, for the log."""
    cleaned: list[str] = []
    if not state_dir.is_dir():
        return cleaned
    for state_file in sorted(state_dir.glob("*.json")):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        owner = state.get("owner")
        if isinstance(owner, int) and _start_time(owner) == state.get("owner_start"):
            continue  # its cluster is still running
        if state.get("kept") and not include_kept:
            continue
        for pid, started in state.get("processes", []):
            if _start_time(pid) == started and started is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)  # a fault run may have left it stopped
                    os.kill(pid, signal.SIGKILL)
                    cleaned.append(f"process {pid}")
        existing = set(run(["ip", "netns", "list"]).split())
        for name in state.get("namespaces", []):
            if name in existing and name.startswith(NAMESPACE_PREFIX):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30,
                               check=False)  # fmt: skip
                cleaned.append(f"namespace {name}")
        directory = state.get("dir")
        if directory and Path(directory).name.startswith("spegeld-cluster-"):
            shutil.rmtree(directory, ignore_errors=True)
        state_file.unlink(missing_ok=True)
    return cleaned


__all__ = [
    "Cluster",
    "Node",
    "PullResult",
    "clean_leftovers",
    "missing_requirement",
]
