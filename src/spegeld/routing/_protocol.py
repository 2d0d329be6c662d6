"""The Router seam: who holds a key, as a local read."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NewType, Protocol

NodeId = NewType("NodeId", str)


@dataclass(frozen=True, slots=True)
class Peer:
    """A member that may hold content: its id and its mirror's ``host:port``."""

    node: NodeId
    mirror: str


class Router(Protocol):
    def ready(self) -> bool:
        """Whether lookups mean something yet (joined, or alone on purpose)."""
        ...

    def lookup(self, key: str, count: int) -> list[Peer]:
        """Up to ``count`` holders of ``key``, best first, never this node."""
        ...

    def advertise(self, keys: Iterable[str], *, urgent: bool = False) -> None:
        """This node now holds ``keys``. ``urgent``: tell the other nodes now, not with the
        next round of news, for keys whose worth is in their timing (a pull starting)."""
        ...

    def withdraw(self, keys: Iterable[str]) -> None:
        """This node no longer holds ``keys``."""
        ...
