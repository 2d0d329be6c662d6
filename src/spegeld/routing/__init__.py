"""The Router seam: which peers hold a key. Gossip implements it; these are its twins."""

from spegeld.routing._advertise import advertise_store
from spegeld.routing._coordinator import CoordinatorView
from spegeld.routing._protocol import NodeId, Peer, Router
from spegeld.routing.memory import MemoryCluster, MemoryRouter, StaticRouter

__all__ = [
    "CoordinatorView",
    "MemoryCluster",
    "MemoryRouter",
    "NodeId",
    "Peer",
    "Router",
    "StaticRouter",
    "advertise_store",
]
