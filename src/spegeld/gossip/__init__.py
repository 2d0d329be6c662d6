"""Gossip: SWIM membership and digest ownership over authenticated UDP; the Router."""

from spegeld.gossip._codec import MAX_INCARNATION
from spegeld.gossip._core import (
    CoordinatorState,
    GossipConfig,
    GossipCore,
    GossipStatistics,
    MemberView,
    Timings,
)
from spegeld.gossip._keyfile import load_credential, load_key_file
from spegeld.gossip._probe import ack_sender, ping_datagram
from spegeld.gossip._security import Keyring
from spegeld.gossip._shell import load_members
from spegeld.gossip._validate import INCARNATION_SLACK, OWN_SLACK

__all__ = [
    "INCARNATION_SLACK",
    "MAX_INCARNATION",
    "OWN_SLACK",
    "CoordinatorState",
    "GossipConfig",
    "GossipCore",
    "GossipStatistics",
    "Keyring",
    "MemberView",
    "Timings",
    "ack_sender",
    "load_credential",
    "load_key_file",
    "load_members",
    "ping_datagram",
]
