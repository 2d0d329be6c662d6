"""The gossip core's settings, its record of each member, and what it reports.

Apart from ``_core`` so that the core's helpers (``_failure``, ``_sync``) can name
these types without importing the core at run time.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ._messages import Addr, Member, State
from ._ownership import PeerKeys


@dataclass(frozen=True, slots=True)
class Timings:
    """memberlist's LAN defaults, plus the ownership repair timings."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    retransmit_mult: int = 4
    suspicion_mult: float = 4.0
    sync_interval: float = 1.0
    gap_timeout: float = 1.0  # a version gap this old pulls the owner's whole state
    join_retry: float = 1.0
    dead_forget: float = 60.0  # a dead member's record (and incarnation) is kept this long


class CoordinatorState(enum.Enum):
    SELF = "self"
    ALIVE = "alive"
    GONE = "gone"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class GossipConfig:
    node: str
    addr: Addr
    registry: str
    incarnation: int  # start above any earlier run's: the shell uses the wall clock
    seeds: tuple[Addr, ...] = ()
    timings: Timings = field(default_factory=Timings)


@dataclass(slots=True)
class PeerRecord:
    """What this node holds about one member."""

    node: str
    slot: int
    incarnation: int
    state: State
    addr: Addr
    registry: str
    coordinator: bool
    since: float  # when the state last changed
    keys: PeerKeys
    rtt: float | None = None

    def as_member(self) -> Member:
        """This record as gossip carries it."""
        return Member(
            self.node,
            self.incarnation,
            self.state,
            self.addr,
            self.registry,
            self.keys.version,
            self.coordinator,
        )

    def superseded_by(self, member: Member) -> bool:
        """Whether ``member`` is newer news than this record, and replaces it."""
        if member.state is State.ALIVE:
            return member.incarnation > self.incarnation or (
                member.incarnation == self.incarnation
                and self.state is State.ALIVE
                and (member.addr, member.registry, member.coordinator)
                != (self.addr, self.registry, self.coordinator)
            )
        if member.state is State.SUSPECT:
            return member.incarnation > self.incarnation or (
                member.incarnation == self.incarnation and self.state is State.ALIVE
            )
        return member.incarnation >= self.incarnation and self.state not in (State.DEAD, State.LEFT)


@dataclass(frozen=True, slots=True)
class MemberView:
    node: str
    state: str
    incarnation: int
    addr: str
    registry: str
    rtt_ms: float | None
    keys: int
    version: int
    coordinator: bool


@dataclass(frozen=True, slots=True)
class GossipStatistics:
    node: str
    incarnation: int
    own_keys: int
    own_version: int
    known_keys: int
    members: dict[str, int]
    packets_in: int
    packets_out: int
    bytes_in: int
    bytes_out: int
    dropped: dict[str, int]  # whole datagrams, by reason
    rejected: dict[str, int]  # records and messages ignored, by reason (``_validate``)


def member_views(peers: Iterable[PeerRecord], key_count: Callable[[int], int]) -> list[MemberView]:
    """The member table as ``/status`` shows it, by node name."""
    views = [
        MemberView(
            node=peer.node,
            state=peer.state.name.lower(),
            incarnation=peer.incarnation,
            addr=f"{peer.addr[0]}:{peer.addr[1]}",
            registry=peer.registry,
            rtt_ms=None if peer.rtt is None else round(peer.rtt * 1000, 3),
            keys=key_count(peer.slot),
            version=peer.keys.version,
            coordinator=peer.coordinator,
        )
        for peer in peers
    ]
    return sorted(views, key=lambda v: v.node)


def coordinator_view(peers: Iterable[PeerRecord]) -> tuple[CoordinatorState, str | None]:
    """What the member table says about the coordinator, when it is not this node.

    ALIVE: a live member leads, so followers leave the API alone. GONE: members exist
    but none alive leads (the coordinator is suspect, dead, left, or stepped down).
    NONE: no members at all, so no view.
    """
    members = list(peers)
    flagged = [p for p in members if p.coordinator]
    alive = [p for p in flagged if p.state is State.ALIVE]
    if alive:
        return CoordinatorState.ALIVE, max(alive, key=lambda p: p.incarnation).node
    if not members:
        return CoordinatorState.NONE, None
    gone = max(flagged, key=lambda p: p.incarnation).node if flagged else None
    return CoordinatorState.GONE, gone
