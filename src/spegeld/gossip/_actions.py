"""What the failure detector and anti-entropy ask of the core, as data.

Each collaborator decides from its inputs and the time, and returns these in order;
the core applies them in that order (the order is part of the protocol: a datagram
carries whatever news is queued when it is sent).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._messages import Addr, Delta, Message, State


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``messages`` to ``addr``; with ``piggyback``, news fills the rest of the datagram."""

    addr: Addr
    messages: tuple[Message, ...]
    piggyback: bool = True


@dataclass(frozen=True, slots=True)
class SendEncoded:
    """Send already encoded messages to ``addr``, with no piggybacked news."""

    addr: Addr
    parts: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class JoinVia:
    """Ask the node at ``addr`` for the member list, introducing ourselves as we are then."""

    addr: Addr


@dataclass(frozen=True, slots=True)
class Declare:
    """Move member ``node`` to ``state`` and tell everyone."""

    node: str
    state: State


@dataclass(frozen=True, slots=True)
class Forward:
    """Pass an applied ownership delta on."""

    delta: Delta


@dataclass(frozen=True, slots=True)
class ChangeKeys:
    """The member in table slot ``slot`` added and removed these keys."""

    slot: int
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReplaceKeys:
    """The member in table slot ``slot`` holds exactly ``keys`` (a whole-state transfer)."""

    slot: int
    keys: set[str]  # as assembled: not copied, so the table interns them in the same order


Action = Send | SendEncoded | JoinVia | Declare | Forward | ChangeKeys | ReplaceKeys
