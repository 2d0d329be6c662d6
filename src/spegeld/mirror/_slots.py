"""Connection slots by source: loopback keeps its own pool, every other source is capped.

containerd on this node reaches the mirror from loopback; pods and peers reach it from
their own (non-loopback) addresses. So loopback gets a pool nobody else can take, and
each other address may hold only a few of the shared slots: one pod cannot starve the
node's containerd, nor the other peers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import trio

LOOPBACK = "loopback"  # the one key all loopback (and AF_UNIX) clients share


@dataclass(frozen=True, slots=True)
class Source:
    key: str  # the client's IP address, or LOOPBACK
    loopback: bool


def source_of(sock: trio.socket.SocketType) -> Source | None:
    """Where an accepted connection comes from; None when the client is already gone."""
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    if not isinstance(peer, tuple):  # AF_UNIX: a local process
        return Source(LOOPBACK, True)
    host = str(peer[0]).partition("%")[0]  # an IPv6 link-local address carries its zone
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return Source(host, False)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return Source(LOOPBACK, True)
    return Source(str(address), False)


class Slots:
    """Counts open connections; ``take`` says whether one more may be served."""

    def __init__(self, *, shared: int, per_source: int, loopback: int) -> None:
        self._shared_limit = shared
        self._per_source_limit = per_source
        self._loopback_limit = loopback
        self._loopback = 0
        self._shared = 0
        self._by_source: dict[str, int] = {}  # at most ``shared`` keys: zeros are removed

    def take(self, source: Source) -> bool:
        if source.loopback:
            if self._loopback >= self._loopback_limit:
                return False
            self._loopback += 1
            return True
        held = self._by_source.get(source.key, 0)
        if held >= self._per_source_limit or self._shared >= self._shared_limit:
            return False
        self._by_source[source.key] = held + 1
        self._shared += 1
        return True

    def give(self, source: Source) -> None:
        if source.loopback:
            self._loopback -= 1
            return
        self._shared -= 1
        held = self._by_source[source.key] - 1
        if held:
            self._by_source[source.key] = held
        else:
            del self._by_source[source.key]

    def held(self, source: Source) -> int:
        return self._loopback if source.loopback else self._by_source.get(source.key, 0)
