"""Gossip messages as typed, frozen data. The codec turns them into msgpack and back."""

from __future__ import annotations

import enum
from dataclasses import dataclass

Addr = tuple[str, int]


class State(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3  # dead on purpose: a graceful stop


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to ping ``target`` on our behalf and relay the ack."""

    seq: int
    target: str
    target_addr: Addr


@dataclass(frozen=True, slots=True)
class Member:
    """What everyone should believe about one node: SWIM's alive/suspect/dead news.

    ``version`` is the node's ownership version when this was said; a receiver
    that knows less of the node's keys pulls its state.
    """

    node: str
    incarnation: int
    state: State
    addr: Addr
    mirror: str  # its mirror's host:port, as peers dial it
    version: int
    coordinator: bool = False


@dataclass(frozen=True, slots=True)
class Delta:
    """One change to ``node``'s key set: ``version`` follows ``version - 1``."""

    node: str
    version: int
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Summary:
    """Anti-entropy: the sender's view of some members (Scuttlebutt digest)."""

    members: tuple[Member, ...]
    reply: bool


@dataclass(frozen=True, slots=True)
class StatePull:
    """Send me ``node``'s whole key set; I have it only up to ``have``."""

    node: str
    have: int


@dataclass(frozen=True, slots=True)
class StateChunk:
    """Part ``index`` of ``count`` of ``node``'s whole key set at ``version``."""

    node: str
    version: int
    index: int
    count: int
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Join:
    """A node asks a seed for the member list; it introduces itself in ``member``."""

    member: Member


Message = Ping | Ack | PingReq | Member | Delta | Summary | StatePull | StateChunk | Join
