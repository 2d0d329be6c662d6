"""What the daemon reads before it runs: the key, credentials, incarnation, seeds."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from spegeld.config import ContainerdConfig, NodeConfig
from spegeld.containerd import open_containerd, socket_problem
from spegeld.errors import ConfigError
from spegeld.gossip import (
    Keyring,
    load_credential,
    load_key_file,
)
from spegeld.gossip._shell import load_members, resolve_seeds
from spegeld.kube import Credentials, discover, ssl_context
from spegeld.store import ContainerdStore, Snapshot

logger = logging.getLogger(__name__)


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


def load_keyring(cfg: NodeConfig) -> Keyring | None:
    """The gossip keyring, read once at start; None when gossip is off (static peers)."""
    if cfg.static_peers:
        return None
    if cfg.cluster_key_file is not None:
        keyring, warnings = load_key_file(cfg.cluster_key_file)
    elif (credential := load_credential()) is not None:
        keyring, warnings = credential
    elif cfg.insecure_gossip:
        logger.warning("gossip is NOT authenticated (--insecure-gossip): use it only in labs")
        return Keyring.insecure()
    else:
        raise ConfigError(
            "gossip needs a cluster key: --cluster-key-file PATH "
            "(or a systemd credential named gossip-key, or --insecure-gossip for labs)"
        )
    for warning in warnings:
        logger.warning("%s", warning)
    return keyring


INCARNATION_FILE = "incarnation"


def next_incarnation(state_dir: Path) -> int:
    """Above any earlier run's, so peers take our news over our past's (and the replay
    window accepts us): the wall clock's second, or one more than the last run saved."""
    path = state_dir / INCARNATION_FILE
    try:
        saved = int(path.read_text().strip())
    except (OSError, ValueError):
        saved = 0
    incarnation = max(int(time.time()), saved + 1)
    save_incarnation(state_dir, incarnation)
    return incarnation


def save_incarnation(state_dir: Path, incarnation: int) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / INCARNATION_FILE).write_text(f"{incarnation}\n")
    except OSError as exc:
        logger.warning("cannot save the gossip incarnation in %s: %s", state_dir, exc)


async def gossip_seeds(cfg: NodeConfig, own: tuple[str, int]) -> tuple[tuple[str, int], ...]:
    seeds = list(cfg.peers)
    seeds += await resolve_seeds(cfg.peer_dns, cfg.gossip_port)
    seeds += load_members(cfg.state_dir)
    return tuple(s for s in dict.fromkeys(seeds) if s != own)


def version() -> str:
    return importlib.metadata.version("spegeld")


def load_credentials(cfg: NodeConfig) -> Credentials | None:
    """Kubernetes credentials for the election, checked at start (a bad file is exit 2)."""
    if not cfg.lease.enabled or cfg.static_peers:
        return None
    creds = discover(cfg.lease.kubeconfig, cfg.lease.context)
    if creds is not None:
        ssl_context(creds)  # an unreadable CA or key pair fails now, not inside the daemon
    return creds
