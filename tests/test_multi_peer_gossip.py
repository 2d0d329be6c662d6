"""One large layer from several peers found through gossip, pulled by containerd 1.6 and 2.3
(docs/protocol.md §10; ``tests/test_multi_peer.py`` covers the faults with ``--static-peer``).

Three holders (A, B, C) have a 40 MiB single-layer image imported in their own containerd;
an edge node E holds nothing. All four run ``spegeld run`` with keyed gossip, E joining
through A. E's containerd pulls the image with ``ctr images pull`` through E's mirror,
with a real Distribution (holding the same image) as the upstream behind it: on 1.6 the
pull runs in ctr, on 2.3 in containerd's transfer service. The pull must succeed with the
layer committed (containerd checks the digest as it commits), E's swarm log line must name
at least two peers, and the upstream must see no request for the layer.
"""

from __future__ import annotations

import json
import signal
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

from tests._components import component_dir

from ._support import configure_hosts, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

MiB = 1024 * 1024
# Over the swarm's 24 MiB threshold with room for several 2 MiB stripes per holder, and
# small enough that three imports stay around a second each.
LAYER_SIZE = 40 * MiB
HOLDERS = {"node-a": "127.0.0.2", "node-b": "127.0.0.3", "node-c": "127.0.0.4"}
EDGE = ("node-e", "127.0.0.5")
GOSSIP_DEADLINE = 30  # seconds for the four to meet and E to learn every holder's keys
PULL_DEADLINE = 60  # seconds for E's pull, a hard bound (it takes about a second)
LOCAL = 'spegeld_bytes_served_total{source="local"}'


@dataclass
class Cluster:
    version: str
    base: Path
    upstream: UpstreamRegistry
    ref: str
    layer: str
    size: int  # the layer blob's bytes (a gzip of LAYER_SIZE, stored)
    blobs: set[str]
    holders: dict[str, SpegeldProcess]
    edge: SpegeldProcess
    edge_containerd: PrivateContainerd


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamRegistry]:
    """One Distribution for both containerd versions (each pushes its own image)."""
    registry = UpstreamRegistry(tmp_path_factory.mktemp("upstream"))
    try:
        registry.start()
        yield registry
    finally:
        registry.close()


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("1.6", id="1.6"),
        pytest.param("2.3", id="2.3", marks=pytest.mark.containerd2),
    ],
)
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
    names = [*HOLDERS, EDGE[0]]
    containerds = {n: PrivateContainerd(base / f"{n}-containerd", bin_dir=bin_dir) for n in names}
    nodes: dict[str, SpegeldProcess] = {}
    try:
        for name, containerd in containerds.items():
            containerd.start()
            if name in HOLDERS:
                containerd.import_image(archive)
        hosts = {**HOLDERS, EDGE[0]: EDGE[1]}
        for name in names:
            seed = [nodes["node-a"].gossip_address] if nodes else []
            node = SpegeldProcess(
                base / name, containerds[name], host=hosts[name], key_file=key, peers=seed
            )
            nodes[name] = node.start()
        edge = nodes[EDGE[0]]
        wait_for(
            lambda: holders_known(edge, len(image.blobs)) == len(HOLDERS),
            GOSSIP_DEADLINE,
            "the edge to learn every holder's blobs",
        )
        configure_hosts(base / "hosts", edge.url, upstream.url)
        yield Cluster(
            version, base, upstream, ref, layer, image.blobs[layer].size, set(image.blobs),
            {n: nodes[n] for n in HOLDERS}, edge, containerds[EDGE[0]],
        )  # fmt: skip
    finally:
        for node in nodes.values():
            node.send_signal(signal.SIGCONT)
            node.stop()
        for containerd in containerds.values():
            containerd.close()


def holders_known(edge: SpegeldProcess, blobs: int) -> int:
    """How many of the edge's gossip peers advertise at least ``blobs`` keys."""
    peers: list[dict[str, Any]] = edge.status()["gossip"]["peers"]
    return sum(int(p["keys"]) >= blobs for p in peers)


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


def test_containerd_pulls_a_large_layer_from_several_gossip_peers(cluster: Cluster) -> None:
    assert cluster.edge_containerd.version.startswith(cluster.version + ".")
    served_before = {n: p.metric(LOCAL) for n, p in cluster.holders.items()}
    since = cluster.upstream.log_position()
    cluster.edge_containerd.ctr(
        "images", "pull", "--hosts-dir", str(cluster.base / "hosts"), cluster.ref,
        timeout=PULL_DEADLINE,
    )  # fmt: skip
    # containerd commits a blob only once its digest matched.
    assert all(cluster.edge_containerd.has_blob(d) for d in cluster.blobs)
    shares = swarm_shares(cluster.edge, cluster.layer)
    assert sum(shares.values()) == cluster.size, f"each byte came once: {shares}"
    sources = {peer for peer, count in shares.items() if count}
    assert len(sources) >= 2, f"the layer came from one peer only: {shares}"
    assert sources <= set(HOLDERS), shares
    served = {n: p.metric(LOCAL) - served_before[n] for n, p in cluster.holders.items()}
    assert sum(served[n] > 0 for n in HOLDERS) >= 2, served
    layer_requests = [
        str(r) for r in cluster.upstream.requests(since) if r.path.endswith(cluster.layer)
    ]
    assert not layer_requests, f"the upstream was asked for the layer: {layer_requests}"
    print(f"containerd {cluster.version}: shares {shares}")  # shown with pytest -s
    for node in [*cluster.holders.values(), cluster.edge]:
        assert "Traceback" not in node.log_path.read_text()
