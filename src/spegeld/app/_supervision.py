"""The service manager's side: sd_notify READY/STATUS, the watchdog, SIGHUP reloads."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from spegeld.app._setup import load_keyring, peer_keys
from spegeld.config import NodeConfig
from spegeld.errors import SpegeldError
from spegeld.gossip import GossipRouter
from spegeld.mirror import MirrorServer
from spegeld.status import NodeStatus
from spegeld.systemd import Notifier

logger = logging.getLogger(__name__)


STATUS_INTERVAL = 10.0  # seconds between STATUS= lines to systemd


@dataclass(frozen=True)
class Supervision:
    """What the service manager handed us: sd_notify, the watchdog, inherited sockets,
    and how to re-read the configuration on SIGHUP. All optional: a terminal has none."""

    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    watchdog: float | None = None  # seconds systemd expects pings within
    listeners: tuple[trio.SocketListener, ...] = ()  # the mirror listener's
    peer_listeners: tuple[trio.SocketListener, ...] = ()  # FileDescriptorName=peer
    metrics_listeners: tuple[trio.SocketListener, ...] = ()  # FileDescriptorName=metrics
    reload_config: Callable[[], NodeConfig] | None = None


async def notify_ready(
    notifier: Notifier, ready: Callable[[], bool], status_line: Callable[[], str]
) -> None:
    """READY=1 once the store has synced and the router is ready (what /readyz says),
    then a STATUS= line every STATUS_INTERVAL seconds."""
    while not ready():  # noqa: ASYNC110 - two components' state, no one event to wait on
        await trio.sleep(0.05)
    notifier.ready(status_line())
    while True:
        await trio.sleep(STATUS_INTERVAL)
        notifier.status(status_line())


def status_line_of(status: NodeStatus) -> str:
    """One line for ``systemctl status``: peers, coordinator, images, the last error."""
    alive = 0 if status.gossip is None else status.gossip.alive
    line = (
        f"{alive} peers alive, coordinator {status.coordinator or 'none'}, "
        f"{status.store.images} images"
    )
    error = None if status.election is None else status.election.last_error
    return f"{line}; last error: {error}" if error else line


def apply_reload(
    cfg: NodeConfig, sup: Supervision, gossip: GossipRouter | None, mirror: MirrorServer
) -> None:
    """SIGHUP: re-read the key file (applied at once, to gossip and to peer requests) and
    the config (changes are named; they apply at the next restart). A bad file is logged,
    never fatal."""
    if gossip is not None or cfg.cluster_key_file is not None:
        try:
            keyring = load_keyring(cfg)
        except SpegeldError as exc:
            logger.error("reload: the cluster key was not reloaded: %s", exc)  # noqa: TRY400
        else:
            if keyring is not None:
                if gossip is not None:
                    gossip.set_keyring(keyring)
                mirror.set_peer_keys(peer_keys(cfg, keyring))
                logger.info("reload: cluster key reloaded (%s)", keyring.fingerprint())
    if sup.reload_config is None:
        return
    try:
        fresh = sup.reload_config()
    except SpegeldError as exc:
        logger.error("reload: the configuration was not reloaded: %s", exc)  # noqa: TRY400
        return
    except Exception:  # a reload must never take the daemon down
        logger.exception("reload: the configuration was not reloaded")
        return
    changed = [
        f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(fresh, f.name)
    ]
    if changed:
        logger.warning("reload: %s changed; restart spegeld to apply", ", ".join(changed))
    else:
        logger.info("reload: configuration unchanged")
