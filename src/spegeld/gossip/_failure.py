"""SWIM failure detection for ``GossipCore``: probes, ping-req relays, suspicion expiry.

Split out of ``_core`` for size, not as a separate layer: ``FailureDetector`` is
owned by one core and reads and updates that core's member table directly. It
owns only the probe in flight, the relays it does for others and the probe order
cursor. Refutation stays in the core, since only news about ourselves triggers it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._messages import Ack, Addr, Ping, PingReq, State

# Ping-reqs relayed at once, each held for a probe interval. A member is asked by about
# ``indirect_checks`` others per second; past this a flood from a key holder is ignored
# (``relays_full``) instead of growing the table by its rate.
MAX_RELAYS = 1024

if TYPE_CHECKING:
    from ._core import GossipCore


@dataclass(slots=True)
class Probe:
    seq: int
    target: str
    sent: float
    indirect_at: float
    suspect_at: float
    indirect_sent: bool = False
    helpers: tuple[str, ...] = ()  # asked to ping-req: their relayed acks count too


class FailureDetector:
    def __init__(self, core: GossipCore) -> None:
        self._core = core
        self.probe: Probe | None = None
        # our ping's seq → (who asked, their seq, whom we ping, until when)
        self.relays: dict[int, tuple[Addr, int, str, float]] = {}
        self._cursor = 0

    def deadline(self) -> float | None:
        """When the probe in flight next needs attention, if one is."""
        probe = self.probe
        if probe is None:
            return None
        return probe.suspect_at if probe.indirect_sent else probe.indirect_at

    def on_ping_req(self, addr: Addr, seq: int, target: str, target_addr: Addr, now: float) -> None:
        """Ping ``target`` for the member at ``addr``, and pass its ack back."""
        if len(self.relays) >= MAX_RELAYS:
            self.expire_relays(now)
            if len(self.relays) >= MAX_RELAYS:
                self._core.rejected["relays_full"] += 1
                return
        ours = self.new_seq()
        self.relays[ours] = (addr, seq, target, now + self._core._t.probe_interval)
        self._core._send(target_addr, [Ping(ours)])

    def expire_relays(self, now: float) -> None:
        if self.relays:
            self.relays = {s: r for s, r in self.relays.items() if r[3] > now}

    def start_probe(self, now: float) -> None:
        target = None
        for _ in range(len(self._core._order)):
            if self._cursor >= len(self._core._order):
                self._cursor = 0
                self._core._rng.shuffle(self._core._order)  # SWIM: a fresh random order each round
            peer = self._core._peers.get(self._core._order[self._cursor])
            self._cursor += 1
            if peer is not None and peer.state in (State.ALIVE, State.SUSPECT):
                target = peer
                break
        if target is None:
            return
        seq = self.new_seq()
        self.probe = Probe(
            seq,
            target.node,
            now,
            now + self._core._t.probe_timeout,
            now + self._core._t.probe_interval,
        )
        self._core._send(target.addr, [Ping(seq)])

    def new_seq(self) -> int:
        # Random, not counted: an outsider who replays a member's ack to another node
        # (the header names no destination) would have to hit that node's probe seq.
        return self._core._rng.getrandbits(62)

    def on_ack(self, sender: str, seq: int, now: float) -> None:
        relay = self.relays.get(seq)
        if relay is not None:
            if sender == relay[2]:
                del self.relays[seq]
                self._core._send(relay[0], [Ack(relay[1])])
            return
        probe = self.probe
        if probe is None or probe.seq != seq:
            return
        if sender != probe.target and sender not in probe.helpers:
            self._core.dropped["stray_ack"] += 1
            return
        self.probe = None
        peer = self._core._peers.get(probe.target)
        if peer is None:
            return
        if not probe.indirect_sent:
            sample = now - probe.sent
            peer.rtt = sample if peer.rtt is None else 0.8 * peer.rtt + 0.2 * sample
        if peer.state is State.SUSPECT:
            pass  # only the member itself can refute, with a higher incarnation

    def check_probe(self, now: float) -> None:
        probe = self.probe
        if probe is None:
            return
        target = self._core._peers.get(probe.target)
        if target is None:
            self.probe = None
            return
        if not probe.indirect_sent and now >= probe.indirect_at:
            probe.indirect_sent = True
            helpers = [
                p
                for p in self._core._pick_alive(self._core._t.indirect_checks + 1)
                if p.node != target.node
            ][: self._core._t.indirect_checks]
            probe.helpers = tuple(helper.node for helper in helpers)
            for helper in helpers:
                self._core._send(helper.addr, [PingReq(probe.seq, target.node, target.addr)])
            # And once more directly (memberlist falls back to TCP here): a lost ping or
            # ack is the usual cause, and each false suspicion costs the whole cluster a
            # suspect and a refutation, each passed on 4·log10(N) times by every member.
            self._core._send(target.addr, [Ping(probe.seq)])
        if now >= probe.suspect_at:
            self.probe = None
            if target.state is State.ALIVE:
                self._core._set_state(target, State.SUSPECT, now)
                self._core._broadcast(("member", target.node), target.as_member())

    def suspicion_timeout(self) -> float:
        n = max(1, len(self._core._peers) + 1)
        return self._core._t.suspicion_mult * max(1.0, math.log10(n)) * self._core._t.probe_interval

    def expire_suspects(self, now: float) -> None:
        for node, until in list(self._core._suspects.items()):
            if now >= until:
                peer = self._core._peers[node]
                self._core._set_state(peer, State.DEAD, now)
                self._core._broadcast(("member", peer.node), peer.as_member())
