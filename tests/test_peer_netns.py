"""A pod without the cluster key gets nothing from any node, while nodes keep sharing
(issue 13, "only nodes talk to nodes"), across network namespaces.

Three namespaces on one bridge (10.219.0.0/24, private to them): two nodes, each with a
private containerd and ``spegeld run`` as deployed by default (the mirror on the
namespace's own loopback, ``127.0.0.1:5000``; the peer listener on ``:5001``; gossip with
a shared key), and a "pod" namespace with neither key nor daemon. Node 0 imports an
image; node 1's ``ctr`` pulls it through node 1's loopback mirror with no upstream (no
route out), every byte from node 0's peer listener, signed. From the pod, by digest and
by tag, on both nodes: the mirror port refuses the connection, the peer listener answers
401, and ``/status`` and ``/metrics`` are not there.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from spegeld_harness import (
    NetnsContainerd,
    NetnsSpegeld,
    Network,
    build_image,
    host_platform,
    write_cluster_key,
)

from tests._support import created_network, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

SUBNET = "10.219.0"  # /24, private to the namespaces this test creates
MIRROR_PORT = 5000
PEER_PORT = 5001
GOSSIP_PORT = 7946
IMAGE = build_image("example.com/team/private:v1", [400_000, 50_000], seed=919)
TAG = "/v2/team/private/manifests/v1?ns=example.com"


class LoopbackSpegeld(NetnsSpegeld):
    """As deployed by default: the mirror on the namespace's loopback, which only this
    namespace (containerd, the probes' curl) reaches; peers on ``host:5001``."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def pod_curl(netns: str, url: str) -> tuple[int, str]:
    """(curl's exit code, the HTTP status and body) of a GET from the pod namespace."""
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "curl", "--silent", "--noproxy", "*", "--max-time", "5",
         "--write-out", "\n%{http_code}", url],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout


@pytest.fixture
def network() -> Iterator[Network]:
    with created_network(Network(3, SUBNET)) as net:
        yield net


@pytest.fixture
def nodes(network: Network, tmp_path: Path) -> Iterator[list[LoopbackSpegeld]]:
    key = write_cluster_key(tmp_path / "cluster.key")
    seed = f"{network.address(0)}:{GOSSIP_PORT}"
    built: list[LoopbackSpegeld] = []
    try:
        for i in range(2):
            netns = network.nodes[i]
            containerd = NetnsContainerd(tmp_path / f"node-{i}-containerd", netns)
            containerd.start()
            spegeld = LoopbackSpegeld(
                netns, tmp_path / f"node-{i}", containerd, host=network.address(i),
                port=MIRROR_PORT, peer_port=PEER_PORT, gossip_port=GOSSIP_PORT, key_file=key,
                peers=[] if i == 0 else [seed], ready_timeout=30,
                extra_args=["--tag-quorum", "1"],  # one holder answers a tag
            )  # fmt: skip
            built.append(spegeld)
            spegeld.start()
        yield built
    finally:
        for node in built:
            node.stop()
            node.containerd.close()


def test_a_pod_without_the_key_gets_nothing_from_any_node_while_nodes_share(
    network: Network, nodes: list[LoopbackSpegeld], tmp_path: Path
) -> None:
    holder, puller = nodes
    holder.containerd.import_image(IMAGE.write_oci_archive(tmp_path / "private.tar"))
    want = IMAGE.digests(host_platform())

    def learned() -> bool:
        peers = puller.status()["gossip"]["peers"]
        return any(p["node"] == holder.base_dir.name and p["keys"] > len(want) for p in peers)

    wait_for(learned, 30, "node 1 to learn node 0's keys")
    hosts_dir = tmp_path / "hosts-1"
    configured = subprocess.run(
        [sys.executable, "-m", "spegeld", "configure", "containerd", "--config-path",
         str(hosts_dir), "--mirrored-registries", "https://example.com"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert configured.returncode == 0, configured.stderr
    assert "http://127.0.0.1:5000" in (hosts_dir / "example.com" / "hosts.toml").read_text()
    # No upstream (no route out): every byte comes from node 0, over signed requests.
    puller.containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), IMAGE.name)
    assert want <= puller.containerd.content_digests()
    for digest in want:
        assert puller.containerd.blob_path(digest).read_bytes() == IMAGE.read_blob(digest)
    assert puller.metric('spegeld_bytes_served_total{source="peer"}') >= sum(
        IMAGE.blobs[d].size for d in want
    )
    assert holder.metric('spegeld_peer_auth_failures_total{reason="missing"}') == 0

    pod = network.nodes[2]
    layer = IMAGE.platforms[0].layers[0]
    for i, node in enumerate(nodes):
        address = network.address(i)
        # The mirror is on the node's loopback: from the pod, nothing listens there.
        code, _ = pod_curl(pod, f"http://{address}:{MIRROR_PORT}/v2/team/private/blobs/{layer}")
        assert code == 7, f"node {i}: the mirror port must refuse the pod (curl exit {code})"
        # The peer listener wants a node's signature: 401, by digest and by tag.
        for path in (f"/v2/team/private/blobs/{layer}?ns=example.com", TAG):
            code, out = pod_curl(pod, f"http://{address}:{PEER_PORT}{path}")
            body, _, status = out.rpartition("\n")
            assert code == 0 and status == "401", (i, path, out)
            assert '"UNAUTHORIZED"' in body
        for path in ("/status", "/metrics"):
            code, out = pod_curl(pod, f"http://{address}:{PEER_PORT}{path}")
            assert out.rpartition("\n")[2] == "404", (i, path, out)
        assert node.metric('spegeld_peer_auth_failures_total{reason="missing"}') == 2
