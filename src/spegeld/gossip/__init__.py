"""Gossip: SWIM membership and digest ownership over authenticated UDP; the Router.

``GossipRouter`` (the trio shell) is what the rest of the daemon uses; ``GossipCore``
is the sans-I/O protocol machine inside it, for the simulator, benchmarks and tests.
"""

from spegeld.gossip._codec import MAX_INCARNATION
from spegeld.gossip._config import GossipConfig, GossipStatistics, Timings
from spegeld.gossip._core import GossipCore
from spegeld.gossip._events import (
    CoordinatorChanged,
    GossipEvent,
    KeysChanged,
    MemberAlive,
    MemberJoined,
    MemberLeft,
    MemberSuspected,
)
from spegeld.gossip._keyfile import load_credential, load_key_file
from spegeld.gossip._members import MemberView
from spegeld.gossip._probe import ack_sender, ping_datagram
from spegeld.gossip._security import Keyring
from spegeld.gossip._shell import GossipRouter, load_members, resolve_seeds
from spegeld.gossip._validate import INCARNATION_SLACK, OWN_SLACK

__all__ = [
    "INCARNATION_SLACK",
    "MAX_INCARNATION",
    "OWN_SLACK",
    "CoordinatorChanged",
    "GossipConfig",
    "GossipCore",
    "GossipEvent",
    "GossipRouter",
    "GossipStatistics",
    "Keyring",
    "KeysChanged",
    "MemberAlive",
    "MemberJoined",
    "MemberLeft",
    "MemberSuspected",
    "MemberView",
    "Timings",
    "ack_sender",
    "load_credential",
    "load_key_file",
    "load_members",
    "ping_datagram",
    "resolve_seeds",
]
