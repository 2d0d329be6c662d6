"""SWIM failure detection: probes, ping-req relays, suspicion expiry. Sans-I/O.

``FailureDetector`` owns the probe in flight and the relays it does for others. It
reads the member table through its public interface, takes the time as an input,
and returns what the core must do (``_actions``): sends, and members to declare
suspect or dead. Refutation stays in the core, since only news about ourselves
triggers it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

from ._actions import Action, Declare, Send
from ._members import MemberTable
from ._messages import Ack, Addr, Ping, PingReq, State

# Ping-reqs relayed at once, each held for a probe interval. A member is asked by about
# ``indirect_checks`` others per second; past this a flood from a key holder is ignored
# (``relays_full``) instead of growing the table by its rate.
MAX_RELAYS = 1024


@dataclass(slots=True)
class Probe:
    seq: int
    target: str
    sent: float
    indirect_at: float
    suspect_at: float
    indirect_sent: bool = False
    helpers: tuple[str, ...] = ()  # asked to ping-req: their relayed acks count too


@dataclass(frozen=True, slots=True)
class ProbeTimings:
    """The detector's share of the core's ``Timings`` (memberlist's LAN defaults)."""

    probe_interval: float
    probe_timeout: float
    indirect_checks: int
    suspicion_mult: float


class FailureDetector:
    def __init__(
        self,
        members: MemberTable,
        timings: ProbeTimings,
        rng: random.Random,
        rejected: Counter[str],
        dropped: Counter[str],
    ) -> None:
        self._members = members
        self._t = timings
        self._rng = rng
        self._rejected = rejected  # the core's tallies, by reason
        self._dropped = dropped
        self.probe: Probe | None = None
        # our ping's seq → (who asked, their seq, whom we ping, until when)
        self.relays: dict[int, tuple[Addr, int, str, float]] = {}

    def deadline(self) -> float | None:
        """When the probe in flight next needs attention, if one is."""
        probe = self.probe
        if probe is None:
            return None
        return probe.suspect_at if probe.indirect_sent else probe.indirect_at

    def suspicion_timeout(self) -> float:
        n = max(1, len(self._members) + 1)
        return self._t.suspicion_mult * max(1.0, math.log10(n)) * self._t.probe_interval

    def on_ping_req(
        self, addr: Addr, seq: int, target: str, target_addr: Addr, now: float
    ) -> list[Action]:
        """Ping ``target`` for the member at ``addr``, and pass its ack back."""
        if len(self.relays) >= MAX_RELAYS:
            self.expire_relays(now)
            if len(self.relays) >= MAX_RELAYS:
                self._rejected["relays_full"] += 1
                return []
        ours = self._new_seq()
        self.relays[ours] = (addr, seq, target, now + self._t.probe_interval)
        return [Send(target_addr, (Ping(ours),))]

    def expire_relays(self, now: float) -> None:
        if self.relays:
            self.relays = {s: r for s, r in self.relays.items() if r[3] > now}

    def start_probe(self, now: float) -> list[Action]:
        target = self._members.next_to_probe()
        if target is None:
            return []
        seq = self._new_seq()
        self.probe = Probe(
            seq, target.node, now, now + self._t.probe_timeout, now + self._t.probe_interval
        )
        return [Send(target.addr, (Ping(seq),))]

    def _new_seq(self) -> int:
        # Random, not counted: an outsider who replays a member's ack to another node
        # (the header names no destination) would have to hit that node's probe seq.
        return self._rng.getrandbits(62)

    def on_ack(self, sender: str, seq: int, now: float) -> list[Action]:
        relay = self.relays.get(seq)
        if relay is not None:
            if sender == relay[2]:
                del self.relays[seq]
                return [Send(relay[0], (Ack(relay[1]),))]
            return []
        probe = self.probe
        if probe is None or probe.seq != seq:
            return []
        if sender != probe.target and sender not in probe.helpers:
            self._dropped["stray_ack"] += 1
            return []
        self.probe = None
        peer = self._members.get(probe.target)
        if peer is not None and not probe.indirect_sent:
            self._members.record_rtt(peer, now - probe.sent)
        # A suspect stays suspect: only the member itself can refute, with a higher incarnation.
        return []

    def check_probe(self, now: float) -> list[Action]:
        probe = self.probe
        if probe is None:
            return []
        target = self._members.get(probe.target)
        if target is None:
            self.probe = None
            return []
        actions: list[Action] = []
        if not probe.indirect_sent and now >= probe.indirect_at:
            probe.indirect_sent = True
            helpers = [
                p
                for p in self._members.pick_alive(self._t.indirect_checks + 1)
                if p.node != target.node
            ][: self._t.indirect_checks]
            probe.helpers = tuple(helper.node for helper in helpers)
            for helper in helpers:
                actions.append(Send(helper.addr, (PingReq(probe.seq, target.node, target.addr),)))
            # And once more directly (memberlist falls back to TCP here): a lost ping or
            # ack is the usual cause, and each false suspicion costs the whole cluster a
            # suspect and a refutation, each passed on 4·log10(N) times by every member.
            actions.append(Send(target.addr, (Ping(probe.seq),)))
        if now >= probe.suspect_at:
            self.probe = None
            if target.state is State.ALIVE:
                actions.append(Declare(target.node, State.SUSPECT))
        return actions

    def expire_suspects(self, now: float) -> list[Action]:
        return [Declare(node, State.DEAD) for node in self._members.suspects_due(now)]
