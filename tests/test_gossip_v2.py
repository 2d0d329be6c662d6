"""Gossip datagram version 2 over real UDP on loopback: confidential, upgradable, no reflection.

Real ``GossipRouter`` shells (the daemon's gossip, its trio UDP socket and timers) on
127.0.13.x addresses. A node with ``v1="only"`` stands for a node from before version 2:
it speaks and hears version 1 exactly as that code did (the simulator shows the same
datagrams, docs/protocol.md §1); only its StatePull answers follow the new rule.

The capture reads every UDP payload on ``lo`` with an AF_PACKET socket (we run as root),
so nothing sits between the nodes: what it records is what crossed the wire.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from spegeld.gossip import GossipConfig, GossipCore, GossipRouter, Keyring, Timings
from spegeld.gossip._codec import encode_message, encode_sender
from spegeld.gossip._messages import Delta, Member, Message, Ping, State, StatePull
from spegeld.gossip._sealed import (
    ANYONE,
    HEADER_SIZE_V2,
    MAX_DATAGRAM_V2,
    Ciphers,
    open_any,
    recipient_id,
    seal_v2,
)
from spegeld.gossip._security import DroppedPacket, seal
from spegeld.gossip._wire import V1Policy

from ._support import router_knows, wait_until

UNTIL = 20.0  # seconds for gossip to converge, inside every test's fail_after
RING = Keyring([(1, bytes(range(32)))])
FAST = Timings(probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, sync_interval=0.2)
# Strings a private registry would not want on the node network.
SECRET_TAG = "registry.payroll.example/team-ledger/payroll-api:v7.3.1"
SECRET_STRINGS = (b"registry.payroll.example", b"team-ledger", b"payroll-api", b"v7.3.1")
ETH_P_ALL = 0x0003
SO_RCVBUFFORCE = 33  # Linux: a receive buffer past rmem_max (root); Python lacks the name


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _router(i: int, v1: V1Policy, seeds: tuple[tuple[str, int], ...] = ()) -> GossipRouter:
    host = f"127.0.13.{i}"
    addr = (host, _free_port(host))
    config = GossipConfig(
        node=f"node-{i}",
        addr=addr,
        mirror=f"{host}:5001",
        incarnation=1000 + i,
        seeds=seeds,
        timings=FAST,
        v1=v1,
    )
    core = GossipCore(config, RING, random.Random(i), trio.current_time())
    return GossipRouter(core, addr)


class Capture:
    """Every UDP payload sent to or from ``ports`` on the loopback interface."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self.payloads: list[bytes] = []
        self.ends: list[tuple[int, int]] = []  # (source port, destination port) of each

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with sock:
            # Room for bursts: lo shows every packet twice, and a state answer is a burst.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
            await sock.bind(("lo", 0))
            task_status.started()
            while True:
                frame, where = await sock.recvfrom(65536)
                if where[2] != socket.PACKET_HOST:  # lo shows each packet twice: keep one
                    continue
                self._take(frame[14:])  # past the Ethernet header

    def _take(self, ip: bytes) -> None:
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_UDP:
            return
        udp = ip[(ip[0] & 0x0F) * 4 :]
        source, destination, length = struct.unpack_from(">HHH", udp)
        if source in self.ports or destination in self.ports:
            self.payloads.append(bytes(udp[8:length]))
            self.ends.append((source, destination))


@asynccontextmanager
async def _cluster(capture: Capture | None = None) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        if capture is not None:
            await nursery.start(capture.run)
        yield nursery
        nursery.cancel_scope.cancel()


async def _start(nursery: trio.Nursery, router: GossipRouter, capture: Capture | None) -> None:
    addr = await nursery.start(router.run)
    if capture is not None:
        capture.ports.add(addr[1])


@pytest.mark.parametrize("v1", ["refuse", "only"])
async def test_a_capture_between_two_nodes_shows_no_registry_repository_or_tag(
    v1: V1Policy,
) -> None:
    """Version 2 hides what nodes hold; the same run in version 1 shows it (the control)."""
    capture = Capture()
    with trio.fail_after(30):
        async with _cluster(capture) as nursery:
            a = _router(1, v1)
            await _start(nursery, a, capture)
            b = _router(2, v1, seeds=(a._core.config.addr,))
            await _start(nursery, b, capture)
            a.advertise([SECRET_TAG])
            b.advertise([f"sha256:{'ab' * 32}"])
            await wait_until(
                lambda: router_knows(b, SECRET_TAG, "node-1"), UNTIL, "b learns a's tag"
            )
            await wait_until(
                lambda: router_knows(a, f"sha256:{'ab' * 32}", "node-2"), UNTIL, "a learns b's key"
            )
            await trio.sleep(0.5)  # some steady traffic too
    traffic = b"\n".join(capture.payloads)
    versions = {payload[2] for payload in capture.payloads if payload[:2] == b"SG"}
    assert len(capture.payloads) > 20
    if v1 == "refuse":
        assert versions == {2}
        assert not [s for s in SECRET_STRINGS if s in traffic]
        assert b"node-1" not in traffic  # node names are hidden too
    else:
        assert versions == {1}
        assert all(s in traffic for s in SECRET_STRINGS)


async def test_a_mixed_cluster_converges_and_upgraded_nodes_speak_version_2() -> None:
    """Rolling upgrade: two old nodes, two upgraded (accept); then old ones leave and a
    node that refuses version 1 joins the upgraded ones."""
    with trio.fail_after(60):
        async with _cluster() as nursery:
            old1 = _router(11, "only")
            await _start(nursery, old1, None)
            seed = (old1._core.config.addr,)
            nodes = [old1]
            for i, v1 in ((12, "only"), (13, "accept"), (14, "accept")):
                nodes.append(_router(i, v1, seeds=seed))
                await _start(nursery, nodes[-1], None)
            for router in nodes:
                router.advertise([f"key-of-{router._core.node}"])

            def converged(group: list[GossipRouter]) -> bool:
                return all(
                    router_knows(r, f"key-of-{o._core.node}", o._core.node)
                    for r in group
                    for o in group
                    if o is not r
                )

            await wait_until(lambda: converged(nodes), UNTIL, "every node holds every other's key")
            old2, new1, new2 = nodes[1], nodes[2], nodes[3]
            await wait_until(
                lambda: (
                    new1._core.wire.speaks_v2("node-14") and new2._core.wire.speaks_v2("node-13")
                ),
                UNTIL,
                "the upgraded nodes hear each other in version 2",
            )
            assert not new1._core.wire.speaks_v2("node-11")
            assert not new2._core.wire.speaks_v2("node-12")
            assert old1._core.dropped["malformed"] > 0  # hellos an old node cannot read
            assert all(r._core.alive_count() == 3 for r in nodes)

            # The old nodes are upgraded away; a node refusing version 1 joins.
            await old1.leave()
            await old2.leave()
            new3 = _router(15, "refuse", seeds=(new1._core.config.addr,))
            await _start(nursery, new3, None)
            new3.advertise(["key-of-node-15"])
            upgraded = [new1, new2, new3]
            await wait_until(lambda: converged(upgraded), UNTIL, "the upgraded nodes share keys")
            await wait_until(
                lambda: all(r._core.alive_count() >= 2 for r in upgraded), UNTIL, "all alive"
            )
            # An accepting node speaks version 1 to a newcomer until it hears it in version 2
            # (a refusing node drops those few as v1_refused); then version 2 only.
            assert new1._core.wire.speaks_v2("node-15") and new2._core.wire.speaks_v2("node-15")


async def test_a_spoofed_state_pull_sends_nothing_to_its_source() -> None:
    """A StatePull with a forged source (sealed by a key holder, the worst case) is
    answered at the puller's registered address, and a stranger's pull not at all."""
    keys = [f"sha256:{i:064x}" for i in range(300)]  # about 11 chunks
    capture = Capture()
    with trio.fail_after(30):
        async with _cluster(capture) as nursery:
            a = _router(21, "accept")
            await _start(nursery, a, capture)
            b = _router(22, "accept", seeds=(a._core.config.addr,))
            await _start(nursery, b, capture)
            b.advertise(keys)
            await wait_until(
                lambda: all(router_knows(a, k, "node-22") for k in keys), UNTIL, "a holds b's keys"
            )
            victim = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with victim:
                await victim.bind(("127.0.13.99", 0))
                target = b._core.config.addr
                seen = len(capture.ends)
                strangers = b._core.rejected["stranger"]  # a join may count one or two
                for sender, incarnation in (("node-21", 1 << 31), ("mallory", 1)):
                    pull = encode_sender(sender) + encode_message(StatePull("node-22", 0))
                    await victim.sendto(seal(RING, incarnation, 1, pull), target)
                received = 0
                with trio.move_on_after(2):
                    while True:
                        await victim.recvfrom(65536)
                        received += 1
            assert received == 0  # nothing reflected at the forged source
            assert b._core.rejected["stranger"] == strangers + 1  # mallory is nobody's member
            # The answer went to a's registered address instead: about 11 full chunks.
            ends = (b._core.config.addr[1], a._core.config.addr[1])
            chunks = [
                payload
                for payload, where in zip(capture.payloads[seen:], capture.ends[seen:], strict=True)
                if where == ends and len(payload) > 900
            ]
            assert len(chunks) >= 10


# --- the framing and the receiving rules, sans-I/O ------------------------------------------


def _core(name: str, v1: V1Policy = "accept") -> GossipCore:
    config = GossipConfig(name, ("10.13.0.1", 7946), "10.13.0.1:5001", 1, v1=v1)
    return GossipCore(config, RING, random.Random(0), 0.0)


def _v2(recipient: bytes, *messages: Message, sender: str = "x", sequence: int = 1) -> bytes:
    payload = encode_sender(sender) + b"".join(encode_message(m) for m in messages)
    return seal_v2(Ciphers(RING), 7, sequence, recipient, payload, bytes(range(12)))


def test_version_2_round_trips_and_any_change_is_refused() -> None:
    datagram = _v2(recipient_id("c"), Ping(5))
    assert len(datagram) == HEADER_SIZE_V2 + len(encode_sender("x") + encode_message(Ping(5))) + 16
    assert datagram[:4] == b"SG\x02\x01" and datagram[12:20] == recipient_id("c")
    opened = open_any(Ciphers(RING), datagram)
    assert (opened.version, opened.incarnation, opened.sequence) == (2, 7, 1)
    assert opened.payload == encode_sender("x") + encode_message(Ping(5))
    assert opened.payload not in datagram  # encrypted
    reasons = set()
    for at in range(len(datagram)):
        damaged = bytearray(datagram)
        damaged[at] ^= 0x40
        with pytest.raises(DroppedPacket) as info:
            open_any(Ciphers(RING), bytes(damaged))
        reasons.add(info.value.reason)
    assert reasons == {"malformed", "unknown_key", "bad_mac"}
    with pytest.raises(DroppedPacket) as info:
        open_any(Ciphers(Keyring([(1, bytes(32))])), datagram)  # same id, another secret
    assert info.value.reason == "bad_mac"
    assert len(_v2(ANYONE, Delta("x", 1, ("k" * 500,) * 2, ()))) <= MAX_DATAGRAM_V2


def test_a_version_2_datagram_for_another_node_is_dropped_as_misaddressed() -> None:
    c = _core("c")
    c.receive(_v2(recipient_id("b"), Ping(5)), ("10.13.0.9", 7946), 0.0)
    news = Member("x", 7, State.ALIVE, ("10.13.0.9", 7946), "h:1", 0, False)
    c.receive(_v2(ANYONE, news), ("10.13.0.9", 7946), 0.0)
    assert c.dropped == {"recipient": 2} and not c.datagrams_to_send(0.0)
    c.receive(_v2(ANYONE, Ping(5), sequence=2), ("10.13.0.9", 7946), 0.0)  # doctor's ping
    ((ack, to),) = c.datagrams_to_send(0.0)
    assert to == ("10.13.0.9", 7946) and ack[2] == 2 and ack[12:20] == recipient_id("x")
    c.receive(_v2(recipient_id("c"), Ping(6), sequence=3), ("10.13.0.9", 7946), 0.0)
    assert len(c.datagrams_to_send(0.0)) == 1 and c.dropped == {"recipient": 2}


def test_refuse_drops_version_1_and_an_old_node_drops_version_2() -> None:
    ping = encode_sender("x") + encode_message(Ping(5))
    refusing, old = _core("c", "refuse"), _core("c", "only")
    refusing.receive(seal(RING, 7, 1, ping), ("10.13.0.9", 7946), 0.0)
    old.receive(_v2(recipient_id("c"), Ping(5)), ("10.13.0.9", 7946), 0.0)
    assert refusing.dropped == {"v1_refused": 1} and old.dropped == {"malformed": 1}
    old.receive(seal(RING, 7, 2, ping), ("10.13.0.9", 7946), 0.0)
    ((ack, _),) = old.datagrams_to_send(0.0)
    assert ack[2] == 1  # an old node answers in version 1
