"""Anti-entropy for ``GossipCore``: ownership deltas, state pulls, summaries, reconnects.

Gossip alone loses news under loss; this is what repairs it. Deltas are applied
in version order; a node seen to lag is pulled from (StatePull, answered with
StateChunks); every sync interval a Summary of some members goes to a random
member; a joiner gets the whole member list; and now and then a dead member or a
seed is tried again, in case a partition is over.

Split out of ``_core`` for size, not as a separate layer: ``AntiEntropy`` is owned
by one core and reads and updates that core's member table directly. It owns only
the set of lagging peers and the summary window's cursor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._codec import SUMMARY_OVERHEAD, encode_record, encode_sender, encode_summary
from ._messages import Addr, Delta, Join, Member, State, StateChunk, StatePull
from ._ownership import CHUNK_TIMEOUT
from ._records import PeerRecord
from ._security import MAX_PAYLOAD
from ._validate import MAX_CHUNKS

if TYPE_CHECKING:
    from ._core import GossipCore

CHUNK_OVERHEAD = 32  # a StateChunk's bytes besides its keys and node id: type, ints, headers


class AntiEntropy:
    def __init__(self, core: GossipCore) -> None:
        self._core = core
        self.lagging: set[str] = set()  # peers whose keys we know we lack
        self.cursor = 0  # where the next Summary's window of members starts

    def answer_summary(self, members: tuple[Member, ...], addr: Addr) -> None:
        """Tell the sender of a Summary our view of the members it named."""
        core = self._core
        mine = [m for m in (self._view_of(member.node) for member in members) if m]
        core._send_parts(addr, [self._fit_summary(mine, True)], piggyback=False)

    def want_version(self, peer: PeerRecord, version: int, source: Addr, now: float) -> None:
        """Someone says ``peer``'s keys reached ``version``; pull them if we lag."""
        if peer.keys.note_claim(version, now):
            self.lagging.add(peer.node)
            if peer.keys.should_pull(now, self._core._t.gap_timeout):
                self._core._send(source, [StatePull(peer.node, peer.keys.version)], piggyback=False)

    def pull_lagging(self, now: float) -> None:
        """Gaps that gossip has not closed: ask each owner for its whole key set."""
        for node in list(self.lagging):
            peer = self._core._peers.get(node)
            if peer is None or peer.keys.gap_since is None or peer.state is not State.ALIVE:
                self.lagging.discard(node)
            elif peer.keys.should_pull(now, self._core._t.gap_timeout):
                self._core._send(peer.addr, [StatePull(node, peer.keys.version)], piggyback=False)

    def on_delta(self, delta: Delta, now: float) -> None:
        if delta.node == self._core.node:
            return
        if delta.version > self._core.validator.version_limit(now):
            # A claim no node could have counted to would keep every holder pulling.
            self._core.rejected["version"] += 1
            return
        peer = self._core._peers.get(delta.node)
        if peer is None or peer.state in (State.DEAD, State.LEFT):
            return
        applied = peer.keys.offer(delta, now)
        if applied is None:
            return
        if not applied:
            self.lagging.add(peer.node)
            if peer.keys.should_pull(now, self._core._t.gap_timeout):
                self._core._send(
                    peer.addr, [StatePull(peer.node, peer.keys.version)], piggyback=False
                )
        for change in applied:
            self._core.table.remove(peer.slot, change.removed)
            self._core.table.add(peer.slot, change.added)
        self._core._broadcast(("delta", delta.node, delta.version), delta)

    def on_state_pull(self, node: str, have: int, addr: Addr) -> None:
        if node == self._core.node:
            keys, version = sorted(self._core.ledger.own_keys), self._core.ledger.version
        else:
            peer = self._core._peers.get(node)
            if peer is None or not peer.keys.complete or peer.keys.version <= have:
                return
            keys, version = sorted(self._core.table.keys_of(peer.slot)), peer.keys.version
        if version <= have:
            return
        # Room for keys once our id, the owner's id and the chunk's fields are in.
        budget = MAX_PAYLOAD - len(self._core._sender) - len(encode_sender(node)) - CHUNK_OVERHEAD
        chunks = self._core.ledger.chunk_state(node, version, keys, budget)
        # In a fresh order each time: whatever a lossy or reordering path dropped from
        # the last answer is unlikely to be dropped again, and the puller keeps the rest.
        self._core._rng.shuffle(chunks)
        for chunk in chunks:
            self._core._send(addr, [chunk], piggyback=False)

    def on_chunk(self, chunk: StateChunk, now: float) -> None:
        if chunk.count > MAX_CHUNKS or chunk.version > self._core.validator.version_limit(now):
            self._core.rejected["chunk"] += 1
            return
        peer = self._core._peers.get(chunk.node)
        if peer is None or peer.state in (State.DEAD, State.LEFT):
            return
        if now - peer.keys.last_pull > CHUNK_TIMEOUT:
            # Chunks only answer our StatePull: unasked, they would make us hold keys.
            self._core.rejected["unsolicited"] += 1
            return
        whole = peer.keys.assemble(chunk, now)
        if whole is not None:
            self._core.table.replace(peer.slot, whole)
            for change in peer.keys.drain():
                self._core.table.remove(peer.slot, change.removed)
                self._core.table.add(peer.slot, change.added)

    def send_summary(self, now: float) -> None:
        targets = self._core._pick_alive(1)
        if not targets:
            return
        records = [encode_record(self._core._self_member())]
        room = self._summary_room() - len(records[0])
        slots = self._core._slots  # stable order, so the window walks every member in turn
        count = len(slots)
        step = 0
        while step < count:
            peer = slots[(self.cursor + step) % count]
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
        self._core._send_parts(targets[0].addr, [encode_summary(records, False)], piggyback=False)

    def _summary_room(self) -> int:
        """Bytes of member records that fit in one Summary after our id."""
        return MAX_PAYLOAD - len(self._core._sender) - SUMMARY_OVERHEAD

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

    def send_member_list(self, addr: Addr, joiner: str) -> None:
        views = [self._core._self_member()]
        known = self._core._peers.get(joiner)
        if known is not None and known.state in (State.DEAD, State.LEFT):
            views.append(known.as_member())  # it must refute this to be heard again
        views += [
            p.as_member()
            for p in self._core._peers.values()
            if p.state in (State.ALIVE, State.SUSPECT)
        ]
        batch: list[bytes] = []
        room = self._summary_room()
        for view in views:
            record = encode_record(view)
            if len(record) > room and batch:
                self._core._send_parts(addr, [encode_summary(batch, True)], piggyback=False)
                batch, room = [], self._summary_room()
            batch.append(record)
            room -= len(record)
        if batch:
            self._core._send_parts(addr, [encode_summary(batch, True)], piggyback=False)

    def reconnect(self) -> None:
        """Try one dead member and, if every seed looks dead, a seed: a partition may be over.

        The summary carries the member's own record as we hold it, which it will refute
        if it is alive; its answer carries its record of us, which we refute in turn.
        """
        dead = [node for node in self._core._dead if self._core._peers[node].state is State.DEAD]
        if dead:
            peer = self._core._peers[self._core._rng.choice(dead)]
            summary = encode_summary(
                [
                    encode_record(self._core._self_member()),
                    encode_record(peer.as_member()),
                ],
                False,
            )
            self._core._send_parts(peer.addr, [summary], piggyback=False)
        if self._core.config.seeds and self._core._peers and not self._seed_alive():
            seed = self._core.config.seeds[self._core._rng.randrange(len(self._core.config.seeds))]
            self._core._send(seed, [Join(self._core._self_member())], piggyback=False)

    def _seed_alive(self) -> bool:
        """Whether some seed is a member, alive or suspect.

        Suspect counts: under heavy loss a seed is suspect somewhere most of the time,
        and every Join costs it a whole member list.
        """
        for seed in self._core.config.seeds:
            peer = self._core._peers.get(self._core._by_addr.get(seed, ""))
            if (
                peer is not None
                and peer.state in (State.ALIVE, State.SUSPECT)
                and peer.addr == seed
            ):
                return True
        return False

    def _view_of(self, node: str) -> Member | None:
        if node == self._core.node:
            return self._core._self_member()
        peer = self._core._peers.get(node)
        return peer.as_member() if peer else None
