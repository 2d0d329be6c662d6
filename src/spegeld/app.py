"""Wiring: the only module that constructs adapters from configuration."""

from __future__ import annotations

from dataclasses import dataclass

from spegeld.config import ContainerdConfig
from spegeld.containerd import open_containerd, socket_problem
from spegeld.store import ContainerdStore, Snapshot


@dataclass(frozen=True, slots=True)
class IndexReport:
    snapshot: Snapshot
    warnings: tuple[str, ...]


async def index_once(cfg: ContainerdConfig) -> IndexReport:
    """Build the local index once, for ``spegeld images``: no retries, clear errors."""
    problem = socket_problem(cfg.socket)
    if problem is not None:
        raise problem
    async with open_containerd(cfg.socket, cfg.namespace) as client:
        await client.version()
        store = ContainerdStore(client, cfg.content_path, cfg.resync_interval)
        await store.sync()
        return IndexReport(store.list(), store.statistics().warnings)
