"""A deterministic network simulator for the gossip core: thousands of nodes, one process.

Time is simulated; the network delays, loses and partitions datagrams by rule
and by a seeded random generator, so a run is repeatable to the byte. The
benchmark (bench/gossip.py) and the protocol tests drive it.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ._config import GossipConfig, Timings
from ._core import GossipCore
from ._messages import Addr
from ._security import Keyring
from ._wire import V1Policy


@dataclass
class NetworkRules:
    loss: float = 0.0  # probability a datagram is dropped
    delay: float = 0.002  # seconds, one way
    jitter: float = 0.001  # seconds, uniform extra delay
    blocked: Callable[[Addr, Addr], bool] = field(default=lambda src, dst: False)


class Simulation:
    def __init__(
        self,
        n: int,
        *,
        seed: int = 1,
        rules: NetworkRules | None = None,
        timings: Timings | None = None,
        keyring: Keyring | None = None,
        seeds: int = 1,
        start_joined: bool = False,
        v1: V1Policy = "refuse",
    ) -> None:
        self.rng = random.Random(seed)
        # Version 2's nonces, repeatable but apart from ``rng``: a run draws from ``rng``
        # exactly as often in either datagram version ("only" is version 1, "refuse" 2).
        self.v1 = v1
        self._nonces = random.Random(f"nonces {seed}")
        self.rules = rules or NetworkRules()
        self.now = 0.0
        self.keyring = keyring or Keyring([(1, b"s" * 32)])
        self.timings = timings or Timings()
        self.nodes: dict[Addr, GossipCore] = {}
        self.down: set[Addr] = set()
        self._events: list[tuple[float, int, bytes, Addr, Addr]] = []
        self._timers: list[tuple[float, int, Addr]] = []
        self._live_timer: dict[Addr, int] = {}  # the one heap entry per node that counts
        self._tie = 0
        self.bytes_sent: dict[Addr, int] = {}
        self.delivered = 0
        self.lost = 0
        self.events = 0  # events the cores emitted
        # Every datagram any core emits, in order, with its time and ends: two runs of one
        # scenario behaved the same exactly when their traces hash the same.
        self.trace = hashlib.sha256()
        seed_addrs = tuple(self.addr(i) for i in range(min(seeds, n)))
        for i in range(n):
            self.add_node(i, seeds=() if i < len(seed_addrs) and not start_joined else seed_addrs)
        if start_joined:
            self._introduce_all()

    @staticmethod
    def addr(i: int) -> Addr:
        return (f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 7946)

    def add_node(self, i: int, *, seeds: tuple[Addr, ...], incarnation: int = 1) -> GossipCore:
        addr = self.addr(i)
        config = GossipConfig(
            node=f"node-{i}",
            addr=addr,
            mirror=f"{addr[0]}:5000",
            incarnation=incarnation,
            seeds=tuple(s for s in seeds if s != addr),
            timings=self.timings,
            v1=self.v1,
        )
        rng = random.Random(self.rng.random())
        core = GossipCore(config, self.keyring, rng, self.now, self._nonces.randbytes)
        self.nodes[addr] = core
        self.down.discard(addr)
        self.bytes_sent.setdefault(addr, 0)
        self._schedule(addr)
        return core

    def _introduce_all(self) -> None:
        """Skip the join phase: every node knows every member and its (empty) key set.

        Joining costs every node a state pull from every other, N squared
        datagrams; big simulations measure the steady state, so they start there.
        """
        members = [core.self_member() for core in self.nodes.values()]
        for core in self.nodes.values():
            # Straight into the member table: merging would queue N news items and
            # send N state pulls per node only to throw them away.
            for member in members:
                if member.node != core.node and member.node not in core.members_table:
                    peer = core.members_table.add(member, self.now)
                    peer.keys.version = peer.keys.claimed = member.version

    def _schedule(self, addr: Addr) -> None:
        self._tie += 1
        self._live_timer[addr] = self._tie
        heapq.heappush(self._timers, (self.nodes[addr].next_deadline(), self._tie, addr))

    def kill(self, i: int) -> None:
        self.down.add(self.addr(i))

    def leave(self, i: int) -> None:
        """Node ``i`` says goodbye (its farewells go out now), then stops."""
        self.nodes[self.addr(i)].leave(self.now)
        self._flush(self.addr(i))
        self.kill(i)

    def advertise(self, i: int, keys: list[str], *, urgent: bool = False) -> None:
        """Node ``i`` advertises ``keys`` now; what it sends at once leaves now too."""
        self.nodes[self.addr(i)].advertise(keys, urgent=urgent)
        self._flush(self.addr(i))

    def _flush(self, addr: Addr) -> None:
        core = self.nodes[addr]
        while core.next_event() is not None:  # nobody here reacts; just keep the queue short
            self.events += 1
        for datagram, dst in core.datagrams_to_send(self.now):
            self.bytes_sent[addr] += len(datagram)
            self.trace.update(f"{self.now!r} {addr} {dst} {len(datagram)}\n".encode())
            self.trace.update(datagram)
            if (
                dst in self.down
                or dst not in self.nodes
                or self.rules.blocked(addr, dst)
                or self.rng.random() < self.rules.loss
            ):
                self.lost += 1
                continue
            arrival = self.now + self.rules.delay + self.rng.random() * self.rules.jitter
            self._tie += 1
            heapq.heappush(self._events, (arrival, self._tie, datagram, addr, dst))

    def run_until(self, deadline: float, *, stop: Callable[[], bool] | None = None) -> float:
        """Advance to ``deadline`` (or until ``stop()``); returns the time reached."""
        while True:
            next_event = self._events[0][0] if self._events else float("inf")
            next_timer = self._timers[0][0] if self._timers else float("inf")
            at = min(next_event, next_timer)
            if at > deadline:
                self.now = deadline
                return self.now
            self.now = at
            if next_event <= next_timer:
                _, _, datagram, src, dst = heapq.heappop(self._events)
                if dst in self.down:
                    continue
                self.delivered += 1
                self.nodes[dst].receive(datagram, src, self.now)
                self._flush(dst)
                self._schedule(dst)
            else:
                _, tie, addr = heapq.heappop(self._timers)
                core = self.nodes[addr]
                if addr in self.down or self._live_timer.get(addr) != tie:
                    continue
                if core.next_deadline() <= self.now:
                    core.handle_timer(self.now)
                    self._flush(addr)
                self._schedule(addr)
            if stop is not None and stop():
                return self.now
