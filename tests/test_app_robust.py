"""The daemon's wiring refuses hostile values at its seams instead of dying of them.

A real gossip shell on loopback UDP: the coordinator's address comes from a Lease
annotation (data from the API), and a host name that cannot even be encoded (``a..b``)
used to end the gossip task, and with it the daemon, on its next round.
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from spegeld.app import Coordination
from spegeld.config import ContainerdConfig, NodeConfig
from spegeld.gossip import GossipConfig, GossipCore, GossipRouter, Keyring
from spegeld.metrics import MetricsRegistry

PORT = 17946  # loopback only; the core refuses port 0 for its own identity


def config(state_dir: Path) -> NodeConfig:
    return NodeConfig(
        node_name="n0",
        containerd=ContainerdConfig(),
        mirror_host="127.0.0.1",
        mirror_port=5000,
        advertise_addr="127.0.0.1",
        mirrored_registries=frozenset(),
        resolve_tags=True,
        static_peers=(),
        state_dir=state_dir,
        gossip_port=PORT,
    )


async def test_a_lease_naming_a_bad_gossip_address_is_ignored_and_gossip_goes_on(
    tmp_path: Path,
) -> None:
    core = GossipCore(
        GossipConfig(node="n0", addr=("127.0.0.1", PORT), mirror="127.0.0.1:5000", incarnation=1),
        Keyring.insecure(),
        random.Random(1),
        trio.current_time(),
    )
    gossip = GossipRouter(core, ("127.0.0.1", 0))
    coordination = Coordination(config(tmp_path), None, gossip, MetricsRegistry())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(gossip.run)
            for bad in ("a..b:7946", "x" * 300 + ":7946", "node.example:7946", "1.2.3.4:x"):
                coordination._on_holder(bad)
            assert core.config.seeds == (), "none of them became a seed"
            coordination._on_holder("127.0.0.2:7946")
            assert core.config.seeds == (("127.0.0.2", 7946),)
            rounds = core.statistics().packets_out
            while core.statistics().packets_out < rounds + 3:  # gossip keeps going
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
