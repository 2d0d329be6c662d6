"""What the gossip core tells its shell happened, so other parts react instead of polling.

The core queues these as it changes state; ``GossipCore.next_event()`` hands them
out oldest first. Membership events follow each member's state; ``KeysChanged``
says a member's key set changed in this node's table; ``CoordinatorChanged`` says
what gossip now knows about the coordinator (``CoordinatorView`` and the node).
"""

from __future__ import annotations

from dataclasses import dataclass

from spegeld.routing import CoordinatorView

from ._messages import State


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A member first heard of, or back after it was dead or left."""

    node: str


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    node: str


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspect refuted: alive again."""

    node: str


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member declared dead, or gone on purpose (``state`` says which); its keys went."""

    node: str
    state: State


@dataclass(frozen=True, slots=True)
class KeysChanged:
    """Member ``node``'s keys changed in the holder table."""

    node: str


@dataclass(frozen=True, slots=True)
class CoordinatorChanged:
    view: CoordinatorView
    node: str | None  # the coordinator (this node when we lead), or the one last known


GossipEvent = (
    MemberJoined | MemberSuspected | MemberAlive | MemberLeft | KeysChanged | CoordinatorChanged
)
