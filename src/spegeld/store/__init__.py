"""The Store seam: the local index of what containerd holds."""

from spegeld.store._containerd import ContainerdStore, StoreStatistics
from spegeld.store._contentpath import (
    ContentPath,
    ContentSource,
    ask_containerd,
    choose_content_path,
)
from spegeld.store._ingest import INFLIGHT_PREFIX, Ingest, inflight_key
from spegeld.store._protocol import KeysChanged, OpenBlob, Snapshot, Store
from spegeld.store.memory import MemoryStore

__all__ = [
    "INFLIGHT_PREFIX",
    "Ingest",
    "inflight_key",
    "ContainerdStore",
    "ContentPath",
    "ContentSource",
    "ask_containerd",
    "choose_content_path",
    "KeysChanged",
    "MemoryStore",
    "OpenBlob",
    "Snapshot",
    "Store",
    "StoreStatistics",
]
