"""The piggyback queue: news retransmitted a bounded number of times (memberlist's
TransmitLimitedQueue). Newer news about the same subject replaces older news."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ._messages import Message


@dataclass(slots=True)
class _Item:
    subject: Hashable
    message: Message
    encoded: bytes
    sent: int


class BroadcastQueue:
    def __init__(self, retransmit_mult: int) -> None:
        self._mult = retransmit_mult
        self._items: dict[Hashable, _Item] = {}

    def __len__(self) -> int:
        return len(self._items)

    def limit(self, cluster_size: int) -> int:
        return self._mult * max(1, math.ceil(math.log10(cluster_size + 1)))

    def put(self, subject: Hashable, message: Message, encoded: bytes) -> None:
        self._items[subject] = _Item(subject, message, encoded, 0)

    def take(self, room: int, cluster_size: int, skip: Callable[[Message], bool]) -> list[bytes]:
        """Encoded news that fits in ``room`` bytes, least-sent first; counts the sends."""
        limit = self.limit(cluster_size)
        chosen: list[bytes] = []
        for item in sorted(self._items.values(), key=lambda i: i.sent):
            if len(item.encoded) > room or skip(item.message):
                continue
            chosen.append(item.encoded)
            room -= len(item.encoded)
            item.sent += 1
            if item.sent >= limit:
                del self._items[item.subject]
            if room < 16:
                break
        return chosen
