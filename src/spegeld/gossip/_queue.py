"""The piggyback queue: news retransmitted a bounded number of times (memberlist's
TransmitLimitedQueue). Newer news about the same subject replaces older news."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ._messages import Message

# Items in a row that do not fit before a datagram counts as full: a busy queue holds
# over a hundred, and scanning them all for one that fits the last few bytes cost more
# than the bytes are worth.
MAX_MISSES = 8
# Items held at most. An honest queue at N = 1000 under 30 % loss holds a few hundred;
# a key holder sending deltas of ever new versions would otherwise grow it at its rate.
# When full, the item sent most often goes: its news has spread furthest already.
MAX_ITEMS = 4096


@dataclass(slots=True)
class _Item:
    subject: Hashable
    message: Message
    encoded: bytes
    sent: int
    datagram: int = 0  # the last datagram it was taken for


class BroadcastQueue:
    """News items, each sent at most ``limit(cluster_size)`` times, least-sent first.

    Items sit in buckets by how often they have been sent, so taking news for a
    datagram touches only the items it takes: with a thousand members the queue
    holds a hundred items or more, and sorting them for every datagram was the
    single largest cost of a busy node.

    Within a bucket the oldest item goes first. memberlist sends the newest
    first, which under overload never sends some items at all. Oldest-first
    delays fresh news by the backlog instead. Measured in the simulator, at
    N = 1000 and 30 % loss, neither order keeps up (docs/protocol.md, §7).
    """

    def __init__(self, retransmit_mult: int) -> None:
        self._mult = retransmit_mult
        self._items: dict[Hashable, _Item] = {}
        self._by_sent: list[dict[Hashable, _Item]] = [{}]  # sends so far → items
        self._datagram = 0  # counts calls to take() that start a datagram

    def __len__(self) -> int:
        return len(self._items)

    def limit(self, cluster_size: int) -> int:
        return self._mult * max(1, math.ceil(math.log10(cluster_size + 1)))

    def put(self, subject: Hashable, message: Message, encoded: bytes) -> None:
        old = self._items.get(subject)
        if old is not None:
            del self._by_sent[old.sent][subject]
        elif len(self._items) >= MAX_ITEMS:
            self._evict()
        item = _Item(subject, message, encoded, 0)
        self._items[subject] = item
        self._by_sent[0][subject] = item

    def _evict(self) -> None:
        for bucket in reversed(self._by_sent):
            if bucket:
                victim = next(iter(bucket))
                del bucket[victim]
                del self._items[victim]
                return

    def take(
        self,
        room: int,
        cluster_size: int,
        skip: Callable[[Message], bool],
        *,
        more: bool = False,
    ) -> list[bytes]:
        """Encoded news that fits in ``room`` bytes, least-sent first; counts the sends.

        ``more``: a second helping for the datagram of the last call, which skips what
        that call took (it sits in the next bucket by now).
        """
        if not more:
            self._datagram += 1
        chosen: list[_Item] = []
        misses = 0
        for bucket in self._by_sent:
            for item in bucket.values():
                if item.datagram == self._datagram:
                    continue
                if len(item.encoded) > room or skip(item.message):
                    misses += 1
                    if misses >= MAX_MISSES:
                        break
                    continue
                chosen.append(item)
                room -= len(item.encoded)
                if room < 16:
                    break
            if room < 16 or misses >= MAX_MISSES:
                break
        limit = self.limit(cluster_size)
        for item in chosen:
            item.datagram = self._datagram
            del self._by_sent[item.sent][item.subject]
            item.sent += 1
            if item.sent >= limit:
                del self._items[item.subject]
                continue
            if item.sent == len(self._by_sent):
                self._by_sent.append({})
            self._by_sent[item.sent][item.subject] = item
        return [item.encoded for item in chosen]
