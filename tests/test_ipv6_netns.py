"""A 3-node cluster on IPv6 alone (issue 16 item 1): gossip, peers, ``hosts.toml``,
``status`` and ``doctor`` with no IPv4 address beyond loopback.

Four namespaces made here (a bridge and three nodes, ``spegeld_harness.Network6``): each
node has only a random ULA address ``fdXX:…::N/64`` on ``eth0``, duplicate address
detection off, no default route. Each runs a private containerd and ``spegeld run`` with
the address defaults: ``--peer-addr :5001`` and ``--gossip-addr :7946`` bind ``::``, no
``--advertise-addr`` (the daemon finds its IPv6 address itself). The mirror is on
``[::1]:5000`` for containerd 2.3 (``spegeld configure containerd --mirror-target
http://[::1]:5000``), on ``127.0.0.1:5000`` for 1.6, which cannot read an IPv6 literal
in ``hosts.toml``. Nodes 1 and 2 join through node 0's ``[addr]:7946``.

Node 0 imports an image; node 1's ``ctr`` pulls it through its loopback mirror with no
upstream (``example.com`` has no route from here): every byte comes from node 0's peer
listener over IPv6. One cluster per containerd version for the module: the checks share it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator

import pytest
from spegeld_harness import (
    NetnsContainerd,
    NetnsSpegeld,
    Network6,
    build_image,
    host_platform,
    host_port,
    write_cluster_key,
)

from tests._components import component_dir
from tests._support import created_network, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

MIRROR_PORT = 5000
PEER_PORT = 5001
GOSSIP_PORT = 7946
NODES = 3
IMAGE = build_image("example.com/team/six:v1", [400_000, 60_000], seed=606)


class Ipv6Spegeld(NetnsSpegeld):
    """``spegeld run`` with the address defaults; ``host`` is the node's IPv6 address
    (what peers and ``--peer`` seeds use), the mirror on ``mirror_host``'s loopback."""

    mirror_host = "::1"

    @property
    def address(self) -> str:
        return host_port(self.mirror_host, self.port)

    @property
    def peer_address(self) -> str:
        return f":{self.peer_port}"

    @property
    def gossip_address(self) -> str:
        return f":{self.gossip_port}"

    def argv(self) -> list[str]:
        argv = super().argv()
        at = argv.index("--advertise-addr")
        del argv[at : at + 2]  # the default: the daemon finds the node's address
        return argv


def in_netns(netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", netns, *argv],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def network() -> Iterator[Network6]:
    with created_network(Network6(NODES)) as net:
        yield net


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("1.6", id="1.6"),
        pytest.param("2.3", id="2.3", marks=pytest.mark.containerd2),
    ],
)
def nodes(
    network: Network6, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[list[Ipv6Spegeld]]:
    """The three nodes, once on Debian's containerd 1.6 and once on the built 2.3."""
    bin_dir = None if request.param == "1.6" else component_dir("containerd")
    # containerd 1.6 and 1.7 cannot read [host."http://[::1]:5000"] (go-toml v1; spegeld
    # configure warns): with them the mirror stays on IPv4 loopback, which IPv6-only
    # nodes have too. Peers and gossip are IPv6 either way.
    mirror_host = "127.0.0.1" if request.param == "1.6" else "::1"
    base = tmp_path_factory.mktemp(f"ipv6-{request.param}")
    key = write_cluster_key(base / "cluster.key")
    seed = f"[{network.address(0)}]:{GOSSIP_PORT}"
    built: list[Ipv6Spegeld] = []
    try:
        for i in range(NODES):
            netns = network.nodes[i]
            containerd = NetnsContainerd(base / f"node-{i}-containerd", netns, bin_dir=bin_dir)
            containerd.start()
            spegeld = Ipv6Spegeld(
                netns, base / f"node-{i}", containerd, host=network.address(i),
                port=MIRROR_PORT, peer_port=PEER_PORT, gossip_port=GOSSIP_PORT, key_file=key,
                peers=[] if i == 0 else [seed], ready_timeout=30,
                extra_args=["--tag-quorum", "1"],  # one holder answers the tag
            )  # fmt: skip
            spegeld.mirror_host = mirror_host
            built.append(spegeld)
            spegeld.start()
        yield built
    finally:
        for node in built:
            node.stop()
            node.containerd.close()


def test_the_nodes_have_ipv6_alone(network: Network6) -> None:
    for i, netns in enumerate(network.nodes):
        shown = in_netns(netns, "ip", "-json", "addr", "show", "dev", "eth0")
        families = {a["family"] for link in json.loads(shown.stdout) for a in link["addr_info"]}
        assert families == {"inet6"}, (i, shown.stdout)


def test_defaults_advertise_the_ipv6_address_and_bind_dual_stack(
    network: Network6, nodes: list[Ipv6Spegeld]
) -> None:
    for i, node in enumerate(nodes):
        status = node.status()
        assert status["advertise_addr"] == network.address(i)
        assert status["registry"] == [node.address]
    for i, node in enumerate(nodes):
        # Every other node, at its bracketed address, with its peer listener's port.
        others = {f"[{network.address(j)}]" for j in range(NODES) if j != i}

        def joined(node: Ipv6Spegeld = node, others: set[str] = others) -> bool:
            peers = node.status()["gossip"]["peers"]
            alive = [p for p in peers if p["state"] == "alive"]
            return {p["addr"].rpartition(":")[0] for p in alive} == others

        wait_for(joined, 20, f"node {i} to see the others alive")
        for peer in node.status()["gossip"]["peers"]:
            host = peer["addr"].rpartition(":")[0]
            assert peer["addr"] == f"{host}:{GOSSIP_PORT}"
            assert peer["registry"] == f"{host}:{PEER_PORT}"
    # The sockets: one dual-stack listener on [::]:5001, gossip on [::]:7946.
    listening = in_netns(network.nodes[0], "ss", "-Hlntu").stdout
    assert "[::]:5001" in listening or "*:5001" in listening, listening
    assert "[::]:7946" in listening or "*:7946" in listening, listening


def test_a_pull_on_one_node_comes_from_the_other_over_ipv6(
    network: Network6, nodes: list[Ipv6Spegeld]
) -> None:
    holder, puller = nodes[0], nodes[1]
    base = holder.base_dir.parent
    holder.containerd.import_image(IMAGE.write_oci_archive(base / "six.tar"))
    want = IMAGE.digests(host_platform())

    def learned() -> bool:
        peers = puller.status()["gossip"]["peers"]
        return any(p["node"] == holder.base_dir.name and p["keys"] > len(want) for p in peers)

    wait_for(learned, 30, "node 1 to learn node 0's keys")
    hosts_dir = base / "hosts-1"
    configured = subprocess.run(
        [sys.executable, "-m", "spegeld", "configure", "containerd", "--config-path",
         str(hosts_dir), "--mirror-target", f"http://{puller.address}",
         "--mirrored-registries", "https://example.com"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert configured.returncode == 0, configured.stderr
    assert ("containerd 1.6 and 1.7 cannot read" in configured.stderr) == (
        puller.mirror_host == "::1"
    )
    written = tomllib.loads((hosts_dir / "example.com" / "hosts.toml").read_text())
    assert list(written["host"]) == [f"http://{puller.address}"]
    puller.containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), IMAGE.name)
    assert want <= puller.containerd.content_digests()
    for digest in want:
        assert puller.containerd.blob_path(digest).read_bytes() == IMAGE.read_blob(digest)
    assert puller.metric('spegeld_bytes_served_total{source="peer"}') >= sum(
        IMAGE.blobs[d].size for d in want
    )


def test_status_and_doctor_speak_ipv6(network: Network6, nodes: list[Ipv6Spegeld]) -> None:
    base = nodes[0].base_dir.parent
    netns = network.nodes[2]
    shown = in_netns(netns, sys.executable, "-m", "spegeld", "status", "--registry-addr",
                     nodes[2].address, "--json")  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["advertise_addr"] == network.address(2)
    # A terminal wide enough that rich does not wrap the addresses.
    table = in_netns(netns, "env", "COLUMNS=200", sys.executable, "-m", "spegeld", "status",
                     "--registry-addr", nodes[2].address)  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert f"[{network.address(0)}]:{PEER_PORT}" in table.stdout
    assert nodes[2].key_file is not None
    doctor = in_netns(
        netns, sys.executable, "-m", "spegeld", "doctor", "--only", "gossip", "--json",
        "--registry-addr", nodes[2].address, "--cluster-key-file", str(nodes[2].key_file),
        "--state-dir", str(base / "doctor-state"),
    )  # fmt: skip
    report = json.loads(doctor.stdout)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    titles = {c["title"] for c in report["checks"] if c["status"] == "ok"}
    for i in (0, 1):  # pinged over IPv6, each answering with the cluster key
        assert f"gossip peer [{network.address(i)}]:{GOSSIP_PORT}" in titles, report
