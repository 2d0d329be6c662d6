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
    MAX_INCARNATION,
    OWN_SLACK,
    Keyring,
    load_credential,
    load_key_file,
    load_members,
    resolve_seeds,
)
from spegeld.kube import Credentials, discover, ssl_context
from spegeld.mirror import AUTH_KEY_LABEL, PeerKeys
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
        await store.find_content_path()
        await store.sync()
        return IndexReport(store.list(), store.statistics().warnings)


def load_keyring(cfg: NodeConfig) -> Keyring | None:
    """The cluster keyring (gossip, and the peer requests), read at start and on SIGHUP.

    With static peers there is no gossip: the key file, when one is named, still signs
    and checks peer requests; without one, None (peer requests unauthenticated).
    """
    if cfg.static_peers and cfg.cluster_key_file is None:
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
# Enough for any number an honest run saves (at most ten digits); a longer file is not ours.
_INCARNATION_READ = 64
# The highest incarnation a run starts with: the rest of the u32 is left for refutations
# and sequence wraps (``OWN_SLACK`` of them). Only a wall clock past early 2106 reaches it.
START_LIMIT = MAX_INCARNATION - OWN_SLACK


def next_incarnation(state_dir: Path) -> int:
    """Above any earlier run's, so peers take our news over our past's (and the replay
    window accepts us): the wall clock's second, or one more than the last run saved.

    A saved value more than ``OWN_SLACK`` past the wall clock was pushed there by a
    member (or the clock went back that far): starting at it would put this node
    outside its peers' horizon, or past what a datagram header can carry. It is set
    aside for the wall clock, at the cost of being ignored for about a minute by
    peers that saw the higher one (until they forget it).
    """
    path = state_dir / INCARNATION_FILE
    wall = max(0, int(time.time()))
    saved = _saved_incarnation(path)
    incarnation = wall if saved is None else max(wall, saved + 1)
    if incarnation > wall + OWN_SLACK:
        logger.warning(
            "gossip incarnation %d in %s is more than %d s ahead of the wall clock (%d): "
            "a member pushed it, or the clock went back; starting from the clock. Peers "
            "that saw the higher one hear this node again once they forget it",
            incarnation - 1,
            path,
            OWN_SLACK,
            wall,
        )
        incarnation = wall
    if incarnation > START_LIMIT:
        logger.warning(
            "the wall clock (%d) is past what a 32-bit gossip incarnation can follow; "
            "starting at %d: gossip needs a wider incarnation before 2106",
            wall,
            START_LIMIT,
        )
        incarnation = START_LIMIT
    save_incarnation(state_dir, incarnation)
    return incarnation


def _saved_incarnation(path: Path) -> int | None:
    """The last run's incarnation; None (with a warning) for a file that is not one."""
    try:
        with path.open("rb") as file:
            raw = file.read(_INCARNATION_READ + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("cannot read the gossip incarnation %s: %s; using the clock", path, exc)
        return None
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > _INCARNATION_READ or not text.isdigit() or int(text) > MAX_INCARNATION:
        logger.warning(
            "ignoring %s: %r is not an incarnation (0..%d); using the clock",
            path,
            text[:20],
            MAX_INCARNATION,
        )
        return None
    return int(text)


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


def peer_address(cfg: NodeConfig) -> str:
    """Where peers reach this node's peer listener, as gossip and the Lease advertise it:
    ``host:port``, or ``[v6]:port`` as peers parse it."""
    host = f"[{cfg.advertise_addr}]" if ":" in cfg.advertise_addr else cfg.advertise_addr
    return f"{host}:{cfg.peer_port}"


def peer_keys(cfg: NodeConfig, keyring: Keyring | None) -> PeerKeys:
    """The mirror's view of the cluster key: keys derived for peer requests only."""
    keys = () if keyring is None else keyring.derive(AUTH_KEY_LABEL)
    return PeerKeys(cfg.node_name, keys)


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
