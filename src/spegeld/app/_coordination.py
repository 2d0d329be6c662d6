"""The coordinator election wired to gossip and the API, or the plain reason there is none."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from typing import Any

import trio

from spegeld.app._setup import peer_address
from spegeld.config import NodeConfig, parse_host_port
from spegeld.doctor import ApiTarget, Status, diagnose_api
from spegeld.election import ElectionConfig, Elector, KubeLeaseStore
from spegeld.errors import SpegeldError
from spegeld.gossip import CoordinatorChanged, GossipEvent, GossipRouter
from spegeld.kube import Credentials, KubeClient
from spegeld.metrics import MetricsRegistry
from spegeld.netaddr import join_host_port

logger = logging.getLogger(__name__)

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
            gossip_addr=join_host_port(cfg.advertise_addr, cfg.gossip_port),
            mirror_addr=peer_address(cfg),  # where peers fetch: the peer listener
        )
        async with KubeClient(
            self._creds, timeout=KUBE_REQUEST_TIMEOUT, metrics=self._metrics
        ) as client:
            self.elector = Elector(
                KubeLeaseStore(client, cfg.lease.namespace, cfg.lease.name),
                election,
                on_leadership=self._on_leadership,
                on_holder=self._on_holder,
                diagnose=self._diagnose,
                metrics=self._metrics,
            )
            # The election reacts to what gossip says about the coordinator, as it changes.
            self.elector.set_coordinator_view(*gossip.coordinator_view())
            gossip.subscribe(self._on_gossip_event)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._preflight)
                await nursery.start(self.elector.run)
                task_status.started()

    async def release(self) -> None:
        if self.elector is not None:
            await self.elector.release()

    async def _preflight(self) -> None:
        try:
            result = await diagnose_api(self._target, PREFLIGHT_TIMEOUT)
        except Exception as exc:  # a check that breaks must not take the daemon down
            logger.warning("preflight: the API checks failed: %s", exc, exc_info=True)
            return
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

    def _on_gossip_event(self, event: GossipEvent) -> None:
        if isinstance(event, CoordinatorChanged) and self.elector is not None:
            self.elector.set_coordinator_view(event.view, event.node)

    def _on_leadership(self, leading: bool) -> None:
        assert self._gossip is not None
        self._gossip.set_coordinator(leading)
        logger.info("election: %s", "now the coordinator" if leading else "no longer coordinator")

    def _on_holder(self, gossip_addr: str) -> None:
        """Join through the coordinator the Lease names. The annotation is data from the
        API: anything but an IP and a port (what every node writes: --advertise-addr
        takes an IP) is refused here, since a host name would cost a DNS lookup per
        datagram, and one that is not even encodable (``a..b``) used to end gossip."""
        assert self._gossip is not None
        try:
            seed = parse_host_port(gossip_addr, "the Lease's gossip address")
            ipaddress.ip_address(seed[0])
        except (SpegeldError, ValueError):
            logger.warning(
                "election: the Lease's gossip address %r is not IP:PORT; not used as a seed",
                gossip_addr[:100],
            )
            return
        self._gossip.add_seed(seed)
