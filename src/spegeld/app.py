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

from spegeld.config import ContainerdConfig, NodeConfig, parse_host_port
from spegeld.containerd import open_containerd, socket_problem
from spegeld.doctor import ApiTarget, Status, diagnose_api
from spegeld.election import CoordinatorView, ElectionConfig, Elector
from spegeld.errors import ConfigError, SpegeldError
from spegeld.gossip import (
    CoordinatorState,
    GossipConfig,
    GossipCore,
    Keyring,
    load_credential,
    load_key_file,
)
from spegeld.gossip._shell import GossipRouter, load_members, resolve_seeds
from spegeld.kube import Credentials, KubeClient, discover, ssl_context
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


def load_credentials(cfg: NodeConfig) -> Credentials | None:
    """Kubernetes credentials for the election, checked at start (a bad file is exit 2)."""
    if not cfg.lease.enabled or cfg.static_peers:
        return None
    creds = discover(cfg.lease.kubeconfig, cfg.lease.context)
    if creds is not None:
        ssl_context(creds)  # an unreadable CA or key pair fails now, not inside the daemon
    return creds


def _status(
    cfg: NodeConfig,
    store: ContainerdStore,
    registry: Registry,
    gossip: GossipRouter | None,
    coordination: Coordination,
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
    status["election"] = coordination.status()
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


PREFLIGHT_TIMEOUT = 3.0  # seconds per check at start; the daemon serves meanwhile
DIAGNOSE_TIMEOUT = 2.0  # seconds per check when a Lease call fails: the elector waits
KUBE_REQUEST_TIMEOUT = 5.0


class Coordination:
    """The coordinator election, wired to gossip: or the plain reason there is none."""

    def __init__(
        self,
        cfg: NodeConfig,
        creds: Credentials | None,
        gossip: GossipRouter | None,
        metrics: MetricsRegistry,
    ) -> None:
        self._cfg = cfg
        self._creds = creds
        self._gossip = gossip
        self._metrics = metrics
        self._target = ApiTarget(creds, cfg.lease.namespace, cfg.lease.name)
        self.elector: Elector | None = None
        self.disabled = self._why_disabled()
        self.preflight: str | None = None  # the start-up diagnosis, one line

    def _why_disabled(self) -> str | None:
        if not self._cfg.lease.enabled:
            return "--no-election: this node never contends (it still follows gossip)"
        if self._gossip is None:
            return "static peers: no gossip, so no coordinator to elect"
        if self._creds is None:
            return (
                "no --kubeconfig and not in a cluster: no coordinator election; "
                "nodes join through --peer/--peer-dns seeds and remembered members"
            )
        return None

    def status(self) -> dict[str, Any]:
        if self.elector is None:
            return {"role": "disabled", "reason": self.disabled, "preflight": self.preflight}
        stats = dataclasses.asdict(self.elector.statistics())
        stats["lease"] = f"{self._cfg.lease.namespace}/{self._cfg.lease.name}"
        stats["api"] = self._creds.server if self._creds else None
        stats["preflight"] = self.preflight
        return stats

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.disabled is not None:
            logger.info("election: off: %s", self.disabled)
            task_status.started()
            return
        assert self._creds is not None and self._gossip is not None
        gossip = self._gossip
        cfg = self._cfg
        logger.info(
            "election: contending for Lease %s/%s at %s (credentials: %s)",
            cfg.lease.namespace, cfg.lease.name, self._creds.server, self._creds.source,
        )  # fmt: skip
        election = ElectionConfig(
            identity=cfg.node_name,
            gossip_addr=f"{cfg.advertise_addr}:{cfg.gossip_port}",
            registry_addr=f"{cfg.advertise_addr}:{cfg.registry_port}",
            namespace=cfg.lease.namespace,
            name=cfg.lease.name,
        )
        async with KubeClient(
            self._creds, timeout=KUBE_REQUEST_TIMEOUT, metrics=self._metrics
        ) as client:
            self.elector = Elector(
                client,
                election,
                coordinator_view=lambda: _coordinator_view(gossip.core),
                on_leadership=self._on_leadership,
                on_holder=self._on_holder,
                diagnose=self._diagnose,
                metrics=self._metrics,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._preflight)
                await nursery.start(self.elector.run)
                task_status.started()

    async def release(self) -> None:
        if self.elector is not None:
            await self.elector.release()

    async def _preflight(self) -> None:
        result = await diagnose_api(self._target, PREFLIGHT_TIMEOUT)
        self.preflight = result.line()
        if result.status is Status.OK:
            logger.info("preflight: Kubernetes API reachable; Lease permissions ok")
        else:
            logger.warning("preflight: %s", self.preflight)

    async def _diagnose(self, exc: Exception) -> str:
        result = await diagnose_api(self._target, DIAGNOSE_TIMEOUT)
        if result.status is Status.OK:
            return f"{exc} (the API checks found nothing wrong since)"
        return result.line()

    def _on_leadership(self, leading: bool) -> None:
        assert self._gossip is not None
        self._gossip.core.set_coordinator(leading)
        logger.info("election: %s", "now the coordinator" if leading else "no longer coordinator")

    def _on_holder(self, gossip_addr: str) -> None:
        assert self._gossip is not None
        try:
            seed = parse_host_port(gossip_addr, "the Lease's gossip address")
        except SpegeldError as exc:
            logger.warning("election: %s", exc)
            return
        self._gossip.core.add_seed(seed)


def _coordinator_view(core: GossipCore) -> tuple[CoordinatorView, str | None]:
    state, node = core.coordinator_view()
    if state is CoordinatorState.SELF or state is CoordinatorState.ALIVE:
        return CoordinatorView.ALIVE, node
    if state is CoordinatorState.GONE:
        return CoordinatorView.GONE, node
    return CoordinatorView.NONE, None


async def run_node(
    cfg: NodeConfig,
    keyring: Keyring | None,
    creds: Credentials | None = None,
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
            coordination = Coordination(cfg, creds, gossip, metrics)
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
                status=lambda: _status(cfg, store, registry, gossip, coordination),
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
                await nursery.start(coordination.run)
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
                await coordination.release()
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
