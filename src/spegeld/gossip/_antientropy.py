"""Anti-entropy: ownership deltas, state pulls, summaries, reconnects. Sans-I/O.

Gossip alone loses news under loss; this is what repairs it. Deltas are applied
in version order; a node seen to lag is pulled from (StatePull, answered with
StateChunks); every sync interval a Summary of some members goes to a random
member; a joiner gets the whole member list; and now and then a dead member or a
seed is tried again, in case a partition is over.

``AntiEntropy`` owns the lagging peers and the summary window's cursor, and
each member's key account (``PeerRecord.keys``). It reads the member table, the
holder table and this node's ledger through their public interfaces, takes the
time as an input, and returns what the core must do (``_actions``): sends, deltas
to pass on, and key changes for the holder table.
"""

from __future__ import annotations

import random
from collections import Counter

from ._actions import Action, ChangeKeys, Forward, JoinVia, ReplaceKeys, Send, SendEncoded
from ._codec import SUMMARY_OVERHEAD, encode_record, encode_sender, encode_summary
from ._members import MemberTable, PeerRecord
from ._messages import Addr, Delta, Member, State, StateChunk, StatePull
from ._ownership import CHUNK_TIMEOUT, KeyLedger
from ._security import MAX_PAYLOAD
from ._table import HolderTable
from ._validate import MAX_CHUNKS, Validator

CHUNK_OVERHEAD = 32  # a StateChunk's bytes besides its keys and node id: type, ints, headers


class AntiEntropy:
    def __init__(
        self,
        node: str,
        members: MemberTable,
        table: HolderTable,
        ledger: KeyLedger,
        validator: Validator,
        rng: random.Random,
        rejected: Counter[str],
        gap_timeout: float,
    ) -> None:
        self._node = node
        self._sender_size = len(encode_sender(node))  # every payload starts with our id
        self._members = members
        self._table = table
        self._ledger = ledger
        self._validator = validator
        self._rng = rng
        self._rejected = rejected  # the core's tally, by reason
        self._gap_timeout = gap_timeout
        # Peers whose keys we know we lack, in the order we noticed. A dict, not a set: a
        # set of names iterates in PYTHONHASHSEED's order, and the order of the pulls
        # must not change from one run of the same simulation to the next.
        self.lagging: dict[str, None] = {}
        self.cursor = 0  # where the next Summary's window of members starts

    def answer_summary(self, members: tuple[Member, ...], addr: Addr, me: Member) -> list[Action]:
        """Tell the sender of a Summary our view of the members it named."""
        mine = [m for m in (self._view_of(member.node, me) for member in members) if m]
        return [SendEncoded(addr, (self._fit_summary(mine, True),))]

    def want_version(
        self, peer: PeerRecord, version: int, source: Addr, now: float
    ) -> list[Action]:
        """Someone says ``peer``'s keys reached ``version``; pull them if we lag."""
        if peer.keys.note_claim(version, now):
            self.lagging[peer.node] = None
            if peer.keys.should_pull(now, self._gap_timeout):
                return [Send(source, (StatePull(peer.node, peer.keys.version),), False)]
        return []

    def pull_lagging(self, now: float) -> list[Action]:
        """Gaps that gossip has not closed: ask each owner for its whole key set."""
        actions: list[Action] = []
        for node in list(self.lagging):
            peer = self._members.get(node)
            if peer is None or peer.keys.gap_since is None or peer.state is not State.ALIVE:
                self.lagging.pop(node, None)
            elif peer.keys.should_pull(now, self._gap_timeout):
                actions.append(Send(peer.addr, (StatePull(node, peer.keys.version),), False))
        return actions

    def on_delta(self, delta: Delta, now: float) -> list[Action]:
        if delta.node == self._node:
            return []
        if delta.version > self._validator.version_limit(now):
            # A claim no node could have counted to would keep every holder pulling.
            self._rejected["version"] += 1
            return []
        peer = self._members.get(delta.node)
        if peer is None or peer.state in (State.DEAD, State.LEFT):
            return []
        applied = peer.keys.offer(delta, now)
        if applied is None:
            return []
        actions: list[Action] = []
        if not applied:
            self.lagging[peer.node] = None
            if peer.keys.should_pull(now, self._gap_timeout):
                actions.append(Send(peer.addr, (StatePull(peer.node, peer.keys.version),), False))
        for change in applied:
            actions.append(ChangeKeys(peer.slot, change.added, change.removed))
        actions.append(Forward(delta))
        return actions

    def on_state_pull(self, node: str, have: int, sender: str) -> list[Action]:
        """Answer ``sender``'s pull of ``node``'s keys, at ``sender``'s registered address.

        Never at the datagram's source: a pull is a few bytes and its answer up to about
        70 datagrams, so a replayed pull with a forged source would aim them at anyone.
        A pull from a node we do not hold as a member is not answered (``stranger``).
        """
        puller = self._members.get(sender)
        if puller is None or puller.state in (State.DEAD, State.LEFT):
            self._rejected["stranger"] += 1
            return []
        addr = puller.addr
        if node == self._node:
            keys, version = sorted(self._ledger.own_keys), self._ledger.version
        else:
            peer = self._members.get(node)
            if peer is None or not peer.keys.complete or peer.keys.version <= have:
                return []
            keys, version = sorted(self._table.keys_of(peer.slot)), peer.keys.version
        if version <= have:
            return []
        # Room for keys once our id, the owner's id and the chunk's fields are in.
        budget = MAX_PAYLOAD - self._sender_size - len(encode_sender(node)) - CHUNK_OVERHEAD
        chunks = self._ledger.chunk_state(node, version, keys, budget)
        # In a fresh order each time: whatever a lossy or reordering path dropped from
        # the last answer is unlikely to be dropped again, and the puller keeps the rest.
        self._rng.shuffle(chunks)
        return [Send(addr, (chunk,), False) for chunk in chunks]

    def on_chunk(self, chunk: StateChunk, now: float) -> list[Action]:
        if chunk.count > MAX_CHUNKS or chunk.version > self._validator.version_limit(now):
            self._rejected["chunk"] += 1
            return []
        peer = self._members.get(chunk.node)
        if peer is None or peer.state in (State.DEAD, State.LEFT):
            return []
        if now - peer.keys.last_pull > CHUNK_TIMEOUT:
            # Chunks only answer our StatePull: unasked, they would make us hold keys.
            self._rejected["unsolicited"] += 1
            return []
        whole = peer.keys.assemble(chunk, now)
        if whole is None:
            return []
        actions: list[Action] = [ReplaceKeys(peer.slot, whole)]
        for change in peer.keys.drain():
            actions.append(ChangeKeys(peer.slot, change.added, change.removed))
        return actions

    def send_summary(self, me: Member) -> list[Action]:
        targets = self._members.pick_alive(1)
        if not targets:
            return []
        records = [encode_record(me)]
        room = self._summary_room() - len(records[0])
        count = self._members.slot_count()  # stable order: the window walks every member
        step = 0
        while step < count:
            peer = self._members.at_slot((self.cursor + step) % count)
            if peer is not None:
                record = encode_record(peer.as_member())
                if len(record) > room:
                    if len(records) == 1:
                        step += 1  # too big even alone with ours: skip it, don't stall here
                    break
                room -= len(record)
                records.append(record)
            step += 1
        self.cursor = (self.cursor + step) % max(1, count)
        return [SendEncoded(targets[0].addr, (encode_summary(records, False),))]

    def _summary_room(self) -> int:
        """Bytes of member records that fit in one Summary after our id."""
        return MAX_PAYLOAD - self._sender_size - SUMMARY_OVERHEAD

    def _fit_summary(self, views: list[Member], reply: bool) -> bytes:
        room = self._summary_room()
        fitted = []
        for view in views:
            record = encode_record(view)
            if len(record) > room:
                break
            fitted.append(record)
            room -= len(record)
        return encode_summary(fitted, reply)

    def send_member_list(self, addr: Addr, joiner: str, me: Member) -> list[Action]:
        views = [me]
        known = self._members.get(joiner)
        if known is not None and known.state in (State.DEAD, State.LEFT):
            views.append(known.as_member())  # it must refute this to be heard again
        views += [p.as_member() for p in self._members if p.state in (State.ALIVE, State.SUSPECT)]
        actions: list[Action] = []
        batch: list[bytes] = []
        room = self._summary_room()
        for view in views:
            record = encode_record(view)
            if len(record) > room and batch:
                actions.append(SendEncoded(addr, (encode_summary(batch, True),)))
                batch, room = [], self._summary_room()
            batch.append(record)
            room -= len(record)
        if batch:
            actions.append(SendEncoded(addr, (encode_summary(batch, True),)))
        return actions

    def reconnect(self, me: Member, seeds: tuple[Addr, ...]) -> list[Action]:
        """Try one dead member and, if every seed looks dead, a seed: a partition may be over.

        The summary carries the member's own record as we hold it, which it will refute
        if it is alive; its answer carries its record of us, which we refute in turn.
        """
        actions: list[Action] = []
        dead = self._members.dead()
        if dead:
            peer = self._members.get(self._rng.choice(dead))
            assert peer is not None
            summary = encode_summary([encode_record(me), encode_record(peer.as_member())], False)
            actions.append(SendEncoded(peer.addr, (summary,)))
        if seeds and len(self._members) and not self._seed_alive(seeds):
            actions.append(JoinVia(seeds[self._rng.randrange(len(seeds))]))
        return actions

    def _seed_alive(self, seeds: tuple[Addr, ...]) -> bool:
        """Whether some seed is a member, alive or suspect.

        Suspect counts: under heavy loss a seed is suspect somewhere most of the time,
        and every Join costs it a whole member list.
        """
        for seed in seeds:
            peer = self._members.at_addr(seed)
            if (
                peer is not None
                and peer.state in (State.ALIVE, State.SUSPECT)
                and peer.addr == seed
            ):
                return True
        return False

    def _view_of(self, node: str, me: Member) -> Member | None:
        if node == self._node:
            return me
        peer = self._members.get(node)
        return peer.as_member() if peer else None

    def forget(self, node: str) -> None:
        """``node`` left the member table."""
        self.lagging.pop(node, None)
