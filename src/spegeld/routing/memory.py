"""In-memory routers: a shared table for tests, and a static peer list."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ._protocol import NodeId, Peer


class MemoryCluster:
    """One shared ownership table; each node gets a :class:`MemoryRouter` view of it."""

    def __init__(self) -> None:
        self._holders: dict[str, dict[NodeId, Peer]] = {}

    def router(self, node: NodeId, mirror: str) -> MemoryRouter:
        return MemoryRouter(self, Peer(node, mirror))

    def holders(self, key: str) -> list[Peer]:
        return list(self._holders.get(key, {}).values())

    def add(self, key: str, peer: Peer) -> None:
        self._holders.setdefault(key, {})[peer.node] = peer

    def remove(self, key: str, node: NodeId) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.pop(node, None)
            if not holders:
                del self._holders[key]

    def leave(self, node: NodeId) -> None:
        """A node is gone: drop every key it held."""
        for key in list(self._holders):
            self.remove(key, node)


class MemoryRouter:
    def __init__(self, cluster: MemoryCluster, me: Peer) -> None:
        self._cluster = cluster
        self.me = me

    def ready(self) -> bool:
        return True

    def lookup(self, key: str, count: int) -> list[Peer]:
        peers = [p for p in self._cluster.holders(key) if p.node != self.me.node]
        return sorted(peers, key=lambda p: p.node)[:count]

    def advertise(self, keys: Iterable[str], *, urgent: bool = False) -> None:
        for key in keys:
            self._cluster.add(key, self.me)

    def withdraw(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._cluster.remove(key, self.me.node)


class StaticRouter:
    """Fixed peers that might hold anything: every lookup names all of them.

    A stopgap for small clusters without gossip, and for end-to-end tests. A
    miss costs one request per peer instead of a local read, because nothing
    says what each peer holds.
    """

    def __init__(self, peers: Sequence[Peer]) -> None:
        self._peers = list(peers)

    def ready(self) -> bool:
        return True

    def lookup(self, key: str, count: int) -> list[Peer]:
        return self._peers[:count]

    def advertise(self, keys: Iterable[str], *, urgent: bool = False) -> None:
        pass

    def withdraw(self, keys: Iterable[str]) -> None:
        pass
