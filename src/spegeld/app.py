"""Wiring: the only module that constructs adapters from configuration."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from spegeld.config import ContainerdConfig, NodeConfig
from spegeld.containerd import open_containerd, socket_problem
from spegeld.errors import ConfigError
from spegeld.gossip import GossipConfig, GossipCore, Keyring, load_credential, load_key_file
from spegeld.gossip._shell import GossipRouter, load_members, resolve_seeds
from spegeld.metrics import MetricsRegistry
from spegeld.registry import Limits, Registry, RegistrySettings
from spegeld.routing import NodeId, Peer, Router, StaticRouter, advertise_store
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


def _status(
    cfg: NodeConfig, store: ContainerdStore, registry: Registry, gossip: GossipRouter | None
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "node": cfg.node_name,
        "version": _version(),
        "advertise_addr": cfg.advertise_addr,
        "registry": [f"{host}:{port}" for host, port in registry.addresses],
        "store": dataclasses.asdict(store.statistics()),
        "http": registry.statistics(),
        "coordinator": None,
    }
    if gossip is None:
        status["router"] = {"kind": "static", "peers": list(cfg.static_peers)}
    else:
        status["router"] = {"kind": "gossip"}
        status["gossip"] = gossip.status()
        status["coordinator"] = status["gossip"]["coordinator"]
    return status


INCARNATION_FILE = "incarnation"


def _next_incarnation(state_dir: Path) -> int:
    """Above any earlier run's, so peers take our news over our past's (and the replay
    window accepts us): the wall clock's second, or one more than the last run saved."""
    path = state_dir / INCARNATION_FILE
    try:
        saved = int(path.read_text().strip())
    except (OSError, ValueError):
        saved = 0
    incarnation = max(int(time.time()), saved + 1)
    _save_incarnation(state_dir, incarnation)
    return incarnation


def _save_incarnation(state_dir: Path, incarnation: int) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / INCARNATION_FILE).write_text(f"{incarnation}\n")
    except OSError as exc:
        logger.warning("cannot save the gossip incarnation in %s: %s", state_dir, exc)


async def _gossip_seeds(cfg: NodeConfig, own: tuple[str, int]) -> tuple[tuple[str, int], ...]:
    seeds = list(cfg.peers)
    seeds += await resolve_seeds(cfg.peer_dns, cfg.gossip_port)
    seeds += load_members(cfg.state_dir)
    return tuple(s for s in dict.fromkeys(seeds) if s != own)


def _version() -> str:
    return importlib.metadata.version("spegeld")


async def run_node(
    cfg: NodeConfig,
    keyring: Keyring | None,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node until SIGTERM or SIGINT, then drain and return (exit 0)."""
    metrics = MetricsRegistry()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_containerd(cfg.containerd.socket, cfg.containerd.namespace) as client:
            store = ContainerdStore(
                client, cfg.containerd.content_path, cfg.containerd.resync_interval
            )
            gossip: GossipRouter | None = None
            router: Router
            if cfg.static_peers:
                router = StaticRouter(
                    [Peer(NodeId(f"static-{addr}"), addr) for addr in cfg.static_peers]
                )
            else:
                assert keyring is not None
                own = (cfg.advertise_addr, cfg.gossip_port)
                core = GossipCore(
                    GossipConfig(
                        node=cfg.node_name,
                        addr=own,
                        registry=f"{cfg.advertise_addr}:{cfg.registry_port}",
                        incarnation=_next_incarnation(cfg.state_dir),
                        seeds=await _gossip_seeds(cfg, own),
                    ),
                    keyring,
                    random.Random(),
                    trio.current_time(),
                )
                router = gossip = GossipRouter(
                    core, (cfg.gossip_host, cfg.gossip_port), cfg.state_dir
                )
            settings = RegistrySettings(
                host=cfg.registry_host,
                port=cfg.registry_port,
                mirrored_registries=cfg.mirrored_registries,
                resolve_tags=cfg.resolve_tags,
                limits=Limits(grace_period=cfg.grace_period),
            )
            registry = Registry(
                store,
                router,
                metrics,
                settings,
                ready=lambda: store.statistics().synced and router.ready(),
                status=lambda: _status(cfg, store, registry, gossip),
            )
            registry_done = trio.Event()

            async def serve_registry(
                *, task_status: trio.TaskStatus[list[tuple[str, int]]]
            ) -> None:
                try:
                    await registry.run(task_status=task_status)
                finally:
                    registry_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.run)
                nursery.start_soon(_report_first_sync, store)
                if gossip is not None:
                    await nursery.start(gossip.run)
                await nursery.start(advertise_store, store, router)
                await nursery.start(serve_registry)
                task_status.started(registry.addresses)
                async for signum in signals:
                    logger.info(
                        "%s: stopping, in-flight responses get %.0f s",
                        signal.Signals(signum).name,
                        cfg.grace_period,
                    )
                    break
                registry.shutdown()
                if gossip is not None:
                    await gossip.leave()
                    _save_incarnation(cfg.state_dir, gossip.core.incarnation)
                await registry_done.wait()
                nursery.cancel_scope.cancel()
    logger.info("stopped")


async def _report_first_sync(store: ContainerdStore) -> None:
    await store.wait_synced()
    stats = store.statistics()
    logger.info(
        "store synced: %d images, %d digests, %d tags", stats.images, stats.digests, stats.tags
    )
