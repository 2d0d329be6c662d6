r"""The trio UDP shell around the gossip core: it moves bytes, time and events.

It implements the Router seam: ``lookup`` is a read of the core's table,
``advertise``/``withdraw`` become ownership deltas on the next gossip round. It is
the only gossip object the rest of the daemon touches: the election's commands
(``set_coordinator``, ``add_seed``), key rotation (``set_keyring``), and the core's
events, passed to every ``subscribe``\ d listener as they happen.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from spegeld.errors import ListenError
from spegeld.metrics import Counter, MetricsRegistry
from spegeld.netaddr import join_host_port, open_udp_socket, split_host_port, unmapped
from spegeld.routing import CoordinatorView, Peer

from ._config import GossipConfig
from ._core import GossipCore
from ._events import GossipEvent
from ._members import MemberView
from ._messages import Addr
from ._security import Keyring

logger = logging.getLogger(__name__)

RECEIVE_SIZE = 65536  # larger than any datagram we accept, so oversize ones are seen and counted
PERSIST_INTERVAL = 30.0  # seconds between saves of the last-known members
MEMBERS_FILE = "members.json"


Listener = Callable[[GossipEvent], object]
# Urgent pushes (keys of a pull starting, claims of its upstream fetches) at once, and a
# second after that: a pull of a 50-layer image claims up to 50 blobs in a burst.
URGENT_BURST = 64
URGENT_RATE = 32.0


class UrgentBudget:
    """How many urgent pushes may go now: ``URGENT_BURST`` at once, ``URGENT_RATE`` a
    second after that. Only containerd's requests on this node make urgent keys, but a
    local client asking for a new tag in a loop must not turn into a datagram storm."""

    def __init__(self) -> None:
        self._tokens = float(URGENT_BURST)
        self._at = 0.0

    def take(self, now: float) -> bool:
        self._tokens = min(float(URGENT_BURST), self._tokens + (now - self._at) * URGENT_RATE)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class GossipRouter:
    def __init__(self, core: GossipCore, bind: Addr, state_dir: Path | None = None) -> None:
        self._core = core
        self._bind = bind
        self._state_dir = state_dir
        self._socket: trio.socket.SocketType | None = None
        self.send_errors = 0
        self._ready = False
        self._metrics: tuple[Counter, Counter] | None = None
        self._exported: dict[tuple[int, str], int] = {}  # what the metrics count so far
        self._listeners: list[Listener] = []
        self._urgent = UrgentBudget()
        self._waiting: trio.CancelScope | None = None  # the run loop's wait for a datagram

    @classmethod
    def from_config(
        cls, config: GossipConfig, keyring: Keyring, bind: Addr, state_dir: Path | None = None
    ) -> GossipRouter:
        """A router around a fresh core, started at the current trio time."""
        core = GossipCore(config, keyring, random.Random(), trio.current_time())
        return cls(core, bind, state_dir)

    # ---- what the daemon tells gossip, and hears from it -----------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every event of the core from now on, in order."""
        self._listeners.append(listener)

    def set_coordinator(self, coordinator: bool) -> None:
        """Announce (or stop announcing) this node as the coordinator."""
        self._core.set_coordinator(coordinator)
        self._dispatch()

    def add_seed(self, addr: Addr) -> None:
        """Join through ``addr`` too (the coordinator's address, read from the Lease)."""
        self._core.add_seed(addr)

    def set_keyring(self, keyring: Keyring) -> None:
        """Seal and open with ``keyring`` from now on (a key rotation, on SIGHUP)."""
        self._core.set_keyring(keyring)

    def coordinator_view(self) -> tuple[CoordinatorView, str | None]:
        """What gossip says about the coordinator now; later changes come as events."""
        return self._core.coordinator_view()

    @property
    def incarnation(self) -> int:
        """This node's incarnation now: the next run must start above it."""
        return self._core.incarnation

    def _dispatch(self) -> None:
        while (event := self._core.next_event()) is not None:
            for listener in self._listeners:
                listener(event)

    # ---- the Router seam --------------------------------------------------------------

    def ready(self) -> bool:
        """Joined a cluster, or running alone on purpose (no seeds at all).

        Once ready, always ready: a seed added later (the coordinator, read from the
        Lease) must not take a serving node out of rotation while it joins.
        """
        if not self._ready:
            self._ready = not self._core.config.seeds or self._core.alive_count() > 0
        return self._ready

    def lookup(self, key: str, count: int) -> list[Peer]:
        return self._core.lookup(key, count)

    def advertise(self, keys: Iterable[str], *, urgent: bool = False) -> None:
        """Sent on the next gossip round; ``urgent`` ones also at once, to a few members,
        while the budget (``UrgentBudget``) lasts."""
        urgent = urgent and self._urgent.take(trio.current_time())
        self._core.advertise(list(keys), urgent=urgent)
        if urgent and self._waiting is not None:
            self._waiting.cancel()  # the run loop sends what the core queued now

    def withdraw(self, keys: Iterable[str]) -> None:
        self._core.withdraw(list(keys))

    # ---- metrics ------------------------------------------------------------------------

    def export_metrics(self, metrics: MetricsRegistry) -> None:
        """Count dropped datagrams and rejected records on ``metrics`` too.

        The label values are the core's reasons, a fixed set (``_security``, ``_validate``).
        """
        self._metrics = (
            metrics.counter(
                "spegeld_gossip_dropped_total",
                "Gossip datagrams dropped whole (oversize, malformed, unknown_key, bad_mac, "
                "self, replay, ...).",
                ("reason",),
            ),
            metrics.counter(
                "spegeld_gossip_rejected_total",
                "Member records and messages ignored inside authentic datagrams "
                "(name, address, registry: the mirror address, incarnation, version, ...).",
                ("reason",),
            ),
        )
        self._sync_metrics()

    def _sync_metrics(self) -> None:
        if self._metrics is None:
            return
        for which, (metric, counts) in enumerate(
            zip(self._metrics, (self._core.dropped, self._core.rejected), strict=True)
        ):
            for reason, count in counts.items():
                seen = self._exported.get((which, reason), 0)
                if count > seen:
                    metric.labels(reason=reason).inc(count - seen)
                    self._exported[(which, reason)] = count

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Addr] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        try:
            # "::" is dual-stack: IPv4 members' datagrams arrive too (netaddr).
            sock = await open_udp_socket(*self._bind)
        except OSError as exc:
            where = join_host_port(*self._bind)
            raise ListenError(f"gossip cannot listen on {where}: {exc.strerror}") from exc
        self._socket = sock
        bound = sock.getsockname()[:2]
        if not self._core.config.seeds:
            logger.info("gossip: no seeds; running alone until another node joins us")
        task_status.started((str(bound[0]), int(bound[1])))
        next_save = trio.current_time() + PERSIST_INTERVAL
        with sock:
            while True:
                deadline = min(self._core.next_deadline(), next_save)
                with trio.move_on_at(deadline) as self._waiting:
                    await self._receive(sock)
                self._waiting = None
                now = trio.current_time()
                if now >= self._core.next_deadline():
                    self._core.handle_timer(now)
                if now >= next_save:
                    self.save_members()
                    next_save = now + PERSIST_INTERVAL
                self._dispatch()
                self._sync_metrics()
                await self._flush(sock, now)

    async def _receive(self, sock: trio.socket.SocketType) -> None:
        data, addr = await sock.recvfrom(RECEIVE_SIZE)
        # A dual-stack socket names an IPv4 sender ::ffff:a.b.c.d; its record says a.b.c.d.
        self._core.receive(data, (unmapped(addr[0]), addr[1]), trio.current_time())

    async def _flush(self, sock: trio.socket.SocketType, now: float) -> None:
        for datagram, addr in self._core.datagrams_to_send(now):
            try:
                await sock.sendto(datagram, addr)
            # An unreachable member must not stop the others, nor one whose host cannot
            # even be encoded (UnicodeError, a ValueError: "a..b" fails IDNA).
            except (OSError, ValueError) as exc:
                self.send_errors += 1
                logger.debug("gossip send to %s failed: %s", addr, exc)

    async def leave(self) -> None:
        """Say goodbye, so peers mark us gone at once instead of suspecting us."""
        sock = self._socket
        if sock is None:
            return
        self._core.leave(trio.current_time())
        with trio.move_on_after(1, shield=True):
            await self._flush(sock, trio.current_time())
        self.save_members()

    # ---- seeds that outlive the process ----------------------------------------------

    def save_members(self) -> None:
        if self._state_dir is None:
            return
        alive = [m.addr for m in self._core.members() if m.state == "alive"]
        if not alive:
            return
        path = self._state_dir / MEMBERS_FILE
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"members": alive}))
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("cannot save last-known members to %s: %s", path, exc)

    def status(self) -> dict[str, Any]:
        stats = self._core.statistics()
        return {
            "node": stats.node,
            "incarnation": stats.incarnation,
            "key_fingerprint": self._core.key_fingerprint,
            "own_keys": stats.own_keys,
            "known_keys": stats.known_keys,
            "members": stats.members,
            "peers": [_peer_json(m) for m in self._core.members()],
            "coordinator": self._core.coordinator_peer(),
            "packets": {
                "in": stats.packets_in,
                "out": stats.packets_out,
                "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out,
                "send_errors": self.send_errors,
                "dropped": stats.dropped,
                "rejected": stats.rejected,
            },
        }


def _peer_json(member: MemberView) -> dict[str, Any]:
    """A member as ``/status`` shows it: the JSON still calls its mirror ``registry``."""
    return {
        ("registry" if name == "mirror" else name): value
        for name, value in dataclasses.asdict(member).items()
    }


def load_members(state_dir: Path) -> list[Addr]:
    """The last-known members saved by an earlier run, as extra seeds."""
    path = state_dir / MEMBERS_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    found: list[Addr] = []
    for entry in raw.get("members", []) if isinstance(raw, dict) else []:
        if isinstance(entry, str):
            addr = split_host_port(entry)
            if addr is not None and addr[0]:
                found.append(addr)
    return found


async def resolve_seeds(names: Sequence[str], default_port: int) -> list[Addr]:
    """``name[:port]`` → every address the name resolves to (a headless Service, say)."""
    found: list[Addr] = []
    for name in names:
        split = split_host_port(name)
        host, port = (name, default_port) if split is None else split
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError, ValueError) as exc:  # UnicodeError: "a..b" (IDNA)
            logger.warning("gossip seed name %s does not resolve: %s", name, exc)
            continue
        for info in infos:
            found.append((str(info[4][0]), int(info[4][1])))
    return list(dict.fromkeys(found))
