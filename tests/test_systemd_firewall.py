"""The nftables table systemd/README.md gives for the node-to-node ports, loaded as written
into a network namespace: a node address reaches 5001/tcp and 7946/udp, any other address
does not, loopback does, and other ports are left alone.

Three namespaces on one bridge: n0 runs the listeners and the table, n1 plays a node (its
address is the table's node set), n2 plays a pod or any other host.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from spegeld_harness import Network

from spegeld.config import DEFAULT_GOSSIP_ADDR, DEFAULT_PEER_ADDR, parse_host_port

README = Path(__file__).resolve().parent.parent / "systemd" / "README.md"
SUBNET = "10.222.0"  # /24, private to the namespaces this test creates
OTHER_PORT = 5002  # not in the table: must stay reachable from anywhere
DROPPED_WAIT = 1.0  # seconds a client waits before calling a port dropped; a LAN answers in ms
COMMAND_TIMEOUT = 30

# Listens on the peer port, OTHER_PORT (TCP) and the gossip port (UDP, echoing).
SERVER = """
import socket, sys
tcp_ports = [int(p) for p in sys.argv[1].split(",")]
udp_port = int(sys.argv[2])
listeners = [socket.create_server(("::", p), family=socket.AF_INET6, dualstack_ipv6=True)
             for p in tcp_ports]
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
udp.bind(("::", udp_port))
print("ready", flush=True)
udp.settimeout(0.1)
while True:
    try:
        data, addr = udp.recvfrom(64)
    except TimeoutError:
        continue
    udp.sendto(data, addr)
"""

# Prints one word per probe: "open" or "dropped".
CLIENT = """
import socket, sys
host, wait = sys.argv[1], float(sys.argv[2])
for kind, port in (a.split(":") for a in sys.argv[3:]):
    if kind == "tcp":
        try:
            socket.create_connection((host, int(port)), timeout=wait).close()
            print("open")
        except TimeoutError:
            print("dropped")
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(wait)
            s.sendto(b"ping", (host, int(port)))
            try:
                s.recvfrom(64)
                print("open")
            except TimeoutError:
                print("dropped")
"""


def readme_ruleset() -> str:
    (block,) = re.findall(r"```nft\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return block


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    net = Network(3, SUBNET, prefix="spgf")
    try:
        net.create()
        yield net
    finally:
        net.close()


def test_readme_firewall_lets_only_nodes_reach_the_node_to_node_ports(network: Network) -> None:
    peer_port = parse_host_port(DEFAULT_PEER_ADDR, "--peer-addr")[1]
    gossip_port = parse_host_port(DEFAULT_GOSSIP_ADDR, "--gossip-addr")[1]
    ruleset = readme_ruleset()
    assert f"tcp dport {peer_port} drop" in ruleset
    assert f"udp dport {gossip_port} drop" in ruleset
    # The README's example subnet, replaced by the one "node" of this test.
    ruleset = ruleset.replace("192.168.1.0/24", f"{network.address(1)}/32")
    assert f"{network.address(1)}/32" in ruleset
    n0, node, other = network.nodes
    network.nft(n0, ruleset)

    server = subprocess.Popen(
        ["ip", "netns", "exec", n0, sys.executable, "-c", SERVER,
         f"{peer_port},{OTHER_PORT}", str(gossip_port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        probes = [f"tcp:{peer_port}", f"udp:{gossip_port}", f"tcp:{OTHER_PORT}"]

        def probe(netns: str, host: str) -> list[str]:
            result = subprocess.run(
                ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, host,
                 str(DROPPED_WAIT), *probes],
                capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True,
            )  # fmt: skip
            return result.stdout.split()

        target = network.address(0)
        assert probe(node, target) == ["open", "open", "open"]
        assert probe(other, target) == ["dropped", "dropped", "open"]
        assert probe(n0, "127.0.0.1") == ["open", "open", "open"]
    finally:
        server.kill()
        server.wait(COMMAND_TIMEOUT)
        if server.stdout is not None:
            server.stdout.close()
