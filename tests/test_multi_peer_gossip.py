"""One large layer from several peers found through gossip, pulled by containerd 1.6 and 2.3
(docs/protocol.md §10; ``tests/test_multi_peer.py`` covers the faults with ``--static-peer``).

Three holders (A, B, C) have a 40 MiB single-layer image imported in their own containerd;
an edge node E holds nothing. All four run ``spegeld run`` with keyed gossip, E joining
through A. E's containerd pulls the image with ``ctr images pull`` through E's mirror,
with a real Distribution (holding the same image) as the upstream behind it: on 1.6 the
pull runs in ctr, on 2.3 in containerd's transfer service. The pull must succeed with the
layer committed (containerd checks the digest as it commits), E's swarm log line must name
at least two peers, and the upstream must see no request for the layer.

On 2.3 a second edge F pulls with the transfer service's ``concurrent_layer_fetch_buffer``
set (containerd fetches a layer in chunks, with parallel ``Range: bytes=N-`` requests):
it must get the same one verified stream from several peers: the mirror answers its
opening ``bytes=0-`` with the whole blob (200), never 206 (see the test).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from spegeld_harness import (
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
    write_cluster_key,
)

from tests._components import CONTAINERD_VERSIONS, component_dir

from ._support import configure_hosts, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

MiB = 1024 * 1024
# Over the swarm's 24 MiB threshold with room for several 2 MiB stripes per holder, and
# small enough that three imports stay around a second each.
LAYER_SIZE = 40 * MiB
HOLDERS = {"node-a": "127.0.0.2", "node-b": "127.0.0.3", "node-c": "127.0.0.4"}
# The edges: E pulls with containerd's defaults; on 2.3 also F, whose transfer service
# fetches a layer in chunks of CHUNKED with parallel open-ended Range requests.
EDGES = {"node-e": "127.0.0.5", "node-f": "127.0.0.6"}
CHUNKED = 4 * MiB  # ten chunks of the layer: enough for containerd to run 3 at once
CHUNKED_CONFIG = f"""
[plugins."io.containerd.transfer.v1.local"]
  concurrent_layer_fetch_buffer = {CHUNKED}
  max_concurrent_downloads = 3
"""
GOSSIP_DEADLINE = 30  # seconds for the nodes to meet and each edge to learn every holder
PULL_DEADLINE = 60  # seconds for one pull, a hard bound (it takes about a second)
LOCAL = 'spegeld_bytes_served_total{source="local"}'


@dataclass
class Edge:
    node: SpegeldProcess
    containerd: PrivateContainerd
    hosts_dir: Path


@dataclass
class Cluster:
    version: str
    upstream: UpstreamRegistry
    ref: str
    layer: str
    size: int  # the layer blob's bytes (a gzip of LAYER_SIZE, stored)
    blobs: set[str]
    holders: dict[str, SpegeldProcess]
    edges: dict[str, Edge]

    def nodes(self) -> list[SpegeldProcess]:
        return [*self.holders.values(), *(edge.node for edge in self.edges.values())]

    def served(self, edge: Edge) -> float:
        """Bytes the nodes other than ``edge`` served from their own store."""
        return sum(node.metric(LOCAL) for node in self.nodes() if node is not edge.node)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRegistry]:
    """One Distribution for both containerd versions (each pushes its own image)."""
    registry = UpstreamRegistry(tmp_path_factory.mktemp("upstream"))
    try:
        registry.start()
        yield registry
    finally:
        registry.close()


@pytest.fixture(scope="module", params=CONTAINERD_VERSIONS)
def cluster(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    upstream: UpstreamRegistry,
) -> Iterator[Cluster]:
    version: str = request.param
    bin_dir = None if version == "1.6" else component_dir("containerd")
    base = tmp_path_factory.mktemp(f"swarm-gossip-{version}")
    repo = f"swarm/big{version.replace('.', '')}"
    # A different seed per version: the second cluster's layer is new to the upstream.
    image = build_image(
        f"{upstream.address}/{repo}:v1", [LAYER_SIZE], seed=1404 + int(version[0]),
        workdir=base / "image", compresslevel=0,
    )  # fmt: skip
    ref = upstream.push(image, repo, "v1")
    archive = image.write_oci_archive(base / "image.tar")
    layer = image.platforms[0].layers[0]
    key = write_cluster_key(base / "cluster.key")
    edges = dict(EDGES) if version != "1.6" else {"node-e": EDGES["node-e"]}
    hosts = {**HOLDERS, **edges}
    containerds = {
        n: PrivateContainerd(
            base / f"{n}-containerd", bin_dir=bin_dir,
            extra_config=CHUNKED_CONFIG if n == "node-f" else "",
        )
        for n in hosts
    }  # fmt: skip
    nodes: dict[str, SpegeldProcess] = {}
    try:
        for name, containerd in containerds.items():
            containerd.start()
            if name in HOLDERS:
                containerd.import_image(archive)
        for name, host in hosts.items():
            seed = [nodes["node-a"].gossip_address] if nodes else []
            node = SpegeldProcess(
                base / name, containerds[name], host=host, key_file=key, peers=seed
            )
            nodes[name] = node.start()
        for name in edges:
            wait_for(
                lambda: holders_known(nodes[name], len(image.blobs)) == set(HOLDERS),  # noqa: B023
                GOSSIP_DEADLINE,
                f"{name} to learn every holder's blobs",
            )
            configure_hosts(base / f"hosts-{name}", nodes[name].url, upstream.url)
        yield Cluster(
            version, upstream, ref, layer, image.blobs[layer].size, set(image.blobs),
            {n: nodes[n] for n in HOLDERS},
            {n: Edge(nodes[n], containerds[n], base / f"hosts-{n}") for n in edges},
        )  # fmt: skip
    finally:
        for node in nodes.values():
            node.stop()
        for containerd in containerds.values():
            containerd.close()


def holders_known(edge: SpegeldProcess, blobs: int) -> set[str]:
    """The edge's gossip peers that advertise at least ``blobs`` keys."""
    peers: list[dict[str, Any]] = edge.status()["gossip"]["peers"]
    return {p["node"] for p in peers if int(p["keys"]) >= blobs}


def swarm_shares(node: SpegeldProcess, layer: str) -> dict[str, int]:
    """Bytes of ``layer`` received from each peer, from the node's one swarm log line."""
    lines = [
        json.loads(line)["msg"]
        for line in node.log_path.read_text().splitlines()
        if layer in line and " came from " in line
    ]
    assert len(lines) == 1, f"one swarm line for {layer}: {lines}"
    listed = lines[0].partition("peers: ")[2]
    return {peer: int(count) for peer, count in (item.split() for item in listed.split(", "))}


def pull_from_several_peers(cluster: Cluster, edge: Edge) -> dict[str, int]:
    """``ctr images pull`` on ``edge``; checks what both tests check, returns the shares."""
    assert edge.containerd.version.startswith(cluster.version + ".")
    since = cluster.upstream.log_position()
    edge.containerd.ctr(
        "images", "pull", "--hosts-dir", str(edge.hosts_dir), cluster.ref, timeout=PULL_DEADLINE
    )
    # containerd commits a blob only once its digest matched.
    assert all(edge.containerd.has_blob(d) for d in cluster.blobs)
    shares = swarm_shares(edge.node, cluster.layer)
    assert sum(shares.values()) == cluster.size, f"each byte came once: {shares}"
    sources = {peer for peer, count in shares.items() if count}
    assert len(sources) >= 2, f"the layer came from one peer only: {shares}"
    # A holder, or an edge that pulled the layer before (a complete holder since).
    assert sources <= set(HOLDERS) | set(EDGES), shares
    layer_requests = [
        str(r) for r in cluster.upstream.requests(since) if r.path.endswith(cluster.layer)
    ]
    assert not layer_requests, f"the upstream was asked for the layer: {layer_requests}"
    for node in cluster.nodes():
        assert "Traceback" not in node.log_path.read_text()
    return shares


def test_containerd_pulls_a_large_layer_from_several_gossip_peers(cluster: Cluster) -> None:
    served_before = {n: p.metric(LOCAL) for n, p in cluster.holders.items()}
    shares = pull_from_several_peers(cluster, cluster.edges["node-e"])
    served = {n: p.metric(LOCAL) - served_before[n] for n, p in cluster.holders.items()}
    assert sum(served[n] > 0 for n in HOLDERS) >= 2, served
    print(f"containerd {cluster.version}: shares {shares}")  # shown with pytest -s


@pytest.mark.parametrize("cluster", [pytest.param("2.3", id="2.3")], indirect=True)
def test_a_chunked_fetch_by_containerd_2_is_one_stream_from_several_peers(
    cluster: Cluster,
) -> None:
    """containerd 2.x with ``concurrent_layer_fetch_buffer`` asks ``Range: bytes=0-`` and,
    when answered 206, fetches the rest as parallel ``bytes=N-`` requests, each read for
    one chunk and closed. The mirror serves ``bytes=N-`` by fetching the whole blob from
    one peer (to check the digest, §10): N bytes more per chunk, so a 40 MiB layer in
    4 MiB chunks cost the holders 11 whole copies (measured) and no swarm. Answered 200
    (RFC 9110 lets a server ignore Range), containerd reads one stream (it logs "remote
    host ignored content range"), which the swarm serves from several peers, verified:
    what the proxy does now."""
    edge = cluster.edges["node-f"]
    served_before = cluster.served(edge)
    shares = pull_from_several_peers(cluster, edge)
    served = cluster.served(edge) - served_before
    # A holder counts a whole response's length when it hands it to sendfile: the swarm's
    # first response (the whole blob, closed after its first stripe) counts once more.
    assert served <= 2.5 * cluster.size, f"the peers sent {served / cluster.size:.1f} copies"
    print(f"chunked fetch on {cluster.version}: shares {shares}")  # shown with pytest -s
