"""Gossip checks: the cluster key, and a sealed ping to each known peer.

UDP has no handshake, so a silent peer is ambiguous: the ping or its ack was
dropped, or the peer holds another cluster key (it drops what it cannot verify,
on purpose). An ICMP port-unreachable is not ambiguous: nothing listens there.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from spegeld.gossip import Keyring, ack_sender, ping_datagram
from spegeld.netaddr import join_host_port

from ._model import CheckResult, Status, skipped

Addr = tuple[str, int]
MAX_PEERS = 8  # pinged concurrently; enough to tell "one peer" from "everyone" trouble
RECEIVE_SIZE = 65536


@dataclass(frozen=True, slots=True)
class GossipTarget:
    keyring: Keyring | None
    key_source: str  # "file /etc/spegeld/gossip.key", "credential gossip-key", "insecure"
    key_problem: str | None  # why the key could not be loaded
    peers: tuple[Addr, ...]
    daemon_fingerprint: str | None = None  # the running daemon's, from /status


def key_check(target: GossipTarget) -> CheckResult:
    title = "cluster key"
    if target.key_problem is not None:
        return CheckResult(
            "gossip.key",
            title,
            Status.FAIL,
            target.key_problem,
            remedy="Create one, the same file on every node: "
            "(umask 077; head -c 32 /dev/urandom | base64 > /etc/spegeld/gossip.key)",
        )
    assert target.keyring is not None
    mine = target.keyring.fingerprint()
    evidence = (f"{target.key_source}, fingerprint {mine}",)
    if target.daemon_fingerprint is not None and target.daemon_fingerprint != mine:
        return CheckResult(
            "gossip.key",
            title,
            Status.FAIL,
            f"the running daemon seals with {target.daemon_fingerprint}, this file with {mine}",
            evidence,
            "Restart spegeld after changing the key file (it is read once at start).",
        )
    if target.keyring.is_insecure:
        return CheckResult(
            "gossip.key", title, Status.WARN, "gossip is NOT authenticated", evidence
        )
    return CheckResult("gossip.key", title, Status.OK, "loaded", evidence)


async def peer_checks(target: GossipTarget, timeout: float) -> list[CheckResult]:
    if target.keyring is None:
        return [skipped("gossip.peers", "gossip peers", "no cluster key")]
    if not target.peers:
        return [
            skipped("gossip.peers", "gossip peers", "no known peers (no --peer, no saved members)")
        ]
    results: dict[Addr, CheckResult] = {}
    peers = target.peers[:MAX_PEERS]
    async with trio.open_nursery() as nursery:
        for addr in peers:
            nursery.start_soon(_ping_one, target.keyring, addr, timeout, results)
    return [results[addr] for addr in peers]


async def _ping_one(
    keyring: Keyring, addr: Addr, timeout: float, results: dict[Addr, CheckResult]
) -> None:
    results[addr] = await ping_peer(keyring, addr, timeout)


async def ping_peer(keyring: Keyring, addr: Addr, timeout: float) -> CheckResult:
    title = f"gossip peer {join_host_port(*addr)}"
    seq = secrets.randbelow(1 << 31)
    sender = f"doctor-{os.getpid()}-{secrets.token_hex(3)}"
    datagram = ping_datagram(keyring, sender, int(time.time()) & 0xFFFF_FFFF, seq)
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    started = trio.current_time()
    with sock:
        try:
            await sock.connect(addr)  # connected: an ICMP unreachable comes back as an error
            await sock.send(datagram)
            with trio.move_on_after(timeout):
                while True:
                    reply = await sock.recv(RECEIVE_SIZE)
                    node = ack_sender(keyring, reply, seq)
                    if node is not None:
                        rtt = (trio.current_time() - started) * 1000
                        return CheckResult(
                            "gossip.peers",
                            title,
                            Status.OK,
                            f"answered as {node} in {rtt:.1f} ms: reachable, same cluster key",
                        )
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                return CheckResult(
                    "gossip.peers",
                    title,
                    Status.FAIL,
                    "refused (ICMP port unreachable): no spegeld gossips there",
                    remedy="Check that spegeld runs on that node and its --gossip-addr port.",
                )
            return CheckResult("gossip.peers", title, Status.FAIL, f"{exc.strerror or exc}")
    return CheckResult(
        "gossip.peers",
        title,
        Status.FAIL,
        f"no answer in {timeout:.1f} s: UDP dropped on the way, "
        "or the peer has another cluster key",
        remedy="Allow UDP to the gossip port (7946) between nodes; use one key file everywhere.",
    )


def merge_peers(*groups: Sequence[Addr]) -> tuple[Addr, ...]:
    return tuple(dict.fromkeys(addr for group in groups for addr in group))
