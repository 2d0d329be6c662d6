"""Gossip: SWIM membership and digest ownership over authenticated UDP; the Router."""

from spegeld.gossip._core import (
    GossipConfig,
    GossipCore,
    GossipStatistics,
    MemberView,
    Timings,
)
from spegeld.gossip._keyfile import load_credential, load_key_file
from spegeld.gossip._security import Keyring

__all__ = [
    "GossipConfig",
    "GossipCore",
    "GossipStatistics",
    "Keyring",
    "MemberView",
    "Timings",
    "load_credential",
    "load_key_file",
]
