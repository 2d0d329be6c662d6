"""The gossip protocol core: SWIM membership plus versioned key ownership. Sans-I/O.

Inputs are datagrams and the time, ``receive(datagram, addr, now)`` and
``handle_timer(now)``; outputs are ``datagrams_to_send(now)`` and
``next_deadline()``. There are no sockets, no trio and no clock in here, so a
simulator can run thousands of nodes in one process and tests can set time.

Membership is SWIM: a probe every ``probe_interval`` (ping, then ping-req
through ``indirect_checks`` members), then suspect, then dead, with
incarnation numbers so a node can refute a suspicion. News is piggybacked on
every datagram and gossiped to ``gossip_nodes`` members every
``gossip_interval``, each item ``retransmit_mult * ceil(log10(N + 1))`` times.

Ownership: each node's keys carry a version. A change is a Delta for the next
version, gossiped like membership news. A receiver applies deltas in version
order, holding back any that arrive early. Anti-entropy repairs the rest:
every ``sync_interval`` a node sends a Summary of some members (with the
version it holds of each) to a random member, which answers with its own
view of them; whoever sees a newer version pulls that node's whole key set in
chunks (StatePull, StateChunk). A gap that stays open pulls from the owner.

Healing: a dead record yields only to a higher incarnation from the node
itself, so every ``RECONNECT_INTERVAL`` a node sends one dead member a Summary
carrying that member's record as we hold it (Serf's reconnect): if it was a
partition and not a crash, the member refutes, and its answer carries our
record, which we refute in turn. A node whose seeds all look dead joins one
again, and a seed answers a joiner it holds as dead with that record too.

docs/protocol.md describes the wire format and these rules in full.

This module holds the member table, the public interface, message dispatch,
membership merging (and refutation) and the sending of datagrams; failure
detection is in ``_failure`` and anti-entropy in ``_sync``, each a helper the
core owns. The configuration and report types are in ``_records``.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from dataclasses import replace

from spegeld.errors import RemoteProtocolError
from spegeld.routing import NodeId, Peer

from ._codec import MAX_INCARNATION, decode_payload, encode_message, encode_sender, valid_key
from ._failure import FailureDetector, Probe
from ._messages import (
    Ack,
    Addr,
    Delta,
    Join,
    Member,
    Message,
    Ping,
    PingReq,
    State,
    StateChunk,
    StatePull,
    Summary,
)
from ._ownership import KeyLedger, PeerKeys
from ._queue import BroadcastQueue
from ._records import (
    CoordinatorState,
    GossipConfig,
    GossipStatistics,
    MemberView,
    PeerRecord,
    Timings,
    coordinator_view,
    member_views,
)
from ._security import MAX_PAYLOAD, DroppedPacket, Keyring, ReplayWindow, open_datagram, seal
from ._sync import CHUNK_OVERHEAD, AntiEntropy
from ._table import HolderTable
from ._validate import Validator, check_own_identity, valid_gossip_addr

__all__ = [
    "CHUNK_OVERHEAD",
    "MAX_MEMBERS",
    "MEMBER_RESERVE",
    "RECONNECT_INTERVAL",
    "REPLAY_WINDOW",
    "CoordinatorState",
    "GossipConfig",
    "GossipCore",
    "GossipStatistics",
    "MemberView",
    "Timings",
]

RECONNECT_INTERVAL = 10.0  # seconds between tries at a dead member or lost seeds (Serf: 30 s)
# Sequence numbers accepted behind the newest one seen from a sender. A state pull is
# answered with a burst of chunks (about 70 for 2000 digests), and a burst that arrives
# reordered must not fall out of the window: the 64 that IPsec uses would drop the first
# chunks of any burst longer than that.
REPLAY_WINDOW = 256
_MAX_SEQUENCE = 0xFFFF_FFFF  # the datagram header's u32
# Piggyback bytes kept for membership news when ownership deltas go first. Deltas are
# rare and are what the cluster is for, but under heavy loss the stream of suspicions
# and refutations outruns what datagrams can carry, and a delta queued behind it took
# 20 s or more to spread; membership still gets about five records per datagram.
MEMBER_RESERVE = 256
# Members held at most: ten times DESIGN's 1000 nodes. Past it a new name is ignored
# (``members_full``), so a key holder inventing names cannot grow the table without end;
# dead members are forgotten after ``dead_forget`` and free their places.
MAX_MEMBERS = 10_000


def _never(message: Message) -> bool:
    return False


class GossipCore:
    def __init__(self, config: GossipConfig, keyring: Keyring, rng: random.Random, now: float):
        check_own_identity(config.node, config.addr, config.registry, config.incarnation)
        self.config = config
        self.node = config.node
        self._t = config.timings
        self._keyring = keyring
        self._rng = rng
        self.incarnation = config.incarnation
        self.coordinator = False
        self.ledger = KeyLedger(version_base=config.incarnation << 20)
        self.table = HolderTable()
        self._peers: dict[str, PeerRecord] = {}
        self._slots: list[PeerRecord | None] = []  # table slot → member (None: free)
        self._free_slots: list[int] = []  # slots of forgotten members, for reuse
        self._dead: dict[str, float] = {}  # dead or left members → since when
        self._by_addr: dict[Addr, str] = {}  # gossip address → member, to recognise seeds
        self._sender = encode_sender(config.node)  # every payload starts with it
        self._replay = ReplayWindow(window=REPLAY_WINDOW)
        self._queue = BroadcastQueue(self._t.retransmit_mult)  # membership news
        self._deltas = BroadcastQueue(self._t.retransmit_mult)  # ownership news
        self._outbox: list[tuple[bytes, Addr]] = []
        self._sequence = 0
        self._order: list[str] = []  # every known peer, in probe order (shuffled per round)
        self._suspects: dict[str, float] = {}  # node → when its suspicion ends
        self._detector = FailureDetector(self)
        self._sync = AntiEntropy(self)
        self._next_probe = now + rng.random() * self._t.probe_interval
        self._next_gossip = now + rng.random() * self._t.gossip_interval
        self._next_sync = now + rng.random() * self._t.sync_interval
        self._next_join = now
        self._next_reconnect = now + (1 + rng.random()) * RECONNECT_INTERVAL
        self.counters: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # whole datagrams, by reason
        self.rejected: Counter[str] = Counter()  # records and messages ignored, by reason
        self.validator = Validator(config.node, config.incarnation, now)

    @property
    def _probe(self) -> Probe | None:
        """The probe in flight (tests look at it)."""
        return self._detector.probe

    @property
    def _sync_cursor(self) -> int:
        """Where the next Summary's window starts (tests look at it)."""
        return self._sync.cursor

    @property
    def key_fingerprint(self) -> str:
        return self._keyring.fingerprint()

    def set_keyring(self, keyring: Keyring) -> None:
        """Seal and open with ``keyring`` from now on (a key rotation step, on SIGHUP)."""
        self._keyring = keyring

    # ---- local commands -------------------------------------------------------------

    def advertise(self, keys: set[str] | frozenset[str] | list[str]) -> None:
        """Announce ``keys``; a key no peer's decoder would accept is skipped and counted.

        One such key would make every datagram that carries it undecodable.
        """
        good = [key for key in keys if valid_key(key)]
        if len(good) != len(keys):
            self.counters["keys_rejected"] += len(keys) - len(good)
        for delta in self.ledger.change(self.node, added=good, removed=()):
            self._broadcast(("delta", self.node, delta.version), delta)

    def withdraw(self, keys: set[str] | frozenset[str] | list[str]) -> None:
        for delta in self.ledger.change(self.node, added=(), removed=keys):
            self._broadcast(("delta", self.node, delta.version), delta)

    def set_coordinator(self, coordinator: bool) -> None:
        if coordinator != self.coordinator:
            self.coordinator = coordinator
            self._raise_incarnation(self.incarnation)

    def leave(self, now: float) -> None:
        """Tell a few members we are going, so nobody waits out a suspicion."""
        self.incarnation = min(self.incarnation + 1, MAX_INCARNATION)
        farewell = Member(
            self.node,
            self.incarnation,
            State.LEFT,
            self.config.addr,
            self.config.registry,
            self.ledger.version,
            self.coordinator,
        )
        for peer in self._pick_alive(self._t.gossip_nodes * 2):
            self._send(peer.addr, [farewell], piggyback=False)

    def lookup(self, key: str, count: int) -> list[Peer]:
        """Holders of ``key``: alive before suspect, then by RTT; never this node.

        Equal holders come in random order, to spread the load between them.
        """
        slots = self._slots
        found: list[tuple[int, float, float, int]] = []
        for slot in self.table.holders(key):
            peer = slots[slot]
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
        return [Peer(NodeId(p.node), p.registry) for p in (slots[e[3]] for e in best) if p]

    def members(self) -> list[MemberView]:
        return member_views(self._peers.values(), self.table.count_of)

    def coordinator_peer(self) -> str | None:
        state, node = self.coordinator_view()
        return node if state in (CoordinatorState.SELF, CoordinatorState.ALIVE) else None

    def coordinator_view(self) -> tuple[CoordinatorState, str | None]:
        """What gossip says about the coordinator, for the elector (``_records``)."""
        if self.coordinator:
            return CoordinatorState.SELF, self.node
        return coordinator_view(self._peers.values())

    def add_seed(self, addr: Addr) -> None:
        """Join through ``addr`` too (the coordinator's address, read from the Lease)."""
        if addr != self.config.addr and addr not in self.config.seeds:
            self.config = replace(self.config, seeds=(*self.config.seeds, addr))

    def alive_count(self) -> int:
        return sum(1 for p in self._peers.values() if p.state is State.ALIVE)

    def statistics(self) -> GossipStatistics:
        states = Counter(p.state.name.lower() for p in self._peers.values())
        return GossipStatistics(
            node=self.node,
            incarnation=self.incarnation,
            own_keys=len(self.ledger.own_keys),
            own_version=self.ledger.version,
            known_keys=len(self.table),
            members=dict(states),
            packets_in=self.counters["packets_in"],
            packets_out=self.counters["packets_out"],
            bytes_in=self.counters["bytes_in"],
            bytes_out=self.counters["bytes_out"],
            dropped=dict(self.dropped),
            rejected=dict(self.rejected),
        )

    # ---- sans-I/O interface ------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out, self._outbox = self._outbox, []
        return out

    def next_deadline(self) -> float:
        deadline = min(self._next_probe, self._next_gossip, self._next_sync, self._next_reconnect)
        probe = self._detector.deadline()
        if probe is not None:
            deadline = min(deadline, probe)
        if self.config.seeds and not self._peers:
            deadline = min(deadline, self._next_join)
        if self._suspects:
            deadline = min(deadline, *self._suspects.values())
        return deadline

    def receive(self, datagram: bytes, addr: Addr, now: float) -> None:
        self.counters["packets_in"] += 1
        self.counters["bytes_in"] += len(datagram)
        try:
            opened = open_datagram(self._keyring, datagram)
            sender, messages = decode_payload(opened.payload)
        except DroppedPacket as exc:
            self.dropped[exc.reason] += 1
            return
        except RemoteProtocolError:
            self.dropped["malformed"] += 1
            return
        if sender == self.node:
            self.dropped["self"] += 1
            return
        if not self._replay.check_and_record(sender, opened.incarnation, opened.sequence):
            self.dropped["replay"] += 1
            return
        for message in messages:
            self._handle(sender, addr, message, now)

    def handle_timer(self, now: float) -> None:
        if self.config.seeds and not self._peers and now >= self._next_join:
            for seed in self.config.seeds:
                self._send(seed, [Join(self._self_member())], piggyback=False)
            self._next_join = now + self._t.join_retry
        self._detector.check_probe(now)
        if now >= self._next_probe:
            self._detector.start_probe(now)
            self._next_probe = now + self._t.probe_interval
        self._detector.expire_suspects(now)
        if now >= self._next_gossip:
            self._gossip()
            self._next_gossip = now + self._t.gossip_interval
        if now >= self._next_sync:
            self._sync.pull_lagging(now)
            self._sync.send_summary(now)
            self._forget_dead(now)
            self._next_sync = now + self._t.sync_interval
        if now >= self._next_reconnect:
            self._sync.reconnect()
            self._next_reconnect = now + RECONNECT_INTERVAL
        self._detector.expire_relays(now)

    # ---- message handling -----------------------------------------------------------

    def _handle(self, sender: str, addr: Addr, message: Message, now: float) -> None:
        match message:
            case Ping(seq):
                self._send(addr, [Ack(seq)])
            case Ack(seq):
                self._detector.on_ack(sender, seq, now)
            case PingReq(seq, target, target_addr):
                if valid_gossip_addr(target_addr):
                    self._detector.on_ping_req(addr, seq, target, target_addr, now)
                else:
                    self.rejected["address"] += 1
            case Member():
                self._merge(message, now, source=addr)
            case Delta():
                self._sync.on_delta(message, now)
            case Summary(members, reply):
                for member in members:
                    self._merge(member, now, source=addr)
                if not reply:
                    self._sync.answer_summary(members, addr)
            case StatePull(node, have):
                self._sync.on_state_pull(node, have, addr)
            case StateChunk():
                self._sync.on_chunk(message, now)
            case Join(member):
                if self._merge(member, now, source=addr):
                    self._sync.send_member_list(addr, member.node)

    def _merge(self, member: Member, now: float, source: Addr) -> bool:
        """Take in news about a member; False if the record was rejected (``_validate``)."""
        reason = self.validator.problem(member, now)
        full = len(self._peers) >= MAX_MEMBERS
        if reason is None and full and member.node not in self._peers and member.node != self.node:
            reason = "members_full"
        if reason is not None:
            self.rejected[reason] += 1
            return False
        if member.node == self.node:
            self._merge_self(member)
            return True
        peer = self._peers.get(member.node)
        if peer is None:
            if member.state in (State.DEAD, State.LEFT):
                return True
            peer = self._add_peer(member, now)
            self._broadcast(("member", member.node), member)
        elif not peer.superseded_by(member):
            if peer.state is State.ALIVE or peer.state is State.SUSPECT:
                self._sync.want_version(peer, member.version, source, now)
            return True
        else:
            if peer.addr != member.addr:
                if self._by_addr.get(peer.addr) == peer.node:
                    del self._by_addr[peer.addr]
                self._by_addr[member.addr] = peer.node
            peer.incarnation, peer.addr = member.incarnation, member.addr
            peer.registry, peer.coordinator = member.registry, member.coordinator
            self._set_state(peer, member.state, now)
            self._broadcast(("member", member.node), member)
        if member.state is State.ALIVE or member.state is State.SUSPECT:
            self._sync.want_version(peer, member.version, source, now)
        return True

    def _merge_self(self, member: Member) -> None:
        """News about this node: refute anything but our own current word."""
        if member.version > self.ledger.version:
            # An earlier life of ours got further: count past it, so that peers holding
            # its keys see a newer version and pull our whole (current) set.
            self.ledger.jump(member.version)
            self._raise_incarnation(max(self.incarnation, member.incarnation))
        elif member.incarnation > self.incarnation or (
            member.state is not State.ALIVE and member.incarnation >= self.incarnation
        ):
            self._raise_incarnation(member.incarnation)  # refute: we are alive

    def _raise_incarnation(self, above: int) -> None:
        """Take an incarnation above ``above`` and say so, so our record wins everywhere."""
        if above >= MAX_INCARNATION:
            self.counters["incarnation_exhausted"] += 1  # only a key holder can push us here
            return
        self.incarnation = max(self.incarnation, above + 1)
        self._broadcast(("member", self.node), self._self_member())

    def _add_peer(self, member: Member, now: float) -> PeerRecord:
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
            member.registry,
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
        if member.state is State.SUSPECT:  # heard of first as suspect: it may never refute
            self._suspects[member.node] = now + self._detector.suspicion_timeout()
        return peer

    def _set_state(self, peer: PeerRecord, state: State, now: float) -> None:
        if state is peer.state:
            return
        peer.state, peer.since = state, now
        self._suspects.pop(peer.node, None)
        self._dead.pop(peer.node, None)
        if state is State.SUSPECT:
            self._suspects[peer.node] = now + self._detector.suspicion_timeout()
        elif state in (State.DEAD, State.LEFT):
            self.table.drop(peer.slot)
            peer.keys.reset()
            self._dead[peer.node] = now

    def _forget_dead(self, now: float) -> None:
        """Drop records dead for ``dead_forget``: after that, only a seed can reconnect us."""
        for node, since in list(self._dead.items()):
            if now - since > self._t.dead_forget:
                peer = self._peers.pop(node)
                del self._dead[node]
                self._slots[peer.slot] = None
                self._free_slots.append(peer.slot)
                self._order.remove(node)
                self._sync.lagging.discard(node)
                self._replay.forget(node)  # a later life at an incarnation not above is heard
                if self._by_addr.get(peer.addr) == node:
                    del self._by_addr[peer.addr]

    # ---- dissemination ------------------------------------------------------------------

    def _gossip(self) -> None:
        if not (len(self._queue) or len(self._deltas)):
            return
        # Suspects too, as memberlist does: gossip is how a suspect hears that it is one
        # (and refutes), and how it keeps up with keys meanwhile.
        for peer in self._pick_alive(self._t.gossip_nodes, suspect=True):
            self._send(peer.addr, [])

    def _broadcast(self, subject: tuple[str, ...] | tuple[str, str, int], message: Message) -> None:
        queue = self._deltas if isinstance(message, Delta) else self._queue
        queue.put(subject, message, encode_message(message))

    def _send(self, addr: Addr, messages: list[Message], *, piggyback: bool = True) -> None:
        self._send_parts(addr, [encode_message(m) for m in messages], piggyback=piggyback)

    def _send_parts(self, addr: Addr, encoded: list[bytes], *, piggyback: bool = True) -> None:
        parts = [self._sender, *encoded]
        room = MAX_PAYLOAD - sum(map(len, parts))
        if piggyback and room > 32:
            size = len(self._peers) + 1
            news = self._deltas.take(max(0, room - MEMBER_RESERVE), size, _never)
            room -= sum(map(len, news))
            news += self._queue.take(room, size, _never)
            room = MAX_PAYLOAD - sum(map(len, parts)) - sum(map(len, news))
            if room > 32 and len(self._deltas):
                news += self._deltas.take(room, size, _never, more=True)
            parts += news
        self._sequence += 1
        if self._sequence > _MAX_SEQUENCE:
            # Never reuse an (incarnation, sequence) pair: receivers would drop it as a replay.
            self._sequence = 0
            self._raise_incarnation(self.incarnation)
        datagram = seal(self._keyring, self.incarnation, self._sequence, b"".join(parts))
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += len(datagram)
        self._outbox.append((datagram, addr))

    def _pick_alive(self, count: int, *, suspect: bool = False) -> list[PeerRecord]:
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

    def _self_member(self) -> Member:
        return Member(
            self.node,
            self.incarnation,
            State.ALIVE,
            self.config.addr,
            self.config.registry,
            self.ledger.version,
            self.coordinator,
        )


# END
