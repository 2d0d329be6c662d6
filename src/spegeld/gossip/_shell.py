"""The trio UDP shell around the gossip core: it moves bytes and time, nothing else.

It also implements the Router seam: ``lookup`` is a read of the core's table,
``advertise``/``withdraw`` become ownership deltas on the next gossip round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from spegeld.errors import ListenError
from spegeld.metrics import Counter, MetricsRegistry
from spegeld.routing import Peer

from ._core import GossipCore
from ._messages import Addr

logger = logging.getLogger(__name__)

RECEIVE_SIZE = 65536  # larger than any datagram we accept, so oversize ones are seen and counted
PERSIST_INTERVAL = 30.0  # seconds between saves of the last-known members
MEMBERS_FILE = "members.json"


class GossipRouter:
    def __init__(self, core: GossipCore, bind: Addr, state_dir: Path | None = None) -> None:
        self.core = core
        self._bind = bind
        self._state_dir = state_dir
        self._socket: trio.socket.SocketType | None = None
        self.send_errors = 0
        self._ready = False
        self._metrics: tuple[Counter, Counter] | None = None
        self._exported: dict[tuple[int, str], int] = {}  # what the metrics count so far

    # ---- the Router seam --------------------------------------------------------------

    def ready(self) -> bool:
        """Joined a cluster, or running alone on purpose (no seeds at all).

        Once ready, always ready: a seed added later (the coordinator, read from the
        Lease) must not take a serving node out of rotation while it joins.
        """
        if not self._ready:
            self._ready = not self.core.config.seeds or self.core.alive_count() > 0
        return self._ready

    def lookup(self, key: str, count: int) -> list[Peer]:
        return self.core.lookup(key, count)

    def advertise(self, keys: Iterable[str]) -> None:
        self.core.advertise(list(keys))  # sent on the next gossip round

    def withdraw(self, keys: Iterable[str]) -> None:
        self.core.withdraw(list(keys))

    # ---- metrics ------------------------------------------------------------------------

    def export_metrics(self, registry: MetricsRegistry) -> None:
        """Count dropped datagrams and rejected records on ``registry`` too.

        The label values are the core's reasons, a fixed set (``_security``, ``_validate``).
        """
        self._metrics = (
            registry.counter(
                "spegeld_gossip_dropped_total",
                "Gossip datagrams dropped whole (oversize, malformed, unknown_key, bad_mac, "
                "self, replay, ...).",
                ("reason",),
            ),
            registry.counter(
                "spegeld_gossip_rejected_total",
                "Member records and messages ignored inside authentic datagrams "
                "(name, address, registry, incarnation, version, ...).",
                ("reason",),
            ),
        )
        self._sync_metrics()

    def _sync_metrics(self) -> None:
        if self._metrics is None:
            return
        for which, (metric, counts) in enumerate(
            zip(self._metrics, (self.core.dropped, self.core.rejected), strict=True)
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
        family = socket.AF_INET6 if ":" in self._bind[0] else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await sock.bind(self._bind)
        except OSError as exc:
            sock.close()
            host, port = self._bind
            raise ListenError(f"gossip cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._socket = sock
        bound = sock.getsockname()[:2]
        if not self.core.config.seeds:
            logger.info("gossip: no seeds; running alone until another node joins us")
        task_status.started((str(bound[0]), int(bound[1])))
        next_save = trio.current_time() + PERSIST_INTERVAL
        with sock:
            while True:
                deadline = min(self.core.next_deadline(), next_save)
                with trio.move_on_at(deadline):
                    await self._receive(sock)
                now = trio.current_time()
                if now >= self.core.next_deadline():
                    self.core.handle_timer(now)
                if now >= next_save:
                    self.save_members()
                    next_save = now + PERSIST_INTERVAL
                self._sync_metrics()
                await self._flush(sock, now)

    async def _receive(self, sock: trio.socket.SocketType) -> None:
        data, addr = await sock.recvfrom(RECEIVE_SIZE)
        self.core.receive(data, (addr[0], addr[1]), trio.current_time())

    async def _flush(self, sock: trio.socket.SocketType, now: float) -> None:
        for datagram, addr in self.core.datagrams_to_send(now):
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
        self.core.leave(trio.current_time())
        with trio.move_on_after(1, shield=True):
            await self._flush(sock, trio.current_time())
        self.save_members()

    # ---- seeds that outlive the process ----------------------------------------------

    def save_members(self) -> None:
        if self._state_dir is None:
            return
        alive = [m.addr for m in self.core.members() if m.state == "alive"]
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
        stats = self.core.statistics()
        return {
            "node": stats.node,
            "incarnation": stats.incarnation,
            "key_fingerprint": self.core.key_fingerprint,
            "own_keys": stats.own_keys,
            "known_keys": stats.known_keys,
            "members": stats.members,
            "peers": [dataclasses.asdict(m) for m in self.core.members()],
            "coordinator": self.core.coordinator_peer(),
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
            host, _, port = entry.rpartition(":")
            if host and port.isdigit():
                found.append((host.strip("[]"), int(port)))
    return found


async def resolve_seeds(names: Sequence[str], default_port: int) -> list[Addr]:
    """``name[:port]`` → every address the name resolves to (a headless Service, say)."""
    found: list[Addr] = []
    for name in names:
        host, sep, port_text = name.rpartition(":")
        if not sep or not port_text.isdigit():
            host, port = name, default_port
        else:
            port = int(port_text)
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError, ValueError) as exc:  # UnicodeError: "a..b" (IDNA)
            logger.warning("gossip seed name %s does not resolve: %s", name, exc)
            continue
        for info in infos:
            found.append((str(info[4][0]), int(info[4][1])))
    return list(dict.fromkeys(found))
