"""IPv6 and dual-stack on loopback (issue 16 item 1): what ``::1`` can show.

- The address forms: ``:PORT`` binds ``::`` (both families) where the kernel has IPv6,
  ``[v6]:PORT`` everywhere, an unclosed bracket is a clear error.
- A dual-stack ``::`` socket (``IPV6_V6ONLY`` off) takes IPv4 and IPv6: one mirror
  listener answers a peer's proxied request over ``[::1]`` and over ``127.0.0.1``.
- Gossip: real ``GossipRouter`` shells bound ``::`` (dual-stack) exchange keys with a
  node on ``::1`` alone and, advertised at ``127.0.0.1``, with a node on ``127.0.0.1``
  alone. An IPv4 datagram reaching a dual-stack socket comes from ``::ffff:127.0.0.1``,
  which ``netaddr.unmapped`` (used by the gossip shell) turns back into ``127.0.0.1``.

The 3-node cluster with a real ``ctr`` pull over IPv6 is ``test_ipv6_netns.py``.
"""

from __future__ import annotations

import hashlib
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from spegeld_harness import build_image

from spegeld import config, netaddr
from spegeld.cli.run import default_advertise_addr
from spegeld.errors import ConfigError
from spegeld.gossip import GossipConfig, GossipCore, GossipRouter, Keyring, Timings
from spegeld.gossip._shell import load_members
from spegeld.metrics import MetricsRegistry
from spegeld.mirror import MirrorServer, MirrorSettings
from spegeld.routing import NodeId, Peer, Router, StaticRouter
from spegeld.store import MemoryStore, Store

from ._support import image_in_memory, router_knows, wait_until

IMAGE = build_image("example.com/team/v6:v1", [300_000], seed=616)
LAYER = IMAGE.platforms[0].layers[0]
BLOB_PATH = f"/v2/team/v6/blobs/{LAYER}?ns=example.com"
RING = Keyring([(1, bytes(range(32)))])
LEARN_TIMEOUT = 15.0  # seconds for a key to spread, inside the test's fail_after
FAST = Timings(probe_interval=0.2, probe_timeout=0.1, gossip_interval=0.05, sync_interval=0.2)

pytestmark = pytest.mark.skipif(not netaddr.has_ipv6(), reason="this kernel has no IPv6")


# -- address forms ---------------------------------------------------------------------


def test_an_empty_host_binds_both_families_and_brackets_are_read_and_written() -> None:
    assert config.parse_host_port(":5001", "--peer-addr") == ("::", 5001)
    assert config.parse_host_port("[::]:7946", "--gossip-addr") == ("::", 7946)
    assert config.parse_host_port("[fd00::1]:5001", "--peer") == ("fd00::1", 5001)
    assert config.parse_host_port("0.0.0.0:5001", "--peer-addr") == ("0.0.0.0", 5001)
    assert config.DEFAULT_GOSSIP_ADDR == ":7946"
    for bad in ("[fd00::1:5001", "fd00::1]:5001", "[fd00::zz]:1"):
        with pytest.raises(ConfigError, match="--peer"):
            config.parse_host_port(bad, "--peer")
    assert netaddr.join_host_port("fd00::1", 5001) == "[fd00::1]:5001"
    assert netaddr.join_host_port("10.0.0.1", 5001) == "10.0.0.1:5001"
    assert netaddr.split_host_port("[fd00::1]:7946") == ("fd00::1", 7946)
    assert netaddr.split_host_port("fd00::1:7946") == ("fd00::1", 7946)  # older writers
    assert netaddr.split_host_port("[fd00::1]") is None
    assert netaddr.unmapped("::ffff:10.1.2.3") == "10.1.2.3"
    assert netaddr.unmapped("fd00::1") == "fd00::1"


def test_last_known_members_in_either_form_are_seeds_again(tmp_path: Path) -> None:
    (tmp_path / "members.json").write_text(
        '{"members": ["[fd00::7]:7946", "10.0.0.7:7946", "fd00::8:7946", "[fd00::9", "x"]}'
    )
    assert load_members(tmp_path) == [("fd00::7", 7946), ("10.0.0.7", 7946), ("fd00::8", 7946)]


def test_the_advertised_address_falls_back_to_a_global_ipv6_address(tmp_path: Path) -> None:
    """No default route of either family (checked here through the file alone): the first
    global address that is not tentative, link-local and loopback skipped."""
    table = tmp_path / "if_inet6"
    table.write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"
        "fd000000000000000000000000000005 02 40 00 c0     eth0\n"  # 0x40: tentative (DAD)
        "fd000000000000000000000000000006 02 40 00 80     eth0\n"
    )
    from spegeld.cli.run import _global_ipv6

    assert _global_ipv6(table) == "fd00::6"
    assert _global_ipv6(tmp_path / "absent") is None
    assert default_advertise_addr(table)  # this machine has a route: its source address


# -- a dual-stack listener serves a peer's request over both families -------------------


@asynccontextmanager
async def _mirror(store: Store, router: Router, host: str) -> AsyncIterator[int]:
    server = MirrorServer(
        store,
        router,
        MetricsRegistry(),
        MirrorSettings(host=host, port=0),
        ready=lambda: True,
        status=lambda: {"node": "test"},
    )
    async with trio.open_nursery() as nursery:
        ((bound, port), *_) = await nursery.start(server.run)
        assert bound == host
        try:
            yield port
        finally:
            server.shutdown()


async def test_a_dual_stack_listener_answers_peers_over_ipv6_and_ipv4() -> None:
    want = hashlib.sha256(IMAGE.read_blob(LAYER)).hexdigest()
    with trio.fail_after(15):
        async with _mirror(image_in_memory(IMAGE), StaticRouter([]), "::") as holder_port:
            for peer_addr in (f"[::1]:{holder_port}", f"127.0.0.1:{holder_port}"):
                router = StaticRouter([Peer(NodeId("holder"), peer_addr)])
                # The asking node listens on ::1 alone: containerd reaches it at [::1].
                async with _mirror(MemoryStore(), router, "::1") as port:
                    async with httpx.AsyncClient(base_url=f"http://[::1]:{port}") as client:
                        blob = await client.get(BLOB_PATH)
                        assert blob.status_code == 200, (peer_addr, blob.text)
                        assert hashlib.sha256(blob.content).hexdigest() == want


async def test_the_dual_stack_socket_is_one_socket_with_v6only_off() -> None:
    with trio.fail_after(5):
        listeners = await netaddr.open_tcp_listeners("::", 0)
        assert len(listeners) == 1
        sock = listeners[0].socket
        with sock:
            assert sock.family == socket.AF_INET6
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        udp = await netaddr.open_udp_socket("::", 0)
        with udp:
            assert udp.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
            # An IPv4 sender, as the dual-stack socket reports it, and as gossip reads it.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as four:
                four.sendto(b"hello", ("127.0.0.1", udp.getsockname()[1]))
                data, source = await udp.recvfrom(64)
            assert (data, source[0]) == (b"hello", "::ffff:127.0.0.1")
            assert netaddr.unmapped(source[0]) == "127.0.0.1"
        only_v6 = await netaddr.open_udp_socket("::1", 0)
        with only_v6:
            assert only_v6.family == socket.AF_INET6


# -- gossip between IPv6, dual-stack and IPv4 routers -----------------------------------


def _free_udp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _router(
    name: str, bind: str, advertise: str, seeds: tuple[tuple[str, int], ...] = ()
) -> GossipRouter:
    addr = (advertise, _free_udp_port(bind if bind != "::" else "::1"))
    config_ = GossipConfig(
        node=name,
        addr=addr,
        mirror=netaddr.join_host_port(advertise, 5001),
        incarnation=1000,
        seeds=seeds,
        timings=FAST,
    )
    core = GossipCore(config_, RING, random.Random(name), trio.current_time())
    return GossipRouter(core, (bind, addr[1]))


async def _exchange_keys(routers: dict[str, GossipRouter]) -> None:
    keys = {name: f"sha256:{str(i) * 64}" for i, name in enumerate(routers)}
    for name, router in routers.items():
        router.advertise([keys[name]])
    for name, router in routers.items():
        for holder, key in keys.items():
            if holder != name:
                await wait_until(
                    lambda r=router, k=key, h=holder: router_knows(r, k, h),
                    LEARN_TIMEOUT,
                    f"{name} knows {holder}'s key",
                )


async def test_gossip_on_ipv6_and_through_a_dual_stack_socket_over_ipv4() -> None:
    """An IPv6 cluster: ``dual`` binds ``::`` (the default) and advertises ::1, ``six``
    binds ::1 alone. An IPv4 cluster: ``dual4`` binds ``::`` and advertises 127.0.0.1,
    ``four`` binds 127.0.0.1 alone. (Nodes reach each other in the family they advertise:
    a cluster advertises one family, as Kubernetes node addresses do.)"""
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            dual = _router("dual", "::", "::1")
            dual4 = _router("dual4", "::", "127.0.0.1")
            await nursery.start(dual.run)
            await nursery.start(dual4.run)
            port6, port4 = dual._core.config.addr[1], dual4._core.config.addr[1]
            six = _router("six", "::1", "::1", seeds=(("::1", port6),))
            four = _router("four", "127.0.0.1", "127.0.0.1", seeds=(("127.0.0.1", port4),))
            await nursery.start(six.run)
            await nursery.start(four.run)
            await _exchange_keys({"dual": dual, "six": six})
            await _exchange_keys({"dual4": dual4, "four": four})
            on_six = {p["node"]: p for p in dual.status()["peers"]}
            assert on_six["six"]["addr"] == f"[::1]:{six._core.config.addr[1]}"
            assert on_six["six"]["registry"] == "[::1]:5001"
            # four reaches dual4's dual-stack socket over IPv4 and is listed as it advertises.
            on_four = {p["node"]: p for p in dual4.status()["peers"]}
            assert on_four["four"]["addr"] == f"127.0.0.1:{four._core.config.addr[1]}"
            for router in (dual, six, dual4, four):
                status = router.status()
                assert all(p["state"] == "alive" for p in status["peers"]), status["peers"]
                assert status["packets"]["send_errors"] == 0
            assert dual4.status()["packets"]["rejected"] == {}
            nursery.cancel_scope.cancel()
