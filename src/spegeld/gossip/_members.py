"""The member table: what this node holds about every other member. Sans-I/O.

``MemberTable`` owns the records (``PeerRecord``), their table slots (a slot is a
member's bit in ``HolderTable``; a forgotten member's slot is reused), the index by
gossip address (to recognise seeds), the SWIM probe order, and who is suspect (until
when) and dead or left (since when). The core, the failure detector and anti-entropy
read and change members only through its methods.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from spegeld.routing import CoordinatorView, NodeId, Peer

from ._messages import Addr, Member, State
from ._ownership import PeerKeys


@dataclass(slots=True)
class PeerRecord:
    """What this node holds about one member."""

    node: str
    slot: int
    incarnation: int
    state: State
    addr: Addr
    mirror: str  # the member's mirror, host:port
    coordinator: bool
    since: float  # when the state last changed
    keys: PeerKeys  # anti-entropy's account of the member's key set
    rtt: float | None = None

    def as_member(self) -> Member:
        """This record as gossip carries it."""
        return Member(
            self.node,
            self.incarnation,
            self.state,
            self.addr,
            self.mirror,
            self.keys.version,
            self.coordinator,
        )

    def superseded_by(self, member: Member) -> bool:
        """Whether ``member`` is newer news than this record, and replaces it."""
        if member.state is State.ALIVE:
            return member.incarnation > self.incarnation or (
                member.incarnation == self.incarnation
                and self.state is State.ALIVE
                and (member.addr, member.mirror, member.coordinator)
                != (self.addr, self.mirror, self.coordinator)
            )
        if member.state is State.SUSPECT:
            return member.incarnation > self.incarnation or (
                member.incarnation == self.incarnation and self.state is State.ALIVE
            )
        return member.incarnation >= self.incarnation and self.state not in (State.DEAD, State.LEFT)


@dataclass(frozen=True, slots=True)
class MemberView:
    node: str
    state: str
    incarnation: int
    addr: str
    mirror: str  # the member's mirror, host:port
    rtt_ms: float | None
    keys: int
    version: int
    coordinator: bool


class MemberTable:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._peers: dict[str, PeerRecord] = {}
        self._slots: list[PeerRecord | None] = []  # table slot → member (None: free)
        self._free_slots: list[int] = []  # slots of forgotten members, for reuse
        self._dead: dict[str, float] = {}  # dead or left members → since when
        self._by_addr: dict[Addr, str] = {}  # gossip address → member, to recognise seeds
        self._order: list[str] = []  # every known peer, in probe order (shuffled per round)
        self._cursor = 0  # the next place in _order to probe
        self._suspects: dict[str, float] = {}  # node → when its suspicion ends

    # ---- reading ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, node: object) -> bool:
        return node in self._peers

    def __iter__(self) -> Iterator[PeerRecord]:
        return iter(self._peers.values())

    def get(self, node: str) -> PeerRecord | None:
        return self._peers.get(node)

    def at_slot(self, slot: int) -> PeerRecord | None:
        return self._slots[slot]

    def slot_count(self) -> int:
        """Slots in use or free: ``at_slot`` takes 0 up to this."""
        return len(self._slots)

    def at_addr(self, addr: Addr) -> PeerRecord | None:
        node = self._by_addr.get(addr)
        return None if node is None else self._peers.get(node)

    def name_at(self, addr: Addr) -> str | None:
        """The member registered at gossip address ``addr``, if any."""
        node = self._by_addr.get(addr)
        return node if node in self._peers else None

    def alive_count(self) -> int:
        return sum(1 for p in self._peers.values() if p.state is State.ALIVE)

    def suspicion_ends(self) -> float | None:
        """When the first suspicion runs out, if any member is suspect."""
        return min(self._suspects.values()) if self._suspects else None

    def suspects_due(self, now: float) -> list[str]:
        """Suspects whose suspicion has run out by ``now``, in the order they were suspected."""
        return [node for node, until in self._suspects.items() if now >= until]

    def dead(self) -> list[str]:
        """Members held as dead (not left), in the order they died."""
        return [node for node in self._dead if self._peers[node].state is State.DEAD]

    def dead_longer_than(self, now: float, seconds: float) -> list[str]:
        """Dead or left members that have been so for more than ``seconds``."""
        return [node for node, since in self._dead.items() if now - since > seconds]

    def pick_alive(self, count: int, *, suspect: bool = False) -> list[PeerRecord]:
        """Up to ``count`` distinct random alive (or suspect) peers, without scanning them all."""
        picked: dict[str, PeerRecord] = {}
        for _ in range(count * 4):
            if len(picked) >= count or not self._order:
                break
            peer = self._peers.get(self._order[self._rng.randrange(len(self._order))])
            if peer is not None and (
                peer.state is State.ALIVE or (suspect and peer.state is State.SUSPECT)
            ):
                picked[peer.node] = peer
        return list(picked.values())

    def rank(self, slots: Iterable[int], count: int) -> list[Peer]:
        """The best ``count`` members of those in ``slots``: alive before suspect, then by
        RTT, never dead or left. Equal ones come in random order, to spread the load."""
        at_slot = self._slots
        found: list[tuple[int, float, float, int]] = []
        for slot in slots:
            peer = at_slot[slot]
            if peer is None:
                continue
            if peer.state is State.ALIVE:
                rank = 0
            elif peer.state is State.SUSPECT:
                rank = 1
            else:
                continue
            rtt = peer.rtt if peer.rtt is not None else 1.0
            found.append((rank, rtt, self._rng.random(), slot))
        best = heapq.nsmallest(count, found) if count < len(found) else sorted(found)
        return [Peer(NodeId(p.node), p.mirror) for p in (at_slot[e[3]] for e in best) if p]

    def next_to_probe(self) -> PeerRecord | None:
        """The next alive or suspect member in probe order; a fresh random order each round."""
        for _ in range(len(self._order)):
            if self._cursor >= len(self._order):
                self._cursor = 0
                self._rng.shuffle(self._order)  # SWIM: a fresh random order each round
            peer = self._peers.get(self._order[self._cursor])
            self._cursor += 1
            if peer is not None and peer.state in (State.ALIVE, State.SUSPECT):
                return peer
        return None

    def views(self, key_count: Callable[[int], int]) -> list[MemberView]:
        """The member table as ``/status`` shows it, by node name."""
        views = [
            MemberView(
                node=peer.node,
                state=peer.state.name.lower(),
                incarnation=peer.incarnation,
                addr=_host_port(*peer.addr),
                mirror=peer.mirror,
                rtt_ms=None if peer.rtt is None else round(peer.rtt * 1000, 3),
                keys=key_count(peer.slot),
                version=peer.keys.version,
                coordinator=peer.coordinator,
            )
            for peer in self._peers.values()
        ]
        return sorted(views, key=lambda v: v.node)

    def coordinator_view(self) -> tuple[CoordinatorView, str | None]:
        """What the table says about the coordinator, when it is not this node.

        ALIVE: a live member leads, so followers leave the API alone. GONE: members exist
        but none alive leads (the coordinator is suspect, dead, left, or stepped down).
        NONE: no members at all, so no view.
        """
        members = list(self._peers.values())
        flagged = [p for p in members if p.coordinator]
        alive = [p for p in flagged if p.state is State.ALIVE]
        if alive:
            return CoordinatorView.ALIVE, max(alive, key=lambda p: p.incarnation).node
        if not members:
            return CoordinatorView.NONE, None
        gone = max(flagged, key=lambda p: p.incarnation).node if flagged else None
        return CoordinatorView.GONE, gone

    # ---- changing -----------------------------------------------------------------------

    def add(self, member: Member, now: float) -> PeerRecord:
        """A member heard of for the first time (one first heard of as suspect: ``suspect``)."""
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = len(self._slots)
            self._slots.append(None)
        peer = PeerRecord(
            member.node,
            slot,
            member.incarnation,
            member.state,
            member.addr,
            member.mirror,
            member.coordinator,
            now,
            PeerKeys(),
        )
        self._peers[member.node] = peer
        self._slots[slot] = peer
        # At a random place, as memberlist does: appended in the order they were learned,
        # every node would probe the same member in the same second of its first round.
        self._order.append(member.node)
        spot = self._rng.randrange(len(self._order))
        self._order[spot], self._order[-1] = self._order[-1], self._order[spot]
        self._by_addr[member.addr] = member.node
        return peer

    def suspect(self, peer: PeerRecord, until: float) -> None:
        """Hold ``peer``'s suspicion until ``until`` (it is suspect already)."""
        self._suspects[peer.node] = until

    def update(self, peer: PeerRecord, member: Member) -> None:
        """Take newer news about ``peer`` (its state apart: ``set_state``)."""
        if peer.addr != member.addr:
            if self._by_addr.get(peer.addr) == peer.node:
                del self._by_addr[peer.addr]
            self._by_addr[member.addr] = peer.node
        peer.incarnation, peer.addr = member.incarnation, member.addr
        peer.mirror, peer.coordinator = member.mirror, member.coordinator

    def set_state(self, peer: PeerRecord, state: State, now: float, suspicion: float) -> bool:
        """Move ``peer`` to ``state``; False if it was there already.

        A dead or left member's key account starts over; the caller drops its keys.
        """
        if state is peer.state:
            return False
        peer.state, peer.since = state, now
        self._suspects.pop(peer.node, None)
        self._dead.pop(peer.node, None)
        if state is State.SUSPECT:
            self._suspects[peer.node] = now + suspicion
        elif state in (State.DEAD, State.LEFT):
            peer.keys.reset()
            self._dead[peer.node] = now
        return True

    def record_rtt(self, peer: PeerRecord, sample: float) -> None:
        peer.rtt = sample if peer.rtt is None else 0.8 * peer.rtt + 0.2 * sample

    def forget(self, node: str) -> PeerRecord:
        """Drop a dead or left member for good, freeing its slot."""
        peer = self._peers.pop(node)
        del self._dead[node]
        self._slots[peer.slot] = None
        self._free_slots.append(peer.slot)
        self._order.remove(node)
        if self._by_addr.get(peer.addr) == node:
            del self._by_addr[peer.addr]
        return peer


def _host_port(host: str, port: int) -> str:
    """``10.0.0.1:7946`` or ``[fd00::1]:7946``, as mirror addresses are written."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
