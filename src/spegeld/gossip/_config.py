"""The gossip core's settings and its statistics report: plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._messages import Addr
from ._wire import V1Policy


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


@dataclass(frozen=True, slots=True)
class GossipConfig:
    node: str
    addr: Addr
    mirror: str  # this node's mirror, host:port, as peers dial it
    incarnation: int  # start above any earlier run's: the shell uses the wall clock
    seeds: tuple[Addr, ...] = ()
    timings: Timings = field(default_factory=Timings)
    v1: V1Policy = "accept"  # datagram version 1: accept, refuse, or only (``_wire``)


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
