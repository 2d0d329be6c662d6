"""Outgoing datagrams: news queued for piggybacking, sealing, sequence numbers. Sans-I/O.

``Transmitter`` owns the two news queues (membership, and ownership deltas, which
go first), the datagram sequence number and the outbox the shell empties. It
seals through its ``Wire`` (``_wire``: which version for which member, and the keyring,
replaced on a key rotation). When the sequence number would wrap it asks its owner,
through ``on_wrap``, for a higher incarnation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable

from ._codec import encode_message, encode_sender
from ._messages import Addr, Delta, Message
from ._queue import BroadcastQueue
from ._security import MAX_PAYLOAD, Keyring
from ._wire import Wire

_MAX_SEQUENCE = 0xFFFF_FFFF  # the datagram header's u32
# Piggyback bytes kept for membership news when ownership deltas go first. Deltas are
# rare and are what the cluster is for, but under heavy loss the stream of suspicions
# and refutations outruns what datagrams can carry, and a delta queued behind it took
# 20 s or more to spread; membership still gets about five records per datagram.
MEMBER_RESERVE = 256


def _never(message: Message) -> bool:
    return False


class Transmitter:
    def __init__(
        self,
        node: str,
        wire: Wire,
        retransmit_mult: int,
        counters: Counter[str],
        on_wrap: Callable[[], int],
    ) -> None:
        self.sender = encode_sender(node)  # every payload starts with it
        self.wire = wire
        self.news = BroadcastQueue(retransmit_mult)  # membership news
        self.deltas = BroadcastQueue(retransmit_mult)  # ownership news
        self.sequence = 0
        self._counters = counters  # the core's: packets_out, bytes_out
        self._on_wrap = on_wrap
        self._outbox: list[tuple[bytes, Addr]] = []

    @property
    def keyring(self) -> Keyring:
        return self.wire.keyring

    @keyring.setter
    def keyring(self, keyring: Keyring) -> None:
        self.wire.keyring = keyring

    def take(self) -> list[tuple[bytes, Addr]]:
        """The datagrams sealed since the last call, in order."""
        out, self._outbox = self._outbox, []
        return out

    def peek(self) -> list[tuple[bytes, Addr]]:
        """The datagrams waiting, left in place (tests look at them)."""
        return list(self._outbox)

    def has_news(self) -> bool:
        return bool(len(self.news) or len(self.deltas))

    def broadcast(self, subject: Hashable, message: Message) -> None:
        queue = self.deltas if isinstance(message, Delta) else self.news
        queue.put(subject, message, encode_message(message))

    def send(
        self,
        addr: Addr,
        encoded: list[bytes],
        incarnation: int,
        cluster_size: int,
        *,
        piggyback: bool = True,
        to: str | None = None,
        hello: bool = False,
    ) -> None:
        """Seal ``encoded`` messages (and, with ``piggyback``, news that fits) for ``addr``.

        ``to`` is the member at ``addr`` (None: not known by name, a seed); ``hello``
        seals in version 2 whatever the member is known to speak (``Wire.hellos``).
        """
        parts = [self.sender, *encoded]
        room = MAX_PAYLOAD - sum(map(len, parts))
        if piggyback and room > 32:
            news = self.deltas.take(max(0, room - MEMBER_RESERVE), cluster_size, _never)
            room -= sum(map(len, news))
            news += self.news.take(room, cluster_size, _never)
            room = MAX_PAYLOAD - sum(map(len, parts)) - sum(map(len, news))
            if room > 32 and len(self.deltas):
                news += self.deltas.take(room, cluster_size, _never, more=True)
            parts += news
        self.sequence += 1
        if self.sequence > _MAX_SEQUENCE:
            # Never reuse an (incarnation, sequence) pair: receivers would drop it as a replay.
            self.sequence = 0
            incarnation = self._on_wrap()
        payload = b"".join(parts)
        datagram = self.wire.seal(to, incarnation, self.sequence, payload, hello=hello)
        self._counters["packets_out"] += 1
        self._counters["bytes_out"] += len(datagram)
        self._outbox.append((datagram, addr))
