"""Benchmark the gossip core in the deterministic simulator, against the DESIGN §11 targets.

Run (no root, no network; everything is simulated time in one process)::

    .venv/bin/python bench/gossip.py             # N = 10, 100, 1000 at 0 %, 10 %, 30 % loss
    .venv/bin/python bench/gossip.py --quick     # smoke run: N = 10, 100 at 0 % and 10 %

For each cluster size N and loss rate, one simulation (``spegeld.gossip.sim``, the real
``GossipCore`` for every node, 2 ms ± 1 ms one-way delay, independent loss per datagram)
starts with every node already a member (``start_joined``: the join phase costs N² state
pulls and is not what these figures are about), runs 3 s to settle, and then measures:

(a) dissemination: a random node advertises a fresh key; the time until 99.9 % of the
    other nodes (all of them below N = 1000) find it with ``lookup``. Median of several
    keys, one after another. The anchor is the Serf model: push gossip with fanout 3 every
    200 ms, each node passing an item on 4·⌈log10(N+1)⌉ times, with the same loss, computed
    by Monte Carlo in the same run (Serf's convergence simulator quotes 2.0 s at N = 1000).
(b) failure detection: a random node is killed; the time until it is suspected somewhere,
    and until every live node holds it dead.
(c) bandwidth: bytes sent per node per second, as kbit/s, over an idle window (no key
    changes: probes, acks, anti-entropy summaries, refutations of false suspicions) and
    over the busy window of (a). The anchor is memberlist's figure of about 330 kbit/s.
(d) memory: in a fresh subprocess that first imports the whole daemon (``spegeld.app``),
    one GossipCore that knows 1000 members holding 2000 keys each, filled through the
    table's own add path. Cases: ``realistic`` (each node holds 200 random images of a
    1000-image catalogue, 9 digests and a tag per image: 10 000 distinct keys), ``shared``
    (all nodes hold the same 200 images), ``disjoint`` (no key in common: 2 000 000 distinct
    keys, the worst case). RSS comes from /proc/self/status; tracemalloc runs in a
    separate child, since its own bookkeeping inflates RSS. The anchor is Spegel's chart
    memory limit, 128 MiB.

Options: ``--sizes 10,100,1000``, ``--losses 0,0.1,0.3``, ``--seed``, ``--trials`` (keys per
cluster; fewer at N = 1000), ``--memory-cases``, ``--skip-memory``, ``--quick``.
"""

from __future__ import annotations

import argparse
import heapq
import importlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any

from spegeld.gossip import GossipConfig, GossipCore, Keyring, Timings
from spegeld.gossip._messages import Member, State
from spegeld.gossip.sim import NetworkRules, Simulation

SETTLE = 3.0  # simulated seconds before measuring: first probes, RTTs, summaries
IDLE_WINDOW = 10.0  # simulated seconds of idle traffic for (c)
POLL = 0.01  # simulated seconds between checks for (a)
DEATH_POLL = 0.05  # ... and for (b)
KEY_GAP = 0.5  # simulated seconds between one key's arrival everywhere and the next key
QUORUM = 0.999

TARGET_SPREAD_S = 2.0  # DESIGN §11: 99.9 % of 1000 nodes at 10 % loss
TARGET_KBITS = 100.0
TARGET_RSS_MIB = 100.0
ANCHOR_SERF_S = 2.0  # Serf's convergence simulator, N = 1000, 200 ms rounds, fanout 3
ANCHOR_MEMBERLIST_KBITS = 330.0
ANCHOR_SPEGEL_MIB = 128.0

MEMBERS = 1000
KEYS_PER_MEMBER = 2000
IMAGES_PER_MEMBER = 200  # x 10 keys each
MEMORY_CASES = {"shared": 200, "realistic": 1000, "disjoint": 0}  # catalogue size; 0: none


@dataclass
class Result:
    n: int
    loss: float
    setup_s: float = 0.0
    wall_s: float = 0.0
    sim_s: float = 0.0
    spread: list[float] = field(default_factory=list)  # to 99.9 %
    spread_all: list[float] = field(default_factory=list)  # to every node
    serf: list[float] = field(default_factory=list)
    suspect_s: float = math.nan
    dead_s: float = math.nan
    suspicion_timeout: float = 0.0
    idle_kbits: float = 0.0
    idle_kbits_max: float = 0.0
    busy_kbits: float = 0.0
    datagrams_per_node_s: float = 0.0


def quorum(n: int) -> int:
    """How many of the other n - 1 nodes make 99.9 %."""
    return math.ceil(QUORUM * (n - 1))


def kbits(sim: Simulation, before: dict[Any, int], seconds: float) -> tuple[float, float]:
    """Mean and maximum kbit/s sent per live node since ``before``."""
    rates = [
        (sim.bytes_sent[a] - before.get(a, 0)) * 8 / seconds / 1000
        for a in sim.nodes
        if a not in sim.down
    ]
    return statistics.fmean(rates), max(rates)


def spread_trial(sim: Simulation, rng: random.Random, key: str) -> tuple[float, float]:
    """Advertise ``key`` on a random node; times until 99.9 % and all others find it."""
    addrs = [a for a in sim.nodes if a not in sim.down]
    owner = sim.nodes[rng.choice(addrs)]
    waiting = {sim.nodes[a] for a in addrs} - {owner}
    need = quorum(len(addrs))
    start = sim.now
    owner.advertise([key])
    at_quorum = math.nan
    while waiting:
        sim.run_until(sim.now + POLL)
        waiting = {core for core in waiting if not core.lookup(key, 1)}
        if math.isnan(at_quorum) and len(addrs) - 1 - len(waiting) >= need:
            at_quorum = sim.now - start
        if sim.now - start > 60:
            break
    return at_quorum, (sim.now - start if not waiting else math.nan)


def death_trial(sim: Simulation, rng: random.Random) -> tuple[float, float]:
    """Kill a random node (not a seed); times until first suspected and dead everywhere."""
    victim_index = rng.randrange(1, len(sim.nodes))
    victim = sim.nodes[sim.addr(victim_index)].node
    sim.kill(victim_index)
    # The bench reads each core's member table directly: members() would make every
    # check O(N) per node, O(N²) per poll.
    watching = [c for a, c in sim.nodes.items() if a not in sim.down]
    start = sim.now
    suspected = math.nan
    while watching:
        sim.run_until(sim.now + DEATH_POLL)
        states = [c.members_table.get(victim).state.name for c in watching]  # type: ignore[union-attr]
        if math.isnan(suspected) and any(s != "ALIVE" for s in states):
            suspected = sim.now - start
        watching = [c for c, s in zip(watching, states, strict=True) if s != "DEAD"]
        if sim.now - start > 120:
            return suspected, math.nan
    return suspected, sim.now - start


def serf_model(n: int, loss: float, rng: random.Random, timings: Timings) -> float:
    """Push gossip as Serf's simulator models it: time until 99.9 % of n nodes know an item.

    Every gossip_interval each informed node (timers in random phase) sends to
    gossip_nodes random others, until it has sent the item retransmit_mult·⌈log10(n+1)⌉
    times; each send is lost with probability ``loss``. Delays are ignored.
    """
    limit = timings.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))
    need = math.ceil(QUORUM * n)
    phase = [rng.random() * timings.gossip_interval for _ in range(n)]
    sent = [0] * n
    informed_at = [math.inf] * n
    informed_at[0] = 0.0
    informed = 1
    events = [(phase[0], 0)]  # (time of the node's next round, node)
    while events and informed < need:
        t, node = heapq.heappop(events)
        for _ in range(timings.gossip_nodes):
            if sent[node] >= limit:
                break
            sent[node] += 1
            other = rng.randrange(n - 1)
            other += other >= node
            if rng.random() >= loss and informed_at[other] == math.inf:
                informed_at[other] = t
                informed += 1
                first = t + (phase[other] - t) % timings.gossip_interval
                heapq.heappush(events, (first, other))
        if sent[node] < limit:
            heapq.heappush(events, (t + timings.gossip_interval, node))
    return max(t for t in informed_at if t < math.inf) if informed >= need else math.nan


def run_cluster(n: int, loss: float, args: argparse.Namespace) -> Result:
    rng = random.Random(args.seed * 1000 + n + int(loss * 100))
    result = Result(n, loss)
    wall = time.perf_counter()
    sim = Simulation(n, seed=args.seed, rules=NetworkRules(loss=loss), start_joined=True)
    result.setup_s = time.perf_counter() - wall
    sim.run_until(SETTLE)

    before = dict(sim.bytes_sent)
    datagrams = sim.delivered + sim.lost
    sim.run_until(sim.now + IDLE_WINDOW)
    result.idle_kbits, result.idle_kbits_max = kbits(sim, before, IDLE_WINDOW)
    result.datagrams_per_node_s = (sim.delivered + sim.lost - datagrams) / n / IDLE_WINDOW

    trials = args.trials if n < 1000 else max(1, args.trials // 2)
    before, busy_start = dict(sim.bytes_sent), sim.now
    for trial in range(trials):
        key = f"sha256:{rng.getrandbits(256):064x}"
        at_quorum, at_all = spread_trial(sim, rng, key)
        result.spread.append(at_quorum)
        result.spread_all.append(at_all)
        sim.run_until(sim.now + KEY_GAP)
        if trial == 0:
            print(
                f"    N={n} loss={loss:.0%}: first key at 99.9 % in {at_quorum:.2f} s", flush=True
            )
    result.busy_kbits = kbits(sim, before, sim.now - busy_start)[0]
    result.serf = [serf_model(n, loss, rng, sim.timings) for _ in range(max(5, trials))]

    result.suspect_s, result.dead_s = death_trial(sim, rng)
    result.suspicion_timeout = (
        sim.timings.suspicion_mult * max(1.0, math.log10(n)) * sim.timings.probe_interval
    )
    result.sim_s = sim.now
    result.wall_s = time.perf_counter() - wall
    return result


# --- memory -----------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def memory_child(case: str, traced: bool) -> dict[str, Any]:
    """Runs in a fresh interpreter: the daemon's imports, then one core with a full table."""
    importlib.import_module("spegeld.app")  # what the daemon loads: trio, httpx, grpclib, ...
    baseline = _rss_mib()
    rng = random.Random(7)
    catalogue = MEMORY_CASES[case]

    def image_keys(image: int) -> list[str]:
        digests = [f"sha256:{rng_image(image, k):064x}" for k in range(9)]
        return [*digests, f"registry.example.com/team-{image % 40}/app-{image}:v1.{image % 7}"]

    def rng_image(image: int, k: int) -> int:
        return random.Random(image * 16 + k).getrandbits(256)

    images = {i: image_keys(i) for i in range(catalogue)} if catalogue else {}
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    core = GossipCore(
        GossipConfig("bench", ("10.0.0.1", 7946), "10.0.0.1:5000", 1),
        Keyring([(1, b"k" * 32)]),
        rng,
        0.0,
    )
    for m in range(MEMBERS):
        host = f"10.1.{m // 256}.{m % 256}"
        member = Member(f"node-{m:04d}", 1, State.ALIVE, (host, 7946), f"{host}:5000", 1 << 20)
        peer = core.members_table.add(member, 0.0)
        if catalogue:
            keys = [k for i in rng.sample(range(catalogue), IMAGES_PER_MEMBER) for k in images[i]]
        else:
            keys = [f"sha256:{rng.getrandbits(256):064x}" for _ in range(KEYS_PER_MEMBER)]
        for lo in range(0, len(keys), 17):  # the size of one delta's worth of digests
            core.table.add(peer.slot, keys[lo : lo + 17])
        peer.keys.version = (1 << 20) + len(keys) // 17
    build_s = time.perf_counter() - start
    traced_mib = tracemalloc.get_traced_memory()[0] / 2**20 if traced else math.nan
    if traced:
        tracemalloc.stop()
    probe = rng.choice(list(core.table._index))
    lookups = 20000
    t0 = time.perf_counter()
    for _ in range(lookups):
        core.lookup(probe, 3)
    lookup_us = (time.perf_counter() - t0) / lookups * 1e6
    return {
        "case": case,
        "distinct_keys": len(core.table),
        "pairs": sum(core.table.count_of(p.slot) for p in core.members_table),
        "baseline_rss_mib": baseline,
        "rss_mib": _rss_mib(),
        "traced_mib": traced_mib,
        "build_s": build_s,
        "lookup_us": lookup_us,
        "holders_of_probe": len(list(core.table.holders(probe))),
    }


def measure_memory(case: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for traced in (False, True):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", case, *(["--traced"] if traced else [])],
            capture_output=True,
            text=True,
            check=True,
        )
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        if traced:
            out["traced_mib"] = child["traced_mib"]
        else:
            out.update({k: v for k, v in child.items() if k != "traced_mib"})
    return out


# --- output ---------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return statistics.median(good) if good else math.nan


def print_clusters(results: list[Result]) -> None:
    print()
    print(
        "| N | loss | (a) 99.9 % median | (a) range | all nodes (median) | Serf model "
        "| x Serf | (b) suspected | (b) dead everywhere | suspicion timeout "
        "| (c) idle kbit/s (max node) | (c) busy kbit/s | datagrams/node/s | wall (setup) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        spread, serf = _median(r.spread), _median(r.serf)
        good = [v for v in r.spread if not math.isnan(v)]
        span = f"{min(good):.2f}-{max(good):.2f} s ({len(r.spread)})" if good else "-"
        print(
            f"| {r.n} | {r.loss:.0%} | {spread:.2f} s | {span} | {_median(r.spread_all):.2f} s "
            f"| {serf:.2f} s | {spread / serf:.2f} | {r.suspect_s:.2f} s | {r.dead_s:.2f} s "
            f"| {r.suspicion_timeout:.1f} s | {r.idle_kbits:.1f} ({r.idle_kbits_max:.1f}) "
            f"| {r.busy_kbits:.1f} | {r.datagrams_per_node_s:.1f} "
            f"| {r.wall_s:.0f} s ({r.setup_s:.1f} s) |"
        )


def print_memory(memory: list[dict[str, Any]]) -> None:
    print()
    print(
        f"Memory: one GossipCore knowing {MEMBERS} members x {KEYS_PER_MEMBER} keys, "
        "in a fresh process that imported spegeld.app first"
    )
    print()
    print(
        "| case | distinct keys | (key, holder) pairs | RSS after imports | RSS with table "
        "| table's share of RSS | tracemalloc | build | lookup |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m in memory:
        print(
            f"| {m['case']} | {m['distinct_keys']:,} | {m['pairs']:,} "
            f"| {m['baseline_rss_mib']:.1f} MiB | {m['rss_mib']:.1f} MiB "
            f"| {m['rss_mib'] - m['baseline_rss_mib']:.1f} MiB | {m['traced_mib']:.1f} MiB "
            f"| {m['build_s']:.1f} s | {m['lookup_us']:.1f} µs |"
        )


def print_targets(results: list[Result], memory: list[dict[str, Any]]) -> None:
    print()
    print("| What | Anchor | Target | Measured | x anchor | Verdict |")
    print("|---|---|---|---:|---:|---|")
    big = [r for r in results if r.n == max(x.n for x in results)]
    for r in big:
        if r.loss != 0.1 and len(big) > 1 and any(x.loss == 0.1 for x in big):
            continue
        spread = _median(r.spread)
        verdict = "meets" if spread <= TARGET_SPREAD_S else "misses"
        print(
            f"| 99.9 % of {r.n} nodes know a new key, {r.loss:.0%} loss | Serf model "
            f"{ANCHOR_SERF_S:.1f} s (this run's Monte Carlo: {_median(r.serf):.2f} s) "
            f"| ≤ {TARGET_SPREAD_S:.1f} s | {spread:.2f} s | {spread / ANCHOR_SERF_S:.2f} "
            f"| {verdict} |"
        )
    for r in big:
        verdict = "meets" if r.idle_kbits <= TARGET_KBITS else "misses"
        print(
            f"| bandwidth per node, steady state, N = {r.n}, {r.loss:.0%} loss "
            f"| memberlist ≈ {ANCHOR_MEMBERLIST_KBITS:.0f} kbit/s | ≤ {TARGET_KBITS:.0f} kbit/s "
            f"| {r.idle_kbits:.1f} kbit/s idle, {r.busy_kbits:.1f} busy "
            f"| {r.idle_kbits / ANCHOR_MEMBERLIST_KBITS:.2f} | {verdict} |"
        )
    for m in memory:
        verdict = "meets" if m["rss_mib"] <= TARGET_RSS_MIB else "misses"
        print(
            f"| RSS holding {MEMBERS} x {KEYS_PER_MEMBER} keys ({m['case']}) "
            f"| Spegel chart limit {ANCHOR_SPEGEL_MIB:.0f} MiB | ≤ {TARGET_RSS_MIB:.0f} MiB "
            f"| {m['rss_mib']:.1f} MiB | {m['rss_mib'] / ANCHOR_SPEGEL_MIB:.2f} | {verdict} |"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10, 100 at 0 and 10 %% loss")
    parser.add_argument("--sizes", help="cluster sizes, comma separated (10,100,1000)")
    parser.add_argument("--losses", help="loss rates, comma separated (0,0.1,0.3)")
    parser.add_argument("--seed", type=int, default=1, help="simulation seed")
    parser.add_argument("--trials", type=int, default=None, help="keys per cluster (5; N=1000: 2)")
    parser.add_argument(
        "--memory-cases", default=None, help="of shared,realistic,disjoint (all; quick: realistic)"
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = "10,100" if args.quick else "10,100,1000"
    losses = "0,0.1" if args.quick else "0,0.1,0.3"
    args.sizes = [int(s) for s in (args.sizes or sizes).split(",")]
    args.losses = [float(s) for s in (args.losses or losses).split(",")]
    args.trials = args.trials or (3 if args.quick else 5)
    cases = args.memory_cases or ("realistic" if args.quick else "shared,realistic,disjoint")
    args.memory_cases = [c for c in cases.split(",") if c]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.traced)))
        return 0
    print(
        f"gossip bench: sizes {args.sizes}, losses {args.losses}, seed {args.seed}; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    started = time.perf_counter()
    results = []
    for n in args.sizes:
        for loss in args.losses:
            results.append(run_cluster(n, loss, args))
            r = results[-1]
            print(
                f"  N={n} loss={loss:.0%}: {r.sim_s:.0f} s simulated in {r.wall_s:.0f} s "
                f"({(r.wall_s - r.setup_s) / r.sim_s:.2f} s per simulated second)",
                flush=True,
            )
    memory = []
    if not args.skip_memory:
        for case in args.memory_cases:
            print(f"  memory: {case} ...", flush=True)
            memory.append(measure_memory(case))
    print_clusters(results)
    if memory:
        print_memory(memory)
    print_targets(results, memory)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
