"""The simulator's fixed scenarios, one per kind the protocol tests drive, and their hashes.

``python -m spegeld.gossip.sim`` runs them and prints, per scenario, the SHA-256 of
every datagram every core emitted (with its time and ends) and of every node's
final member table and statistics (the *fingerprint*), then the SHA-256 of the final
tables alone, without byte counts (the *outcome*). A change that is meant to keep
behaviour (a refactor) must keep every line; tests/test_gossip_sim.py pins them.

The nodes speak datagram version 2 (``refuse``: no version 1 at all); ``--v1`` runs
every node as a node from before version 2 (``only``). The two runs send the same
datagrams in the same order, but for their framing: the outcomes are equal.

A run is repeatable to the byte only under one hash seed: the core iterates sets of
node names, whose order ``PYTHONHASHSEED`` sets. ``main`` insists on ``0``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from collections.abc import Callable

from ._simulation import NetworkRules, Simulation
from ._wire import V1Policy


def _digest(i: int) -> str:
    return f"sha256:{i:064x}"


def _join(v1: V1Policy) -> Simulation:
    sim = Simulation(20, seed=7, v1=v1)
    sim.run_until(15)
    return sim


def _keys(v1: V1Policy) -> Simulation:
    sim = Simulation(20, seed=2, v1=v1)
    sim.run_until(10)
    key, tag = _digest(1), "docker.io/library/nginx:1.27"
    sim.nodes[sim.addr(3)].advertise([key, tag])
    sim.nodes[sim.addr(7)].advertise([key])
    sim.run_until(15)
    sim.nodes[sim.addr(3)].withdraw([key, tag])
    sim.run_until(20)
    return sim


def _kill(v1: V1Policy) -> Simulation:
    sim = Simulation(20, seed=3, v1=v1)
    sim.run_until(10)
    sim.nodes[sim.addr(5)].advertise([_digest(i) for i in range(50)])
    sim.run_until(13)
    sim.kill(5)
    sim.run_until(30)
    return sim


def _refute(v1: V1Policy) -> Simulation:
    rules = NetworkRules()
    sim = Simulation(20, seed=4, rules=rules, v1=v1)
    sim.run_until(10)
    x = sim.addr(9)
    rules.blocked = lambda src, dst: x in (src, dst)
    sim.run_until(13.5)
    rules.blocked = lambda src, dst: False
    sim.run_until(20)
    return sim


def _restart(v1: V1Policy) -> Simulation:
    sim = Simulation(12, seed=5, v1=v1)
    sim.run_until(10)
    old = sim.nodes[sim.addr(4)]
    old.advertise([_digest(1), _digest(2)])
    sim.run_until(12)
    sim.kill(4)
    sim.run_until(25)
    new = sim.add_node(4, seeds=(sim.addr(0),), incarnation=old.incarnation + 1)
    new.advertise([_digest(2), _digest(3)])
    sim.run_until(40)
    return sim


def _partition(v1: V1Policy) -> Simulation:
    n = 12
    rules = NetworkRules()
    sim = Simulation(n, seed=8, rules=rules, v1=v1)
    sim.run_until(10)
    left = {sim.addr(i) for i in range(n // 2)}
    rules.blocked = lambda src, dst: (src in left) != (dst in left)
    sim.run_until(30)
    sim.nodes[sim.addr(2)].advertise([_digest(2)])
    sim.nodes[sim.addr(9)].advertise([_digest(9)])
    sim.run_until(85)  # past dead_forget: only the seed reconnects the halves
    rules.blocked = lambda src, dst: False
    sim.run_until(120)
    return sim


def _loss(v1: V1Policy) -> Simulation:
    sim = Simulation(20, seed=9, rules=NetworkRules(loss=0.3), v1=v1)
    sim.run_until(20)
    sim.nodes[sim.addr(11)].advertise([_digest(11)])
    sim.run_until(25)
    sim.nodes[sim.addr(11)].withdraw([_digest(11)])
    sim.run_until(30)
    return sim


def _steady(v1: V1Policy) -> Simulation:
    sim = Simulation(100, seed=1, rules=NetworkRules(loss=0.3), start_joined=True, v1=v1)
    sim.run_until(5)
    for k in range(4):
        sim.nodes[sim.addr(10 + k)].advertise([_digest(1000 + k)])
        sim.run_until(sim.now + 3)
    return sim


def _chunks(v1: V1Policy) -> Simulation:
    sim = Simulation(3, seed=12, v1=v1)
    sim.run_until(5)
    sim.nodes[sim.addr(1)].advertise([_digest(i) for i in range(3000)])
    sim.run_until(7)
    sim.rules.loss = 0.3
    sim.add_node(3, seeds=(sim.addr(0),))
    sim.run_until(30)
    return sim


def _coordinator_and_leave(v1: V1Policy) -> Simulation:
    sim = Simulation(8, seed=13, v1=v1)
    sim.run_until(8)
    sim.nodes[sim.addr(6)].set_coordinator(True)
    sim.nodes[sim.addr(3)].advertise([_digest(3)])
    sim.run_until(12)
    sim.nodes[sim.addr(6)].set_coordinator(False)
    sim.run_until(15)
    sim.leave(3)
    sim.run_until(20)
    return sim


SCENARIOS: dict[str, Callable[[V1Policy], Simulation]] = {
    "join": _join,
    "keys": _keys,
    "kill": _kill,
    "refute": _refute,
    "restart": _restart,
    "partition": _partition,
    "loss": _loss,
    "steady": _steady,
    "chunks": _chunks,
    "coordinator-and-leave": _coordinator_and_leave,
}


def fingerprint(sim: Simulation) -> str:
    """The trace's hash, then every node's members and statistics, in address order."""
    final = hashlib.sha256(sim.trace.digest())
    for addr in sorted(sim.nodes):
        core = sim.nodes[addr]
        final.update(repr([dataclasses.astuple(m) for m in core.members()]).encode())
        final.update(repr(dataclasses.astuple(core.statistics())).encode())
    return final.hexdigest()


def outcome(sim: Simulation) -> str:
    """Every node's final member table, own keys and statistics, without byte counts.

    What gossip decided (members, states, incarnations, key counts and versions,
    coordinators, RTTs, datagram and drop counts), not how many bytes it took.
    """
    final = hashlib.sha256()
    for addr in sorted(sim.nodes):
        core = sim.nodes[addr]
        final.update(repr([dataclasses.astuple(m) for m in core.members()]).encode())
        stats = dataclasses.replace(core.statistics(), bytes_in=0, bytes_out=0)
        final.update(repr(dataclasses.astuple(stats)).encode())
        final.update(repr(sorted(core.ledger.own_keys)).encode())
    return final.hexdigest()


def run(names: list[str], v1: V1Policy = "refuse") -> list[str]:
    """One line per scenario: name, fingerprint, outcome, datagrams delivered and lost."""
    lines = []
    for name in names:
        sim = SCENARIOS[name](v1)
        lines.append(f"{name} {fingerprint(sim)} {outcome(sim)} {sim.delivered} {sim.lost}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the fixed scenarios (all, or those named) and print one hash line each."""
    args = list(argv if argv is not None else sys.argv[1:])
    v1: V1Policy = "only" if "--v1" in args else "refuse"
    names = [arg for arg in args if arg != "--v1"] or list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        print(f"unknown scenario {unknown[0]!r}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    if os.environ.get("PYTHONHASHSEED") != "0":
        print("run with PYTHONHASHSEED=0: the hashes depend on set order", file=sys.stderr)
        return 2
    for line in run(names, v1):
        print(line, flush=True)
    return 0
