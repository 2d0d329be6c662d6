"""Benchmark the coordinator election's load on the Kubernetes API, against DESIGN §11.

Run from the repository root (no root needed; loopback only)::

    .venv/bin/python bench/election.py                   # N = 5, 20, 50; 30 s windows
    .venv/bin/python bench/election.py --quick           # smoke run: N = 5, 10 s windows

A real etcd + kube-apiserver (tests/realkube, built by scripts/build-components; on
127.0.0.1, RBAC from deploy/rbac.yaml, one ServiceAccount and TokenRequest token per node)
is the ground truth: Lease requests are counted by the apiserver's own
``apiserver_request_total`` (GET /metrics as the admin, before and after each window),
and its audit log gives each request's user (how many nodes called). For each N, N
nodes run in this one trio process: for each node the daemon's
real election and gossip code, without containerd and the mirror (the election uses
neither). A node is a ``GossipCore`` + ``GossipRouter`` on its own loopback address
(127.0.0.20 upwards) with a real UDP socket and a shared cluster key, node 0 being the
others' seed, plus ``spegeld.app.Coordination`` (preflight, ``Elector``, ``KubeClient``)
with its own ServiceAccount kubeconfig. Each round has a Lease of its own.

A round starts all N nodes, waits until exactly one leads, every other node's gossip
names it as a live coordinator and gossip has every member; it then waits ``--settle``
seconds and counts the requests during a ``--window`` of steady state: Lease requests
per second cluster-wide from ``apiserver_request_total``, by method and by caller from
the audit log.

Modes, same code, same setup, one after the other for each N:

* ``spegeld``: the daemon as shipped; followers stay quiet while gossip shows a live
  coordinator.
* ``polling``, the anchor: Spegel's old election was client-go's, where every
  follower reads the lock every retry period whatever else it knows. Reproduced by
  blinding each follower's elector to gossip: its router tells the election GONE unless
  this node itself leads (the core's "read every retry period until the record
  expires" rule, which is client-go's follower loop), while gossip itself runs
  normally. Timings are the same as spegeld's (client-go's 15 s / 10 s / 2 s).
  client-go adds up to 1.2x jitter to the retry period, which would make the anchor
  about 1/1.6 of this; the O(N) shape is the same.

After the spegeld window a node joins with no gossip seed at all, as a fresh node with
only a kubeconfig does: its preflight, its Lease reads (the Lease names the coordinator,
its gossip seed) and the time until gossip shows it the coordinator, over ``--join-window``
seconds (longer than the 15 s lease duration, so a second read would show).

The verdict fits requests/s against N by least squares and extrapolates to N = 1000,
the target's cluster size: ≤ 1 req/s there meets the target. CPU columns are this
process (all N nodes) and the API server (kube-apiserver + etcd), in % of one core over
the window.

Options: ``--sizes 5,20,50``, ``--window S``, ``--settle S``, ``--join-window S``,
``--timeout S`` (bound on each convergence wait), ``--modes spegeld,polling``,
``--log-level``, ``--quick``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import resource
import secrets
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the real-apiserver launcher lives in tests.realkube

from spegeld_harness import free_port  # noqa: E402

from spegeld.app import Coordination  # noqa: E402
from spegeld.config import ContainerdConfig, LeaseSettings, NodeConfig  # noqa: E402
from spegeld.gossip import (  # noqa: E402
    CoordinatorChanged,
    GossipConfig,
    GossipCore,
    GossipEvent,
    GossipRouter,
    Keyring,
)
from spegeld.kube import load_kubeconfig  # noqa: E402
from spegeld.metrics import MetricsRegistry  # noqa: E402
from spegeld.routing import CoordinatorView  # noqa: E402
from tests.kubeapi._process import write_kubeconfig  # noqa: E402
from tests.realkube._accounts import follow_readme  # noqa: E402
from tests.realkube._apiserver import RealKubeApi  # noqa: E402

TARGET_RPS = 1.0  # DESIGN §11, cluster-wide, at N = 1000
TARGET_N = 1000
RETRY_PERIOD = 2.0  # client-go's default, spegeld's too: the anchor's polling period
HOST_BASE = 20  # nodes on 127.0.0.20, .21, ...
MIRROR_PORT = 5000  # published in the Lease only; nothing listens
POLL = 0.1
JOINER = "joiner"
LEASE_PREFIX = "/apis/coordination.k8s.io/v1/namespaces/spegeld/leases/"


View = tuple[CoordinatorView, str | None]


def _blinded(view: View, own: str) -> View:
    """GONE, unless this node leads: what a client-go follower knows of the coordinator."""
    if view == (CoordinatorView.ALIVE, own):
        return view
    return CoordinatorView.GONE, None


class BlindRouter(GossipRouter):
    """Gossip as usual, but the election hears GONE unless this node leads."""

    def __init__(self, core: GossipCore, bind: tuple[str, int]) -> None:
        super().__init__(core, bind, None)
        self._own = core.config.node

    def coordinator_view(self) -> View:
        return _blinded(super().coordinator_view(), self._own)

    def subscribe(self, listener: Callable[[GossipEvent], object]) -> None:
        def blinded(event: GossipEvent) -> None:
            if isinstance(event, CoordinatorChanged):
                event = CoordinatorChanged(*_blinded((event.view, event.node), self._own))
            listener(event)

        super().subscribe(blinded)


@dataclass
class Node:
    name: str
    core: GossipCore
    coordination: Coordination

    def leads(self) -> bool:
        elector = self.coordination.elector
        return elector is not None and elector.is_leader()

    def sees(self, leader: str) -> bool:
        # the core's own view, even under a BlindRouter: did gossip spread the flag?
        return self.core.coordinator_view() == (CoordinatorView.ALIVE, leader)


@dataclass
class Round:
    n: int
    mode: str
    converge_s: float = 0.0
    start_requests: int = 0  # from the first start until converged
    start_election: int = 0  # of which the electors made (the rest is the preflight)
    window_s: float = 0.0
    methods: Counter[str] = field(default_factory=Counter)
    callers: int = 0
    elector_count: int = 0  # the same window, as the electors counted their own requests
    non_lease: int = 0
    lease_metric: dict[str, float] = field(default_factory=dict)  # apiserver_request_total
    metric_window_s: float = 0.0  # between the midpoints of the two /metrics scrapes
    cpu_self: float = 0.0
    cpu_server: float = 0.0
    join: dict[str, Any] | None = None

    @property
    def total(self) -> int:
        return sum(self.methods.values())

    def rate(self, method: str | None = None) -> float:
        """Lease requests per second in the window, as apiserver_request_total counted."""
        metric = self.lease_metric
        count = sum(metric.values()) if method is None else metric.get(method, 0.0)
        return count / self.metric_window_s if self.metric_window_s else 0.0


class Bench:
    def __init__(self, base: Path, max_nodes: int, args: argparse.Namespace) -> None:
        self.base = base
        self.args = args
        self.keyring = Keyring([(1, secrets.token_bytes(32))])
        names = [f"node-{i}" for i in range(max_nodes)] + [JOINER]
        self.api = RealKubeApi(base / "api")
        self.api.start()
        print(f"etcd + kube-apiserver ready in {self.api.start_seconds:.1f} s; RSS MiB "
              f"{ {k: round(v) for k, v in self.api.rss_mib().items()} }", flush=True)  # fmt: skip
        follow_readme(self.api, base / "readme")  # the namespace, Role and RoleBinding
        # One ServiceAccount per node (so the audit log tells callers apart), all bound
        # to deploy/rbac.yaml's Role.
        self.api.kubectl("apply", "-f", "-", stdin="\n---\n".join(
            [f"apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: spegeld}}"
             for name in names]
            + ["apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n"
               "metadata: {name: bench-nodes, namespace: spegeld}\n"
               "roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: spegeld-leases}\n"
               "subjects:\n" + "".join(
                   f"- {{kind: ServiceAccount, name: {name}, namespace: spegeld}}\n"
                   for name in names)]))  # fmt: skip
        self.kubeconfigs = {
            name: write_kubeconfig(
                base / f"kubeconfig-{name}", self.api.url, self.api.ca_pem,
                self.api.kubectl("-n", "spegeld", "create", "token", name).strip(),
            )
            for name in names
        }  # fmt: skip
        self._round = 0

    def requests(self, start: float, end: float) -> list[dict[str, Any]]:
        return [r for r in self.api.requests() if start <= r["at"] < end]

    async def lease_counts(self) -> dict[str, float]:
        """apiserver_request_total for Leases, by verb (kubectl in a thread: trio runs on)."""
        counts = await trio.to_thread.run_sync(self.api.request_counts)
        by_verb: dict[str, float] = {}
        for (verb, _code), value in counts.items():
            by_verb[verb] = by_verb.get(verb, 0.0) + value
        return by_verb

    def server_cpu(self) -> float:
        total = 0.0
        for child in (self.api.apiserver, self.api.etcd):
            assert child is not None
            fields = Path(f"/proc/{child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def make_node(
        self, name: str, host: str, seeds: tuple[tuple[str, int], ...], lease: str, blind: bool
    ) -> tuple[Node, GossipRouter]:
        port = free_port(host, socket.SOCK_DGRAM)
        core = GossipCore(
            GossipConfig(
                node=name,
                addr=(host, port),
                mirror=f"{host}:{MIRROR_PORT}",
                incarnation=int(time.time()),
                seeds=seeds,
            ),
            self.keyring,
            random.Random(),
            trio.current_time(),
        )
        router = BlindRouter(core, (host, port)) if blind else GossipRouter(core, (host, port))
        kubeconfig = self.kubeconfigs[name]
        cfg = NodeConfig(
            node_name=name,
            containerd=ContainerdConfig(),
            mirror_host=host,
            mirror_port=MIRROR_PORT,
            advertise_addr=host,
            mirrored_registries=frozenset(),
            resolve_tags=False,
            static_peers=(),
            state_dir=self.base / "state" / name,
            gossip_host=host,
            gossip_port=port,
            lease=LeaseSettings(kubeconfig=kubeconfig, name=lease),
        )
        coordination = Coordination(cfg, load_kubeconfig(kubeconfig), router, MetricsRegistry())
        return Node(name, core, coordination), router

    async def run_round(self, n: int, mode: str) -> Round:
        self._round += 1
        lease = f"bench-{self._round}-n{n}-{mode}"
        result = Round(n, mode)
        blind = mode == "polling"
        nodes: list[Node] = []
        first = time.time()
        async with trio.open_nursery() as nursery:
            seeds: tuple[tuple[str, int], ...] = ()
            for i in range(n):
                node, router = self.make_node(
                    f"node-{i}", f"127.0.0.{HOST_BASE + i}", seeds, lease, blind
                )
                await nursery.start(router.run)
                await nursery.start(node.coordination.run)
                nodes.append(node)
                seeds = seeds or (node.core.config.addr,)
            leader = await self.converge(nodes, first)
            converged = time.time()
            result.converge_s = converged - first
            result.start_election = _elector_requests(nodes)
            await trio.sleep(self.args.settle)
            scrape0 = time.time()
            metric0 = await self.lease_counts()
            scrape0 = (scrape0 + time.time()) / 2
            start, cpu0, server0 = time.time(), _self_cpu(), self.server_cpu()
            counted = _elector_requests(nodes)
            await trio.sleep(self.args.window)
            end, cpu1, server1 = time.time(), _self_cpu(), self.server_cpu()
            scrape1 = time.time()
            metric1 = await self.lease_counts()
            result.metric_window_s = (scrape1 + time.time()) / 2 - scrape0
            result.lease_metric = {
                verb: metric1[verb] - metric0.get(verb, 0.0) for verb in metric1
            }  # fmt: skip
            result.elector_count = _elector_requests(nodes) - counted
            result.window_s = end - start
            result.cpu_self = 100 * (cpu1 - cpu0) / result.window_s
            result.cpu_server = 100 * (server1 - server0) / result.window_s
            if sum(node.leads() for node in nodes) != 1 or not leader.leads():
                raise RuntimeError(f"N = {n}, {mode}: leadership changed during the window")
            await trio.sleep(0.5)  # let the server log the window's last answers
            window = self.requests(start, end)
            result.start_requests = len(self.requests(first, converged))
            result.methods = Counter(
                r["method"] for r in window if r["path"].startswith(LEASE_PREFIX)
            )
            result.callers = len({r["user"] for r in window})
            result.non_lease = sum(not r["path"].startswith(LEASE_PREFIX) for r in window)
            if mode == "spegeld" and self.args.join_window > 0:
                result.join = await self.join(nursery, nodes, leader, lease)
            async with trio.open_nursery() as releases:
                for node in nodes:
                    releases.start_soon(node.coordination.release)
            nursery.cancel_scope.cancel()
        return result

    async def converge(self, nodes: list[Node], first: float) -> Node:
        """One leader, named by every other node's gossip, and full gossip membership."""
        with trio.move_on_after(self.args.timeout):
            while True:
                leaders = [node for node in nodes if node.leads()]
                if len(leaders) == 1 and all(
                    node is leaders[0]
                    or (node.sees(leaders[0].name) and node.core.alive_count() == len(nodes) - 1)
                    for node in nodes
                ):
                    return leaders[0]
                await trio.sleep(POLL)
        raise RuntimeError(
            f"N = {len(nodes)}: no converged election after {self.args.timeout:g} s "
            f"(leaders: {[node.name for node in nodes if node.leads()]}, "
            f"{time.time() - first:.0f} s since start)"
        )

    async def join(
        self,
        nursery: trio.Nursery,
        nodes: list[Node],
        leader: Node,
        lease: str,
    ) -> dict[str, Any]:
        """A node with no gossip seed joins: what it asks the API, and how fast it finds us."""
        host = f"127.0.0.{HOST_BASE + len(nodes)}"
        start = time.time()
        joiner, router = self.make_node(JOINER, host, (), lease, blind=False)
        scope = trio.CancelScope()

        async def run_joiner(*, task_status: trio.TaskStatus[None]) -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    await inner.start(router.run)
                    await inner.start(joiner.coordination.run)
                    task_status.started()

        await nursery.start(run_joiner)
        found: float | None = None
        deadline = trio.current_time() + self.args.join_window
        while trio.current_time() < deadline:
            if found is None and joiner.sees(leader.name):
                found = time.time() - start
            await trio.sleep(POLL)
        end = time.time()
        await trio.sleep(0.5)
        window = self.requests(start, end)
        scope.cancel()
        own = [r for r in window if r["user"].endswith(f":{JOINER}")]
        return {
            "seconds": end - start,
            "elector": _elector_requests([joiner]),
            "requests": Counter(f"{r['method']} {_shape(r['path'])}" for r in own),
            "others": len(window) - len(own),
            "found_s": found,
            "members": joiner.core.alive_count(),
            "role": joiner.coordination.status()["role"],
        }


def _elector_requests(nodes: list[Node]) -> int:
    """The electors' own count of the requests they made (the preflight's not included)."""
    return sum(
        node.coordination.elector.statistics().api_requests
        for node in nodes
        if node.coordination.elector is not None
    )


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _shape(path: str) -> str:
    """The path without its query and with the Lease's name left out."""
    path = path.split("?", 1)[0]
    return LEASE_PREFIX + "NAME" if path.startswith(LEASE_PREFIX) else path


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (N, req/s): (intercept, slope)."""
    if len(points) < 2:
        return (points[0][1] if points else 0.0), 0.0
    mean_n = sum(n for n, _ in points) / len(points)
    mean_r = sum(r for _, r in points) / len(points)
    var = sum((n - mean_n) ** 2 for n, _ in points)
    slope = sum((n - mean_n) * (r - mean_r) for n, r in points) / var if var else 0.0
    return mean_r - slope * mean_n, slope


def report(results: list[Round], args: argparse.Namespace, wall: float) -> None:
    anchors = {r.n: r for r in results if r.mode == "polling"}
    print()
    print(
        "| N | mode | steady Lease req/s (apiserver_request_total) | GET/s | PUT/s | POST/s "
        "| audit log: Lease requests in window | nodes calling | model | x anchor "
        "| electors' count | requests until converged (election) | converged in "
        "| CPU bench / server | ≤ 1 req/s |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        anchor = anchors.get(r.n)
        ratio = f"{r.rate() / anchor.rate():.3f}" if anchor and anchor.rate() else "-"
        model = f"{r.n / RETRY_PERIOD:.1f}" if r.mode == "polling" else f"{1 / RETRY_PERIOD:.1f}"
        extra = f" (+{r.non_lease} not Lease)" if r.non_lease else ""
        print(
            f"| {r.n} | {r.mode} | {r.rate():.2f}{extra} | {r.rate('GET'):.2f} "
            f"| {r.rate('PUT'):.2f} | {r.rate('POST'):.2f} | {r.total} "
            f"| {r.callers} of {r.n} | {model} "
            f"| {ratio} | {r.elector_count} of {sum(r.lease_metric.values()):.0f} "
            f"| {r.start_requests} ({r.start_election}) "
            f"| {r.converge_s:.1f} s "
            f"| {r.cpu_self:.0f} % / {r.cpu_server:.0f} % "
            f"| {'meets' if r.rate() <= TARGET_RPS else 'misses'} |"
        )
    print(f"\nsteady-state windows of {args.window:g} s after {args.settle:g} s of settling; "
          f"model: leader renewals 1/{RETRY_PERIOD:g} s, plus (N-1)/{RETRY_PERIOD:g} s of "
          "follower reads for polling")  # fmt: skip

    joins = [r for r in results if r.join is not None]
    if joins:
        print("\n| N | joiner's election requests | joiner's preflight requests (once per start) "
              "| joiner total | rest of the cluster | sees the coordinator via gossip | members "
              "| role |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in joins:
            j = r.join
            assert j is not None
            total = sum(j["requests"].values())
            found = f"{j['found_s']:.1f} s" if j["found_s"] is not None else "never"
            print(
                f"| {r.n} | {j['elector']} | {total - j['elector']} | {total} "
                f"| {j['others']} in {j['seconds']:.0f} s | {found} | {j['members']} of {r.n} "
                f"| {j['role']} |"
            )
        seen: Counter[str] = Counter()
        for r in joins:
            seen.update((r.join or {})["requests"])
        print("\njoiner requests by path, all rounds: " + "; ".join(
            f"{key} x{count}" for key, count in sorted(seen.items())))  # fmt: skip

    print("\n| mode | slope (req/s per node) | fit at N = 1000 | target | verdict |")
    print("|---|---:|---:|---|---|")
    for mode in dict.fromkeys(r.mode for r in results):
        rounds = [r for r in results if r.mode == mode]
        worst = max(r.rate() for r in rounds)
        if len({r.n for r in rounds}) < 2:
            verdict = "meets" if worst <= TARGET_RPS else "misses"
            print(f"| {mode} | - (one size) | - | ≤ {TARGET_RPS:g} req/s, flat in N "
                  f"| {verdict} at N = {rounds[0].n} only |")  # fmt: skip
            continue
        intercept, slope = _fit([(r.n, r.rate()) for r in rounds])
        at_target = intercept + slope * TARGET_N
        meets = at_target <= TARGET_RPS and worst <= TARGET_RPS
        slope = 0.0 if abs(slope) < 5e-5 else slope  # no "-0.0000" for a flat line
        print(
            f"| {mode} | {slope:.4f} | {at_target:.1f} req/s | ≤ {TARGET_RPS:g} req/s, flat in N "
            f"| {'meets' if meets else 'misses'} |"
        )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{platform.python_version()} on {os.cpu_count()} CPUs; load average at the end "
        f"{load}; total wall time {wall:.0f} s"
    )


async def main(args: argparse.Namespace) -> list[Round]:
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    for mode in modes:
        if mode not in ("spegeld", "polling"):
            raise SystemExit(f"unknown mode {mode!r}: use spegeld and/or polling")
    for i in range(max(sizes) + 1):  # every address we will use must bind
        free_port(f"127.0.0.{HOST_BASE + i}")
    results: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bench-election-") as tmp:
        bench = Bench(Path(tmp), max(sizes), args)
        try:
            for n in sizes:
                for mode in modes:
                    started = time.monotonic()
                    result = await bench.run_round(n, mode)
                    results.append(result)
                    print(
                        f"N = {n:>3} {mode:<8} {result.rate():6.2f} req/s "
                        f"({dict(result.methods)}) converged in {result.converge_s:.1f} s, "
                        f"round {time.monotonic() - started:.0f} s",
                        flush=True,
                    )
        finally:
            bench.api.stop()
    return results


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5,20,50", help="cluster sizes, comma-separated")
    parser.add_argument("--modes", default="spegeld,polling")
    parser.add_argument("--window", type=float, default=30.0, help="steady-state seconds")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after convergence")
    parser.add_argument("--join-window", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=90.0, help="bound on convergence")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--quick", action="store_true", help="N = 5 only, 10 s windows")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.window, args.settle, args.join_window = "5", 10.0, 2.0, 17.0
    return args


def run(argv: list[str] | None = None) -> None:
    args = _args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    results = trio.run(main, args)
    report(results, args, time.monotonic() - started)


if __name__ == "__main__":
    run()
