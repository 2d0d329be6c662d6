"""Time coordinator failover on five real daemons: kill -9 and SIGTERM of the coordinator.

Run as root from the repository root (private containerds; the API test server lives in
``tests.kubeapi``)::

    sudo .venv/bin/python bench/failover.py            # 3 rounds
    sudo .venv/bin/python bench/failover.py --quick    # 1 round

Method (the setup of ``tests/test_election_daemons.py``).  Five nodes, each a private
containerd plus ``spegeld run`` on its own loopback address 127.0.0.2x, one cluster key,
one ServiceAccount kubeconfig for the Kubernetes API test server (its own process).  Each
round has two faults, and before each the cluster must be settled: one leader that every
node names, and every role ``leader`` or ``follower`` (nobody still contending).  Then:

* crash: ``kill -9`` of the coordinator's PID;
* graceful: SIGTERM of the coordinator's PID (it releases the Lease and leaves gossip).

From the fault, the survivors' ``/status`` is polled (every ~50 ms, serially) until
another node's election role is ``leader``: the failover time.  The same polls give the
detection time, when some survivor's gossip first shows the old coordinator other than
``alive`` (suspect, dead or left).  The difference is the Lease wait.  The victim is
started again (seeded with a live node) before the next fault, so N stays 5.

Anchor: client-go's defaults, lease 15 s and retry 2 s: a candidate takes an expired
Lease at its first poll after 15 s have passed since it saw the last renewal, so up to
17 s after that renewal.  The age of the last renewal at the kill (from the API server's
request log) is printed so each crash can be set against ``17 s - age``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the API test server lives in tests.kubeapi
from tests.kubeapi._electing import ElectingCluster, Node  # noqa: E402

HOSTS = [f"127.0.0.{i}" for i in range(21, 26)]
LEASE_DURATION = 15.0  # DESIGN.md §11: crash failover ≤ lease duration
HANDOVER = 2.0  # graceful stop ≤ 2 s
CLIENT_GO_WORST = 15.0 + 2.0
POLL = 0.05
SETTLE_TIMEOUT = 60.0
FAILOVER_TIMEOUT = 40.0


class Cluster(ElectingCluster):
    def __init__(self, base: Path) -> None:
        super().__init__(base, HOSTS)

    def settled_leader(self) -> str | None:
        """The one leader, when every live node names it and nobody is contending."""
        statuses = self.statuses()
        if len(statuses) != sum(n.alive for n in self.nodes):
            return None
        leaders = [name for name, s in statuses.items() if s["election"]["role"] == "leader"]
        if len(leaders) != 1:
            return None
        for s in statuses.values():
            if s["coordinator"] != leaders[0] or s["election"]["role"] not in (
                "leader",
                "follower",
            ):
                return None
        return leaders[0]

    def wait_settled(self) -> str:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (leader := self.settled_leader()) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"the cluster did not settle within {SETTLE_TIMEOUT} s")
            time.sleep(0.1)
        return leader

    def restart(self, node: Node) -> None:
        live = next(n for n in self.nodes if n.alive and n is not node)
        node.spegeld.peers = [live.spegeld.gossip_address]
        node.spegeld.start()
        node.alive = True

    def last_renew_age(self, at_wall: float) -> float | None:
        """Seconds from the last successful Lease write to ``at_wall``."""
        writes = [
            r["at"]
            for r in self.api.requests()
            if r.get("method") in ("PUT", "POST")
            and r.get("code") in (200, 201)
            and r["at"] <= at_wall
        ]
        return at_wall - max(writes) if writes else None


@dataclass
class Fault:
    kind: str  # "kill -9" or "SIGTERM"
    round: int
    old: str
    new: str
    failover: float
    detection: float | None
    seen_state: str
    dead: float | None  # first survivor showing it dead or left (not just suspect)
    renew_age: float | None


Watched = tuple[str, float, float | None, str, float | None]


def watch(cluster: Cluster, old: str, t0: float) -> Watched:
    """Poll survivors until one leads: new leader, failover, detection, its state, dead."""
    detection: float | None = None
    dead: float | None = None
    seen = ""
    deadline = t0 + FAILOVER_TIMEOUT
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if node.name == old:
                continue
            status = node.status()
            now = time.monotonic() - t0
            if status is None:
                continue
            for peer in status.get("gossip", {}).get("peers", []):
                if peer["node"] != old or peer["state"] == "alive":
                    continue
                if detection is None:
                    detection, seen = now, peer["state"]
                if dead is None and peer["state"] in ("dead", "left"):
                    dead = now
            if status["election"]["role"] == "leader":
                return node.name, now, detection, seen, dead
        time.sleep(POLL)
    raise SystemExit(f"no new coordinator within {FAILOVER_TIMEOUT} s after losing {old}")


def crash(cluster: Cluster, round_no: int) -> Fault:
    old = cluster.wait_settled()
    victim = cluster.node(old)
    wall = time.time()
    t0 = time.monotonic()
    victim.spegeld.kill()
    victim.alive = False
    new, failover, detection, seen, dead = watch(cluster, old, t0)
    age = cluster.last_renew_age(wall)
    return Fault("kill -9", round_no, old, new, failover, detection, seen, dead, age)


def graceful(cluster: Cluster, round_no: int) -> Fault:
    old = cluster.wait_settled()
    victim = cluster.node(old)
    wall = time.time()
    with ThreadPoolExecutor(max_workers=1) as pool:
        t0 = time.monotonic()
        exit_code = pool.submit(victim.spegeld.stop)
        new, failover, detection, seen, dead = watch(cluster, old, t0)
        victim.alive = False
        if exit_code.result() != 0:
            print(f"   {old} exited with {exit_code.result()} on SIGTERM", flush=True)
    age = cluster.last_renew_age(wall)
    return Fault("SIGTERM", round_no, old, new, failover, detection, seen, dead, age)


def fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def print_tables(faults: list[Fault]) -> None:
    print()
    print(
        "| Round | Fault | Old → new coordinator | Detection (gossip) | Dead/left seen"
        " | Lease wait | **Failover** | Last renew age at fault | client-go worst from fault |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for f in faults:
        wait = None if f.detection is None else f.failover - f.detection
        anchor = None if f.renew_age is None else CLIENT_GO_WORST - f.renew_age
        seen = f" ({f.seen_state})" if f.seen_state else ""
        print(
            f"| {f.round} | {f.kind} | {f.old} → {f.new} | {fmt_s(f.detection)}{seen}"
            f" | {fmt_s(f.dead)} | {fmt_s(wait)} | **{fmt_s(f.failover)}** | {fmt_s(f.renew_age)}"
            f" | {fmt_s(anchor) if f.kind == 'kill -9' else '—'} |"
        )
    print()
    print("| Fault | Failover median | max | Detection median | Target | Verdict |")
    print("|---|---|---|---|---|---|")
    for kind, target in (("kill -9", LEASE_DURATION), ("SIGTERM", HANDOVER)):
        got = [f for f in faults if f.kind == kind]
        if not got:
            continue
        times = [f.failover for f in got]
        detections = [f.detection for f in got if f.detection is not None]
        det = fmt_s(statistics.median(detections)) if detections else "—"
        verdict = "meets" if max(times) <= target else "misses"
        print(
            f"| {kind} | {statistics.median(times):.2f} s | {max(times):.2f} s | {det}"
            f" | ≤ {target:.0f} s | **{verdict}** |"
        )
    print()
    print(f"Anchor: client-go, lease 15 s + retry 2 s = up to {CLIENT_GO_WORST:.0f} s"
          " after the last renewal.")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds of both faults (3)")
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"spegeld failover benchmark: {time.strftime('%Y-%m-%d %H:%M:%S %Z')},"
        f" {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" load {os.getloadavg()[0]:.2f}, N = {len(HOSTS)}, {args.rounds} rounds",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="spg-failover-", dir="/tmp"))
    faults: list[Fault] = []
    cluster: Cluster | None = None
    try:
        cluster = Cluster(work)
        cluster.start()
        for round_no in range(1, args.rounds + 1):
            for measure in (crash, graceful):
                fault = measure(cluster, round_no)
                faults.append(fault)
                print(
                    f"   round {round_no}, {fault.kind} of {fault.old}: {fault.new} leads"
                    f" after {fault.failover:.2f} s (detection {fmt_s(fault.detection)})",
                    flush=True,
                )
                cluster.restart(cluster.node(fault.old))
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    print_tables(faults)
    return 0


if __name__ == "__main__":
    sys.exit(main())
