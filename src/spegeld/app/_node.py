"""Wiring: the only place that constructs adapters from configuration."""

from __future__ import annotations

import logging
import signal

import trio

from spegeld.app._coordination import Coordination
from spegeld.app._setup import (
    gossip_seeds,
    next_incarnation,
    peer_address,
    peer_keys,
    save_incarnation,
    version,
)
from spegeld.app._supervision import Supervision, apply_reload, notify_ready, status_line_of
from spegeld.config import NodeConfig
from spegeld.containerd import open_containerd
from spegeld.gossip import GossipConfig, GossipRouter, Keyring
from spegeld.kube import Credentials
from spegeld.metrics import MetricsRegistry
from spegeld.mirror import Limits, Listen, MirrorServer, MirrorSettings, PeerKeys, ProxySettings
from spegeld.netaddr import join_host_port
from spegeld.oci import ShareFilter
from spegeld.processmetrics import with_process_metrics
from spegeld.routing import NodeId, Peer, Router, StaticRouter, advertise_store
from spegeld.status import (
    ElectionStatus,
    GossipStatus,
    HttpStatus,
    NodeStatus,
    RouterStatus,
    SharingStatus,
    StoreStatus,
)
from spegeld.store import ContainerdStore
from spegeld.systemd import serve_watchdog

logger = logging.getLogger(__name__)


def _status(
    cfg: NodeConfig,
    store: ContainerdStore,
    mirror: MirrorServer,
    gossip: GossipRouter | None,
    coordination: Coordination,
) -> NodeStatus:
    """The node's one status, built from each component's own report; ``/status`` serves
    it, the STATUS= line and ``spegeld status`` read it."""
    stats = store.statistics()
    return NodeStatus(
        node=cfg.node_name,
        version=version(),
        advertise_addr=cfg.advertise_addr,
        mirror=tuple(join_host_port(host, port) for host, port in mirror.addresses),
        store=StoreStatus(
            images=stats.images,
            digests=stats.digests,
            loose_blobs=stats.loose_blobs,
            tags=stats.tags,
            full_syncs=stats.full_syncs,
            events_applied=stats.events_applied,
            synced=stats.synced,
            direct_reads=stats.direct_reads,
            read_mode=stats.read_mode,
            file_reads=stats.file_reads,
            grpc_reads=stats.grpc_reads,
            warnings=stats.warnings,
        ),
        http=HttpStatus.from_json(mirror.statistics()),
        router=(
            RouterStatus("static", tuple(cfg.static_peers))
            if gossip is None
            else RouterStatus("gossip")
        ),
        # The gossip shell and the coordination report plain dicts; read them once, here.
        gossip=None if gossip is None else GossipStatus.from_json(gossip.status()),
        election=ElectionStatus.from_json(coordination.status()),
        sharing=SharingStatus(
            registry_filters=cfg.registry_filters,
            registry_includes=cfg.registry_includes,
            tag_quorum=cfg.tag_quorum,
            withheld_images=store.withheld_images(),
        ),
    )


async def _router(cfg: NodeConfig, keyring: Keyring | None) -> tuple[Router, GossipRouter | None]:
    """The static router (``--static-peer``), or gossip: the router and its shell."""
    if cfg.static_peers:
        return StaticRouter(
            [Peer(NodeId(f"static-{addr}"), addr) for addr in cfg.static_peers]
        ), None
    assert keyring is not None
    own = (cfg.advertise_addr, cfg.gossip_port)
    gossip = GossipRouter.from_config(
        GossipConfig(
            node=cfg.node_name,
            addr=own,
            mirror=peer_address(cfg),  # peers fetch from the peer listener
            incarnation=next_incarnation(cfg.state_dir),
            seeds=await gossip_seeds(cfg, own),
            v1="refuse" if cfg.gossip_v1 == "refuse" else "accept",
        ),
        keyring,
        (cfg.gossip_host, cfg.gossip_port),
        cfg.state_dir,
    )
    return gossip, gossip


def _metrics_listener(cfg: NodeConfig, sup: Supervision) -> Listen | None:
    """``--metrics-addr``, or a passed socket named ``metrics``; None: neither."""
    if sup.metrics_listeners:
        return Listen(cfg.metrics_host or "", cfg.metrics_port, sup.metrics_listeners)
    if cfg.metrics_host is None:
        return None
    return Listen(cfg.metrics_host, cfg.metrics_port)


def _peer_keys(cfg: NodeConfig, keyring: Keyring | None) -> PeerKeys:
    """The keys peer requests are signed and checked with; a warning, once, if none."""
    keys = peer_keys(cfg, keyring)
    if not keys.secure:
        logger.warning(
            "node-to-node requests are NOT authenticated (no cluster key): anyone who "
            "reaches --peer-addr %s:%d can fetch any content this node holds",
            cfg.peer_host,
            cfg.peer_port,
        )
    return keys


def _coordinates_pulls(wanted: bool, gossip: bool, share: ShareFilter) -> bool:
    """Whether the mirror coordinates pulls (docs/protocol.md §9). Static peers name every
    peer for every key, so no pull could be told apart; with names required (filters, a
    private registry) nothing is shared in flight, so there would be no download to follow."""
    return wanted and gossip and not share.names_required


async def run_node(
    cfg: NodeConfig,
    keyring: Keyring | None,
    creds: Credentials | None = None,
    supervision: Supervision | None = None,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node until SIGTERM or SIGINT, then drain and return (exit 0).

    SIGHUP reloads what can change under a running daemon (the cluster key file) and
    says which changed settings need a restart.
    """
    metrics = with_process_metrics(MetricsRegistry())
    sup = supervision or Supervision()
    notifier = sup.notifier
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with open_containerd(cfg.containerd.socket, cfg.containerd.namespace) as client:
            share = ShareFilter.parse(
                cfg.registry_includes,
                cfg.registry_filters,
                private=(registry for registry, _ in cfg.private_registries),
            )
            store = ContainerdStore(
                client,
                cfg.containerd.content_path,
                cfg.containerd.resync_interval,
                metrics=metrics,
                share=share,
            )
            router, gossip = await _router(cfg, keyring)
            if gossip is not None:
                gossip.export_metrics(metrics)
            coordination = Coordination(cfg, creds, gossip, metrics)
            settings = MirrorSettings(
                host=cfg.mirror_host,
                port=cfg.mirror_port,
                mirrored_registries=cfg.mirrored_registries,
                resolve_tags=cfg.resolve_tags,
                share=share,
                proxy=ProxySettings(tag_quorum=cfg.tag_quorum),
                limits=Limits(grace_period=cfg.grace_period),
                inherited=sup.listeners,
                peer=Listen(cfg.peer_host, cfg.peer_port, sup.peer_listeners),
                metrics=_metrics_listener(cfg, sup),
                private_registries=cfg.private_registries,
                coordinate_pulls=_coordinates_pulls(
                    cfg.coordinate_pulls, gossip is not None, share
                ),
            )
            mirror = MirrorServer(
                store,
                router,
                metrics,
                settings,
                ready=lambda: store.statistics().synced and router.ready(),
                status=lambda: _status(cfg, store, mirror, gossip, coordination).to_json(),
                discard_partial=client.abort_ingests,
                peer_keys=_peer_keys(cfg, keyring),
            )
            mirror_done = trio.Event()

            async def serve_mirror(*, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                try:
                    await mirror.run(task_status=task_status)
                finally:
                    mirror_done.set()

            def status_line() -> str:
                return status_line_of(_status(cfg, store, mirror, gossip, coordination))

            async with trio.open_nursery() as nursery:
                if sup.watchdog is not None:
                    await nursery.start(serve_watchdog, notifier, sup.watchdog)
                nursery.start_soon(store.run)
                nursery.start_soon(_report_first_sync, store)
                if gossip is not None:
                    await nursery.start(gossip.run)
                await nursery.start(advertise_store, store, router)
                await nursery.start(coordination.run)
                await nursery.start(serve_mirror)
                task_status.started(mirror.addresses)
                nursery.start_soon(
                    notify_ready, notifier, lambda: store.statistics().synced and router.ready(),
                    status_line,
                )  # fmt: skip
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        notifier.reloading("reloading")
                        apply_reload(cfg, sup, gossip, mirror)
                        notifier.ready(status_line())
                        continue
                    logger.info(
                        "%s: stopping, in-flight responses get %.0f s",
                        signal.Signals(signum).name,
                        cfg.grace_period,
                    )
                    break
                notifier.stopping("stopping")
                mirror.shutdown()
                await coordination.release()
                if gossip is not None:
                    await gossip.leave()
                    save_incarnation(cfg.state_dir, gossip.incarnation)
                await mirror_done.wait()
                nursery.cancel_scope.cancel()
    logger.info("stopped")


async def _report_first_sync(store: ContainerdStore) -> None:
    await store.wait_synced()
    stats = store.statistics()
    logger.info(
        "store synced: %d images, %d digests, %d tags", stats.images, stats.digests, stats.tags
    )
