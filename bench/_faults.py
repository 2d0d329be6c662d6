"""The soak's fault injector: a seeded plan, and the threads that carry it out.

Every process the injector stops or kills is one the harness started; every packet it
sends stays inside the cluster's namespaces (senders run with ``ip netns exec``). What it
changes it records (stopped PIDs, nft tables, helper processes), so that ``restore()``
can undo it all, on success, failure or Ctrl-C alike: SIGCONT before anything is killed.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spegeld_harness import Cluster, Node

AGENT = Path(__file__).with_name("_soak_agent.py")
REGISTRY_PORT = 5000  # the harness's (spegeld_harness._cluster.REGISTRY_PORT)
PEER_PORT = 5001  # where peers fetch from (spegeld_harness._netns.PEER_PORT, --peer-addr)
GOSSIP_PORT = 7946
CORRUPT_PROXY_PORT = 5999  # where nft redirects peers' connections to the corrupt node
START_ATTEMPTS = 3  # a daemon that cannot be restarted three times running is a finding
NODE_WAIT = 60.0  # seconds a planned fault waits for its node to be free before it is skipped
AGENT_GRACE = 20.0  # seconds past its own deadline before a helper is killed

# Faults that change a node's processes or its network: at most one at a time per node,
# so that each can be undone exactly. Traffic faults (flood, slowloris) overlap anything.
# The hostile set takes its target's lock too, so that each answer is the daemon's own
# (not a refusal because the injector had just killed it).
NODE_FAULTS = ("containerd-kill", "spegeld-kill", "spegeld-stop", "link-cut", "corrupt-peer")
TRAFFIC_FAULTS = ("udp-flood", "slowloris")
KINDS = (*NODE_FAULTS, "hostile-http", *TRAFFIC_FAULTS)
# Faults that cut a pull on their node by construction (its containerd or its mirror
# vanishes mid-transfer): such a pull may be retried, and the report says so.
CUTTING_FAULTS = ("containerd-kill", "spegeld-kill")

# (shortest, longest) seconds a fault lasts, full run and --quick.
DURATIONS = {
    "containerd-kill": ((0.5, 3.0), (1.0, 1.0)),
    "spegeld-kill": ((0.5, 3.0), (1.0, 1.0)),
    "spegeld-stop": ((2.0, 8.0), (3.0, 3.0)),  # containerd waits this long on its mirror
    "link-cut": ((3.0, 10.0), (4.0, 4.0)),
    "corrupt-peer": ((10.0, 30.0), (20.0, 20.0)),  # long enough to cover peer pulls
    "udp-flood": ((3.0, 8.0), (3.0, 3.0)),
    "slowloris": ((5.0, 15.0), (5.0, 5.0)),
    "hostile-http": ((0.0, 0.0), (0.0, 0.0)),  # one pass of the set, bounded by the agent
}
UDP_RATE = 1000  # datagrams/s: a noisy neighbour, and within what 2 shared cores can send
SLOW_CONNECTIONS = 300  # more than a per-source cap should allow, far under the global cap


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the injector starts
    kind: str
    node: int  # index in cluster.nodes: the node the fault is done to
    source: int  # for traffic faults, the node whose namespace sends it
    seconds: float


@dataclass
class Injected:
    kind: str
    node: str
    start: float  # time.monotonic()
    end: float  # math.inf while the fault is on
    detail: dict[str, Any] = field(default_factory=dict)


def plan(
    rng: random.Random, *, nodes: int, duration: float, quick: bool, corrupt_node: int
) -> list[Planned]:
    """The fault schedule: every kind at least once (shuffled), then random kinds."""
    kinds = list(KINDS)
    rng.shuffle(kinds)
    events: list[Planned] = []
    if quick:  # each kind once, spread over the run
        times = [3 + i * max(1.0, duration - 25) / len(kinds) for i in range(len(kinds))]
    else:
        times, t = [], 5.0
        while t < duration - 10 or len(times) < len(kinds):
            times.append(t)
            t += rng.uniform(4.0, 10.0)
        kinds += [rng.choice(KINDS) for _ in range(len(times) - len(kinds))]
    for at, kind in zip(times, kinds, strict=True):
        node = corrupt_node if kind == "corrupt-peer" else rng.randrange(nodes)
        if kind == "corrupt-peer" or nodes == 1:
            source = node
        else:
            source = rng.choice([i for i in range(nodes) if i != node])
        low, high = DURATIONS[kind][1 if quick else 0]
        events.append(Planned(round(at, 2), kind, node, source, round(rng.uniform(low, high), 2)))
    return events


class Daemons:
    """Every spegeld the soak runs: which exits the injector caused, which it did not."""

    def __init__(self, cluster: Cluster, say: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.say = say
        self.lock = threading.Lock()
        self.busy: set[str] = set()  # nodes whose spegeld is being killed or restarted
        self.caused: set[int] = set()  # PIDs the injector killed
        self.unexpected: list[dict[str, Any]] = []
        self.restart_failures: list[dict[str, Any]] = []
        self.pids: dict[str, list[int]] = {n.name: [] for n in cluster.nodes}
        for node in cluster.nodes:
            if node.spegeld is not None and node.spegeld.pid is not None:
                self.pids[node.name].append(node.spegeld.pid)

    def kill(self, node: Node) -> int | None:
        """SIGKILL (the injector's doing); the node stays busy until ``start``."""
        assert node.spegeld is not None
        with self.lock:
            self.busy.add(node.name)
            pid = node.spegeld.pid
            if pid is not None:
                self.caused.add(pid)
            node.spegeld.send_signal(signal.SIGCONT)
            node.spegeld.kill()
        return pid

    def start(self, node: Node) -> None:
        """Start the node's spegeld again (bounded attempts) and track its PID."""
        assert node.spegeld is not None
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    node.spegeld.start()
                except RuntimeError as exc:
                    self.restart_failures.append(
                        {"node": node.name, "attempt": attempt, "error": str(exc)[-3000:]}
                    )
                    self.say(f"  ! {node.name}: spegeld did not start: {str(exc)[:300]}")
                    continue
                self.cluster.track(node.spegeld.pid)
                if node.spegeld.pid is not None:
                    self.pids[node.name].append(node.spegeld.pid)
                return
        finally:
            with self.lock:
                self.busy.discard(node.name)

    def check(self) -> None:
        """Find spegeld exits nobody caused; record each with its log, and restart it."""
        for node in self.cluster.nodes:
            if node.spegeld is None:
                continue
            with self.lock:
                if node.name in self.busy:
                    continue
                code, pid = node.spegeld.poll(), node.spegeld.pid
                if code is None or pid is None:
                    continue
                self.busy.add(node.name)
            if pid not in self.caused:
                tail = node.spegeld.log_tail(40)
                self.unexpected.append(
                    {
                        "node": node.name,
                        "pid": pid,
                        "code": code,
                        "at": time.monotonic(),
                        "log_tail": tail,
                    }
                )
                self.say(f"  !! {node.name}: spegeld {pid} exited with {code}, not injected")
            node.spegeld.kill()  # reap it (it has exited already)
            self.start(node)


class Injector:
    def __init__(
        self,
        cluster: Cluster,
        daemons: Daemons,
        work: Path,
        say: Callable[[str], None],
        blob_path: Callable[[], str],
    ) -> None:
        self.cluster = cluster
        self.daemons = daemons
        self.work = work
        self.say = say
        self.blob_path = blob_path  # a blob of the image rolling out now (slow reads)
        self.stop = threading.Event()
        self.node_locks = {n.name: threading.Lock() for n in cluster.nodes}
        self.lock = threading.Lock()
        self.stopped: dict[int, Node] = {}  # SIGSTOPped spegeld PIDs
        self.tables: set[tuple[str, str, str]] = set()  # (netns, family, table)
        self.agents: dict[int, subprocess.Popen[str]] = {}
        self.injected: list[Injected] = []
        self.skipped: list[dict[str, Any]] = []
        self.agent_results: list[dict[str, Any]] = []
        self._threads: list[threading.Thread] = []

    # ---- running the plan -----------------------------------------------------------------

    def run(self, events: list[Planned], t0: float) -> None:
        for event in events:
            if self.stop.wait(max(0.0, t0 + event.at - time.monotonic())):
                return
            thread = threading.Thread(target=self._apply, args=(event,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _apply(self, event: Planned) -> None:
        node = self.cluster.nodes[event.node]
        source = self.cluster.nodes[event.source]
        apply = getattr(self, "_" + event.kind.replace("-", "_"))
        if event.kind in TRAFFIC_FAULTS:
            self._record(event.kind, node, apply, node, source, event.seconds)
            return
        lock = self.node_locks[node.name]
        if not lock.acquire(timeout=NODE_WAIT):
            self.skipped.append({"kind": event.kind, "node": node.name, "why": "node busy"})
            return
        try:
            if not self.stop.is_set():
                self._record(event.kind, node, apply, node, source, event.seconds)
        finally:
            lock.release()

    def _record(
        self, kind: str, node: Node, apply: Callable[..., dict[str, Any]], *args: Any
    ) -> None:
        entry = Injected(kind, node.name, time.monotonic(), math.inf)  # on until it ends
        with self.lock:
            self.injected.append(entry)
        try:
            entry.detail = apply(*args)
        except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as exc:
            entry.detail = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            self.say(f"  ! {kind} on {node.name}: {entry.detail['error'][:300]}")
        finally:
            entry.end = time.monotonic()
        detail = entry.detail
        self.say(f"  fault {kind:15} {node.name} {entry.end - entry.start:5.1f} s {_short(detail)}")

    def _hold(self, seconds: float) -> None:
        """Keep a fault on for ``seconds`` (cut short when the soak stops)."""
        self.stop.wait(seconds)

    # ---- node faults ------------------------------------------------------------------------

    def _containerd_kill(self, node: Node, _src: Node, seconds: float) -> dict[str, Any]:
        old = node.containerd.pid
        node.containerd.kill()
        self._hold(seconds)
        node.containerd.start()
        self.cluster.track(node.containerd.pid)
        return {"killed": old, "new": node.containerd.pid}

    def _spegeld_kill(self, node: Node, _src: Node, seconds: float) -> dict[str, Any]:
        old = self.daemons.kill(node)
        self._hold(seconds)
        self.daemons.start(node)
        return {"killed": old, "new": node.spegeld.pid if node.spegeld else None}

    def _spegeld_stop(self, node: Node, _src: Node, seconds: float) -> dict[str, Any]:
        assert node.spegeld is not None
        pid = node.spegeld.pid
        if pid is None:
            return {"error": "no spegeld running"}
        with self.lock:
            self.stopped[pid] = node
        node.spegeld.send_signal(signal.SIGSTOP)
        try:
            self._hold(seconds)
        finally:
            node.spegeld.send_signal(signal.SIGCONT)
            with self.lock:
                self.stopped.pop(pid, None)
        return {"pid": pid}

    def _link_cut(self, node: Node, _src: Node, seconds: float) -> dict[str, Any]:
        """Drop everything between the node and its peers (not the upstream): connects
        time out, as behind a silently dropping firewall."""
        peers = [n.address for n in self.cluster.nodes if n is not node]
        if not peers:
            return {"error": "no peers"}
        listed = ", ".join(peers)
        table = ("inet", "soak_cut")
        self._nft(
            node,
            table,
            f"""
table inet soak_cut {{
    chain input {{ type filter hook input priority 0; ip saddr {{ {listed} }} drop; }}
    chain output {{ type filter hook output priority 0; ip daddr {{ {listed} }} drop; }}
}}
""",
        )
        try:
            self._hold(seconds)
        finally:
            self._nft_delete(node, table)
        return {"peers": len(peers)}

    def _corrupt_peer(self, node: Node, _src: Node, seconds: float) -> dict[str, Any]:
        """Peers' connections to this node's peer listener go through a proxy that flips a
        byte in every response body (the signed requests pass through unchanged); this
        node's own containerd still reaches its mirror directly."""
        target = f"{node.address}:{PEER_PORT}"
        proc = self._agent(
            node,
            [
                "corrupt-proxy",
                "--listen",
                str(CORRUPT_PROXY_PORT),
                "--target",
                target,
                "--duration",
                str(seconds + 1),
            ],
        )
        time.sleep(0.5)  # the proxy binds at once; give the interpreter time to get there
        table = ("ip", "soak_corrupt")
        self._nft(
            node,
            table,
            f"""
table ip soak_corrupt {{
    chain prerouting {{
        type nat hook prerouting priority dstnat;
        iifname "eth0" tcp dport {PEER_PORT} redirect to :{CORRUPT_PROXY_PORT}
    }}
}}
""",
        )
        try:
            self._hold(seconds)
        finally:
            self._nft_delete(node, table)
        return self._agent_result(proc)

    # ---- traffic faults ---------------------------------------------------------------------

    def _udp_flood(self, node: Node, src: Node, seconds: float) -> dict[str, Any]:
        proc = self._agent(
            src,
            [
                "udp-flood",
                "--target",
                f"{node.address}:{GOSSIP_PORT}",
                "--rate",
                str(UDP_RATE),
                "--seed",
                str(int(seconds * 1000)),
                "--duration",
                str(seconds),
            ],
        )
        return {"from": src.name, **self._agent_result(proc)}

    def _slowloris(self, node: Node, src: Node, seconds: float) -> dict[str, Any]:
        proc = self._agent(
            src,
            [
                "slowloris",
                "--target",
                f"{node.address}:{REGISTRY_PORT}",
                "--connections",
                str(SLOW_CONNECTIONS),
                "--path",
                self.blob_path(),
                "--duration",
                str(seconds),
            ],
        )
        return {"from": src.name, **self._agent_result(proc)}

    def _hostile_http(self, node: Node, src: Node, _seconds: float) -> dict[str, Any]:
        blob = self.blob_path().split("/blobs/", 1)[1].split("?", 1)[0]
        proc = self._agent(
            src,
            [
                "hostile",
                "--target",
                f"{node.address}:{REGISTRY_PORT}",
                "--ns",
                self.cluster.upstream_address,
                "--blob",
                blob,
            ],
        )
        return {"from": src.name, **self._agent_result(proc)}

    # ---- helpers ----------------------------------------------------------------------------

    def _agent(self, node: Node, args: list[str]) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", node.netns, sys.executable, str(AGENT), *args]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.cluster.track(proc.pid)
        with self.lock:
            self.agents[proc.pid] = proc
        return proc

    def _agent_result(self, proc: subprocess.Popen[str]) -> dict[str, Any]:
        try:
            out, err = proc.communicate(timeout=self._agent_budget())
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        with self.lock:
            self.agents.pop(proc.pid, None)
        if proc.returncode != 0:
            return {"error": f"agent exited with {proc.returncode}: {err.strip()[-500:]}"}
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result.pop("pid", None)
        with self.lock:
            self.agent_results.append(result)
        return result

    def _agent_budget(self) -> float:
        longest = max(high for (_, high), _ in DURATIONS.values())
        return longest + AGENT_GRACE + 40  # the hostile set: 10 s per case, cases in parallel

    def _nft(self, node: Node, table: tuple[str, str], ruleset: str) -> None:
        self.cluster.network.nft(node.netns, ruleset)
        with self.lock:
            self.tables.add((node.netns, *table))

    def _nft_delete(self, node: Node, table: tuple[str, str]) -> None:
        subprocess.run(
            ["ip", "netns", "exec", node.netns, "nft", "delete", "table", *table],
            capture_output=True,
            timeout=30,
            check=False,
        )
        with self.lock:
            self.tables.discard((node.netns, *table))

    def faults_at(self, node: str, start: float, end: float) -> list[Injected]:
        """The faults done to ``node`` that overlap [start, end] (those still on included)."""
        with self.lock:
            return [
                f for f in self.injected if f.node == node and f.start <= end and f.end >= start
            ]

    # ---- undoing it all -------------------------------------------------------------------

    def restore(self, join_timeout: float = 60.0) -> list[str]:
        """Stop the plan, SIGCONT what is stopped, delete the nft tables, kill helpers.
        Idempotent; what it had to undo, for the report."""
        self.stop.set()
        undone: list[str] = []
        with self.lock:
            stopped = dict(self.stopped)
        for pid, node in stopped.items():
            if node.spegeld is not None:
                node.spegeld.send_signal(signal.SIGCONT)
            undone.append(f"SIGCONT {pid}")
        deadline = time.monotonic() + join_timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        with self.lock:
            tables, agents = set(self.tables), dict(self.agents)
        for netns, family, table in tables:
            subprocess.run(
                ["ip", "netns", "exec", netns, "nft", "delete", "table", family, table],
                capture_output=True,
                timeout=30,
                check=False,
            )
            undone.append(f"nft table {table} in {netns}")
        for pid, proc in agents.items():
            if proc.poll() is None:
                os.kill(pid, signal.SIGKILL)
                undone.append(f"helper {pid}")
            proc.wait(10)
        with self.lock:
            self.tables.clear()
            self.agents.clear()
        return undone


def _short(detail: dict[str, Any]) -> str:
    text = json.dumps({k: v for k, v in detail.items() if k != "answers"})
    return text if len(text) < 160 else text[:157] + "..."
