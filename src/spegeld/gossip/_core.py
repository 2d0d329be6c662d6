"""The gossip protocol core: SWIM membership plus versioned key ownership. Sans-I/O.

Inputs are datagrams and the time, ``receive(datagram, addr, now)`` and
``handle_timer(now)``; outputs are ``datagrams_to_send(now)`` and ``next_deadline()``.
There are no sockets, no trio and no clock in here, so a simulator can run thousands of
nodes in one process and tests can set time.

Membership is SWIM: a probe every ``probe_interval`` (ping, then ping-req through
``indirect_checks`` members), then suspect, then dead, with incarnation numbers so a
node can refute a suspicion. News is piggybacked on every datagram and gossiped to
``gossip_nodes`` members every ``gossip_interval``, each item ``retransmit_mult *
ceil(log10(N + 1))`` times; an urgent change also goes to ``URGENT_FANOUT`` at once.

Ownership: each node's keys carry a version. A change is a Delta for the next version,
gossiped like membership news. A receiver applies deltas in version order, holding back
any that arrive early. Anti-entropy repairs the rest: every ``sync_interval`` a node
sends a Summary of some members (with the version it holds of each) to a random member,
which answers with its own view of them; whoever sees a newer version pulls that node's
whole key set in chunks (StatePull, StateChunk). A gap that stays open pulls from the
owner.

Healing (Serf's reconnect): every ``RECONNECT_INTERVAL`` a node sends one dead member a
Summary carrying that member's record as we hold it, which it refutes if it was a
partition; a node whose seeds all look dead joins one again. docs/protocol.md describes
the wire format and these rules in full.

This module holds the public interface, message dispatch, membership merging (and
refutation) and sending. The member table is ``_members``; failure detection
(``_failure``) and anti-entropy (``_antientropy``) return actions (``_actions``) that
the core applies in order; ``_wire`` picks each datagram's version and admits what
arrives. What changed is told through events (``_events``): ``next_event()``.
"""

from __future__ import annotations

import os
import random
from collections import Counter, deque
from dataclasses import replace

from spegeld.routing import CoordinatorView, Peer

from ._actions import Action, ChangeKeys, Declare, Forward, JoinVia, ReplaceKeys, Send, SendEncoded
from ._antientropy import AntiEntropy
from ._codec import MAX_INCARNATION, encode_message, valid_key
from ._config import GossipConfig, GossipStatistics
from ._events import (
    CoordinatorChanged,
    GossipEvent,
    KeysChanged,
    MemberAlive,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
)
from ._failure import FailureDetector, ProbeTimings
from ._members import MemberTable, MemberView, PeerRecord
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
from ._ownership import KeyLedger
from ._sealed import Nonces
from ._security import Keyring, ReplayWindow
from ._table import HolderTable
from ._transmit import Transmitter
from ._validate import Validator, check_own_identity, valid_gossip_addr
from ._wire import Wire

RECONNECT_INTERVAL = 10.0  # seconds between tries at a dead member or lost seeds (Serf: 30 s)
# Sequence numbers accepted behind the newest one seen from a sender. A state pull is
# answered with a burst of chunks (about 70 for 2000 digests), and a burst that arrives
# reordered must not fall out of the window: the 64 that IPsec uses would drop the first
# chunks of any burst longer than that.
REPLAY_WINDOW = 256
# Members held at most: ten times DESIGN's 1000 nodes. Past it a new name is ignored
# (``members_full``), so a key holder inventing names cannot grow the table without end;
# dead members are forgotten after ``dead_forget`` and free their places.
MAX_MEMBERS = 10_000
URGENT_FANOUT = 16  # members an urgent change goes to at once: all, in a cluster this size
# Events held for the shell, which takes them after every datagram and timer. Only a core
# nobody drains (a simulation) reaches it; then the oldest go, counted in events_dropped.
MAX_EVENTS = 4096


class GossipCore:
    def __init__(
        self, config: GossipConfig, keyring: Keyring, rng: random.Random, now: float,
        nonces: Nonces = os.urandom,  # version 2's random nonces; the simulator seeds its own
    ) -> None:  # fmt: skip
        check_own_identity(config.node, config.addr, config.mirror, config.incarnation)
        self.config = config
        self.node = config.node
        self._t = t = config.timings
        self._rng = rng
        self.incarnation = config.incarnation
        self.coordinator = False
        self.ledger = KeyLedger(version_base=config.incarnation << 20)
        self.table = HolderTable()
        self.members_table = MemberTable(rng)
        self._replay = ReplayWindow(window=REPLAY_WINDOW)
        self.counters: Counter[str] = Counter()
        self.wire = Wire(config.node, keyring, config.v1, nonces)
        self.transmitter = Transmitter(
            config.node, self.wire, t.retransmit_mult, self.counters, self._wrapped
        )
        self._replying: tuple[str, Addr] | None = None  # (sender, source) of the datagram in hand
        self.dropped: Counter[str] = Counter()  # whole datagrams, by reason
        self.rejected: Counter[str] = Counter()  # records and messages ignored, by reason
        self.validator = Validator(config.node, config.incarnation, now)
        timings = ProbeTimings(
            t.probe_interval, t.probe_timeout, t.indirect_checks, t.suspicion_mult
        )
        self.detector = FailureDetector(
            self.members_table, timings, rng, self.rejected, self.dropped
        )
        self.antientropy = AntiEntropy(
            config.node, self.members_table, self.table, self.ledger, self.validator, rng,
            self.rejected, t.gap_timeout,
        )  # fmt: skip
        self._next_probe = now + rng.random() * t.probe_interval
        self._next_gossip = now + rng.random() * t.gossip_interval
        self._next_sync = now + rng.random() * t.sync_interval
        self._next_join = now
        self._next_reconnect = now + (1 + rng.random()) * RECONNECT_INTERVAL
        self._events: deque[GossipEvent] = deque()
        self.events_dropped = 0
        self._told: tuple[CoordinatorView, str | None] = (CoordinatorView.NONE, None)
        self._coordinator_dirty = False  # a change that may move the coordinator view

    @property
    def key_fingerprint(self) -> str:
        return self.transmitter.keyring.fingerprint()

    def set_keyring(self, keyring: Keyring) -> None:
        """Seal and open with ``keyring`` from now on (a key rotation step, on SIGHUP)."""
        self.transmitter.keyring = keyring

    # ---- local commands -------------------------------------------------------------

    def advertise(
        self, keys: set[str] | frozenset[str] | list[str], *, urgent: bool = False
    ) -> None:
        """Announce ``keys``; a key no peer's decoder would accept is skipped and counted.

        One such key would make every datagram that carries it undecodable. ``urgent``:
        the change also goes now to up to ``URGENT_FANOUT`` alive members, not only as news.
        """
        good = [key for key in keys if valid_key(key)]
        if len(good) != len(keys):
            self.counters["keys_rejected"] += len(keys) - len(good)
        for delta in self.ledger.change(self.node, added=good, removed=()):
            self._broadcast(("delta", self.node, delta.version), delta)
            if urgent:
                for peer in self.members_table.pick_alive(URGENT_FANOUT):
                    self._send(peer.addr, [delta], piggyback=False)

    def withdraw(self, keys: set[str] | frozenset[str] | list[str]) -> None:
        for delta in self.ledger.change(self.node, added=(), removed=keys):
            self._broadcast(("delta", self.node, delta.version), delta)

    def set_coordinator(self, coordinator: bool) -> None:
        if coordinator != self.coordinator:
            self.coordinator = coordinator
            self._raise_incarnation(self.incarnation)
            self._coordinator_dirty = True
            self._tell_coordinator()

    def leave(self, now: float) -> None:
        """Tell a few members we are going, so nobody waits out a suspicion."""
        self.incarnation = min(self.incarnation + 1, MAX_INCARNATION)
        farewell = Member(
            self.node,
            self.incarnation,
            State.LEFT,
            self.config.addr,
            self.config.mirror,
            self.ledger.version,
            self.coordinator,
        )
        for peer in self.members_table.pick_alive(self._t.gossip_nodes * 2):
            self._send(peer.addr, [farewell], piggyback=False)

    def add_seed(self, addr: Addr) -> None:
        """Join through ``addr`` too (the coordinator's address, read from the Lease)."""
        if addr != self.config.addr and addr not in self.config.seeds:
            self.config = replace(self.config, seeds=(*self.config.seeds, addr))

    # ---- reading --------------------------------------------------------------------

    def lookup(self, key: str, count: int) -> list[Peer]:
        """Holders of ``key``: alive before suspect, then by RTT; never this node."""
        return self.members_table.rank(self.table.holders(key), count)

    def members(self) -> list[MemberView]:
        return self.members_table.views(self.table.count_of)

    def coordinator_view(self) -> tuple[CoordinatorView, str | None]:
        """What gossip says about the coordinator: ALIVE with this node when we lead."""
        if self.coordinator:
            return CoordinatorView.ALIVE, self.node
        return self.members_table.coordinator_view()

    def coordinator_peer(self) -> str | None:
        view, node = self.coordinator_view()
        return node if view is CoordinatorView.ALIVE else None

    def alive_count(self) -> int:
        return self.members_table.alive_count()

    def statistics(self) -> GossipStatistics:
        c = self.counters
        return GossipStatistics(
            node=self.node, incarnation=self.incarnation, own_keys=len(self.ledger.own_keys),
            own_version=self.ledger.version, known_keys=len(self.table),
            members=dict(Counter(p.state.name.lower() for p in self.members_table)),
            packets_in=c["packets_in"], packets_out=c["packets_out"],
            bytes_in=c["bytes_in"], bytes_out=c["bytes_out"],
            dropped=dict(self.dropped), rejected=dict(self.rejected),
        )  # fmt: skip

    # ---- sans-I/O interface ------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        return self.transmitter.take()

    def next_event(self) -> GossipEvent | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float:
        deadline = min(self._next_probe, self._next_gossip, self._next_sync, self._next_reconnect)
        probe = self.detector.deadline()
        if probe is not None:
            deadline = min(deadline, probe)
        if self.config.seeds and not len(self.members_table):
            deadline = min(deadline, self._next_join)
        suspicion = self.members_table.suspicion_ends()
        if suspicion is not None:
            deadline = min(deadline, suspicion)
        return deadline

    def receive(self, datagram: bytes, addr: Addr, now: float) -> None:
        self.counters["packets_in"] += 1
        self.counters["bytes_in"] += len(datagram)
        admitted = self.wire.admit(datagram, self.node, self._replay)
        if isinstance(admitted, str):
            self.dropped[admitted] += 1  # the reason
            return
        sender, messages = admitted
        self._replying = (sender, addr)
        for message in messages:
            self._handle(sender, addr, message, now)
        self._replying = None
        self._tell_coordinator()

    def handle_timer(self, now: float) -> None:
        t = self._t
        if self.config.seeds and not len(self.members_table) and now >= self._next_join:
            for seed in self.config.seeds:
                self._send(seed, [Join(self.self_member())], piggyback=False)
            self._next_join = now + t.join_retry
        self._apply(self.detector.check_probe(now), now)
        if now >= self._next_probe:
            self._apply(self.detector.start_probe(now), now)
            self._next_probe = now + t.probe_interval
        self._apply(self.detector.expire_suspects(now), now)
        if now >= self._next_gossip:
            self._gossip()
            self._next_gossip = now + t.gossip_interval
        if now >= self._next_sync:
            self._apply(self.antientropy.pull_lagging(now), now)
            self._apply(self.antientropy.send_summary(self.self_member()), now)
            for peer in self.wire.hellos(self.members_table, now):  # v2, to learn who speaks it
                self._send(peer.addr, [self.self_member()], piggyback=False, hello=True)
            self._forget_dead(now)
            self._next_sync = now + t.sync_interval
        if now >= self._next_reconnect:
            me = self.self_member()
            self._apply(self.antientropy.reconnect(me, self.config.seeds), now)
            self._next_reconnect = now + RECONNECT_INTERVAL
        self.detector.expire_relays(now)
        self._tell_coordinator()

    # ---- message handling -----------------------------------------------------------

    def _handle(self, sender: str, addr: Addr, message: Message, now: float) -> None:
        match message:
            case Ping(seq):
                self._send(addr, [Ack(seq)])
            case Ack(seq):
                self._apply(self.detector.on_ack(sender, seq, now), now)
            case PingReq(seq, target, target_addr):
                if valid_gossip_addr(target_addr):
                    self._apply(self.detector.on_ping_req(addr, seq, target, target_addr, now), now)
                else:
                    self.rejected["address"] += 1
            case Member():
                self._merge(message, now, source=addr)
            case Delta():
                self._apply(self.antientropy.on_delta(message, now), now)
            case Summary(members, reply):
                for member in members:
                    self._merge(member, now, source=addr)
                if not reply:
                    me = self.self_member()
                    self._apply(self.antientropy.answer_summary(members, addr, me), now)
            case StatePull(node, have):
                self._apply(self.antientropy.on_state_pull(node, have, sender), now)
            case StateChunk():
                self._apply(self.antientropy.on_chunk(message, now), now)
            case Join(member):
                if self._merge(member, now, source=addr):
                    me = self.self_member()
                    joiner = member.addr  # where it says it is, not the source: no reflection
                    self._apply(self.antientropy.send_member_list(joiner, member.node, me), now)

    def _apply(self, actions: list[Action], now: float) -> None:
        """Do what a collaborator decided, in its order."""
        for action in actions:
            match action:
                case Send(addr, messages, piggyback):
                    self._send(addr, list(messages), piggyback=piggyback)
                case SendEncoded(addr, parts):
                    self._send_parts(addr, list(parts), piggyback=False)
                case JoinVia(addr):
                    self._send(addr, [Join(self.self_member())], piggyback=False)
                case Declare(node, state):
                    peer = self.members_table.get(node)
                    assert peer is not None
                    self._set_state(peer, state, now)
                    self._broadcast(("member", node), peer.as_member())
                case Forward(delta):
                    self._broadcast(("delta", delta.node, delta.version), delta)
                case ChangeKeys(slot, added, removed):
                    self.table.remove(slot, removed)
                    self.table.add(slot, added)
                    self._keys_changed(slot)
                case ReplaceKeys(slot, keys):
                    self.table.replace(slot, keys)
                    self._keys_changed(slot)

    def _merge(self, member: Member, now: float, source: Addr) -> bool:
        """Take in news about a member; False if the record was rejected (``_validate``)."""
        reason = self.validator.problem(member, now)
        members = self.members_table
        full = len(members) >= MAX_MEMBERS
        if reason is None and full and member.node not in members and member.node != self.node:
            reason = "members_full"
        if reason is not None:
            self.rejected[reason] += 1
            return False
        if member.node == self.node:
            self._merge_self(member)
            return True
        peer = members.get(member.node)
        if peer is None:
            if member.state in (State.DEAD, State.LEFT):
                return True
            peer = members.add(member, now)
            if member.state is State.SUSPECT:  # heard of first as suspect: it may never refute
                members.suspect(peer, now + self.detector.suspicion_timeout())
            self._coordinator_dirty |= member.coordinator or len(members) == 1
            self._emit(MemberJoined(member.node))
            if member.state is State.SUSPECT:
                self._emit(MemberSuspected(member.node))
            self._broadcast(("member", member.node), member)
        elif not peer.superseded_by(member):
            if peer.state is State.ALIVE or peer.state is State.SUSPECT:
                self._apply(self.antientropy.want_version(peer, member.version, source, now), now)
            return True
        else:
            self._coordinator_dirty |= peer.coordinator or member.coordinator
            members.update(peer, member)
            self._set_state(peer, member.state, now)
            self._broadcast(("member", member.node), member)
        if member.state is State.ALIVE or member.state is State.SUSPECT:
            self._apply(self.antientropy.want_version(peer, member.version, source, now), now)
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
        self._broadcast(("member", self.node), self.self_member())

    def _set_state(self, peer: PeerRecord, state: State, now: float) -> None:
        before = peer.state
        if not self.members_table.set_state(peer, state, now, self.detector.suspicion_timeout()):
            return
        self._coordinator_dirty |= peer.coordinator
        if state is State.SUSPECT:
            self._emit(MemberSuspected(peer.node))
        elif state is State.ALIVE:
            gone = before in (State.DEAD, State.LEFT)
            self._emit(MemberJoined(peer.node) if gone else MemberAlive(peer.node))
        else:
            self.table.drop(peer.slot)
            self._emit(MemberLeft(peer.node, state))

    def _forget_dead(self, now: float) -> None:
        """Drop records dead for ``dead_forget``: after that, only a seed can reconnect us."""
        members = self.members_table
        for node in members.dead_longer_than(now, self._t.dead_forget):
            peer = members.forget(node)
            self._coordinator_dirty |= peer.coordinator or not len(members)
            self.antientropy.forget(node)
            self._replay.forget(node)  # a later life at an incarnation not above is heard
            self.wire.forget(node)

    # ---- events -------------------------------------------------------------------------

    def _emit(self, event: GossipEvent) -> None:
        if len(self._events) >= MAX_EVENTS:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append(event)

    def _keys_changed(self, slot: int) -> None:
        peer = self.members_table.at_slot(slot)
        if peer is not None:
            self._emit(KeysChanged(peer.node))

    def _tell_coordinator(self) -> None:
        """Emit CoordinatorChanged if what gossip says about the coordinator moved."""
        if not self._coordinator_dirty:
            return
        self._coordinator_dirty = False
        view = self.coordinator_view()
        if view != self._told:
            self._told = view
            self._emit(CoordinatorChanged(*view))

    # ---- dissemination ------------------------------------------------------------------

    def _gossip(self) -> None:
        if not self.transmitter.has_news():
            return
        # Suspects too, as memberlist does: gossip is how a suspect hears that it is one
        # (and refutes), and how it keeps up with keys meanwhile.
        for peer in self.members_table.pick_alive(self._t.gossip_nodes, suspect=True):
            self._send(peer.addr, [])

    def _broadcast(self, subject: tuple[str, ...] | tuple[str, str, int], message: Message) -> None:
        self.transmitter.broadcast(subject, message)

    def _send(self, addr: Addr, messages: list[Message], **flags: bool) -> None:
        self._send_parts(addr, [encode_message(m) for m in messages], **flags)  # piggyback, hello

    def _send_parts(
        self, addr: Addr, encoded: list[bytes], *, piggyback: bool = True, hello: bool = False
    ) -> None:
        size = len(self.members_table) + 1
        # The recipient: the sender of the datagram we answer, or the member at ``addr``.
        replying = self._replying
        to = replying[0] if replying and replying[1] == addr else self.members_table.name_at(addr)
        self.transmitter.send(
            addr, encoded, self.incarnation, size, piggyback=piggyback, to=to, hello=hello
        )

    def _wrapped(self) -> int:
        """The sequence number wrapped: move to a higher incarnation."""
        self._raise_incarnation(self.incarnation)
        return self.incarnation

    def self_member(self) -> Member:
        """This node's own record, as it gossips it now."""
        return Member(
            self.node,
            self.incarnation,
            State.ALIVE,
            self.config.addr,
            self.config.mirror,
            self.ledger.version,
            self.coordinator,
        )
