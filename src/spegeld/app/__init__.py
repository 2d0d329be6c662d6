"""The daemon's wiring: the only package that constructs adapters from configuration."""

from spegeld.app._coordination import Coordination
from spegeld.app._node import run_node
from spegeld.app._setup import IndexReport, index_once, load_credentials, load_keyring
from spegeld.app._supervision import Supervision

__all__ = [
    "Coordination",
    "IndexReport",
    "Supervision",
    "index_once",
    "load_credentials",
    "load_keyring",
    "run_node",
]
