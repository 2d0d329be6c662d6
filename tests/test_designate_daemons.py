"""One upstream copy when several nodes pull at once (issue 14 item 2, docs/protocol.md
§9), end to end: three ``spegeld run`` daemons with keyed gossip, three real containerds
(Debian's 1.6, then the built 2.3), a real Distribution behind a slow loopback link
(``_slowrelay``: the pulls must overlap, see there why).

- All three pull the same 4-layer image at the same moment: every blob is fetched from
  the upstream about once (each node's designated layers), the others stream them from
  the designated node's download, and every containerd verified every blob.
- The designated node's spegeld is killed as its pull starts: the others wait for it at
  most the bound, then fetch from the upstream, and all pulls finish.
- A node pulling alone: its blob misses go to the upstream at once (measured).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from spegeld_harness import (
    BuiltImage,
    CtrError,
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
    write_cluster_key,
)

from spegeld.mirror._designate import WAIT_FOR_DESIGNATED, designated

from ._components import CONTAINERD_VERSIONS, component_dir
from ._slowrelay import SlowRelay
from ._support import configure_hosts, upstream_waits, wait_for

pytestmark = pytest.mark.containerd

MiB = 1024 * 1024
RATE = 3 * MiB  # bytes/s per upstream connection: a 6 MiB layer takes 2 s
LAYERS = [6 * MiB, 6 * MiB, 6 * MiB, 6 * MiB]
DEADLINE = 90  # seconds for one scenario, a hard bound on every wait below
NAMES = ["node-a", "node-b", "node-c"]


@dataclass
class Cluster:
    base: Path
    upstream: UpstreamRegistry
    relay: SlowRelay
    containerds: list[PrivateContainerd]
    nodes: list[SpegeldProcess]

    def pull_all(self, ref: str, which: list[int]) -> tuple[list[float], list[Exception]]:
        """``ctr images pull`` on the nodes ``which`` at the same moment; durations."""
        durations = [0.0] * len(self.nodes)
        failures: list[Exception] = []
        gate = threading.Barrier(len(which))

        def run(i: int) -> None:
            gate.wait(10)
            start = time.monotonic()
            try:
                self.containerds[i].ctr(
                    "images", "pull", "--hosts-dir", str(self.base / f"hosts-{i}"), ref,
                    timeout=DEADLINE,
                )  # fmt: skip
            except CtrError as exc:
                failures.append(exc)
            durations[i] = time.monotonic() - start

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in which]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE)
        assert not any(t.is_alive() for t in threads), "a pull did not finish"
        return durations, failures


@pytest.fixture(scope="module", params=CONTAINERD_VERSIONS)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """On 1.6 the pull runs in ctr; on 2.3 in containerd's transfer service (its own
    requests, User-Agent included, are what the mirror sees)."""
    bin_dir = None if request.param == "1.6" else component_dir("containerd")
    base = tmp_path_factory.mktemp(f"designate-{request.param}")
    upstream = UpstreamRegistry(base / "upstream")
    containerds = [PrivateContainerd(base / f"{n}-containerd", bin_dir=bin_dir) for n in NAMES]
    key = write_cluster_key(base / "cluster.key")
    try:
        upstream.start()
        for c in containerds:
            c.start()
        host, port = upstream.address.split(":")
        with SlowRelay((host, int(port)), RATE) as relay:
            nodes: list[SpegeldProcess] = []
            try:
                for i, name in enumerate(NAMES):
                    peers = [nodes[0].gossip_address] if nodes else []
                    node = SpegeldProcess(
                        base / name, containerds[i], host=f"127.0.0.{i + 2}", key_file=key,
                        peers=peers,
                    )  # fmt: skip
                    node.start()
                    nodes.append(node)
                    configure_hosts(base / f"hosts-{i}", node.url, f"http://{relay.address}")
                wait_for(lambda: all(len(gossip_peers(n)) == 2 for n in nodes), 20, "gossip")
                # A node's first key after joining reaches the others in about 1 s, later
                # ones in 0.1-0.2 s (measured: docs/protocol.md §9). A real node has
                # advertised long before a pull; here each advertises one key first.
                for node in nodes:  # a pull of an unknown image (only containerd's count)
                    node.get("/v2/warmup/x/manifests/v0?ns=example.com", method="HEAD",
                             headers={"User-Agent": "containerd/warmup"})  # fmt: skip
                wait_for(
                    lambda: all(int(p["keys"]) > 0 for n in nodes for p in gossip_peers(n)),
                    20,
                    "every node to know a key of every other",
                )
                yield Cluster(base, upstream, relay, containerds, nodes)
            finally:
                for node in nodes:
                    node.close()
    finally:
        for c in containerds:
            c.close()
        upstream.close()


def gossip_peers(node: SpegeldProcess) -> list[dict[str, Any]]:
    peers: list[dict[str, Any]] = node.status()["gossip"]["peers"]
    return peers


def push(cluster: Cluster, name: str, seed: int) -> tuple[BuiltImage, str]:
    image = build_image(f"example.com/{name}:v1", LAYERS, seed=seed, compresslevel=0)
    cluster.upstream.push(image, name, "v1")
    return image, f"{cluster.relay.address}/{name}:v1"


def layer_copies(cluster: Cluster, image: BuiltImage, since: int) -> float:
    layers = image.platforms[0].layers
    sent = sum(
        r.size
        for r in cluster.upstream.requests(since)
        if r.method == "GET" and r.status in (200, 206) and r.path.rsplit("/", 1)[-1] in layers
    )
    return sent / sum(image.blobs[d].size for d in layers)


def no_tracebacks(cluster: Cluster) -> None:
    for node in cluster.nodes:
        if node.log_path.exists():
            assert "Traceback" not in node.log_path.read_text()


def test_three_nodes_pulling_at_once_fetch_each_layer_from_the_upstream_once(
    cluster: Cluster,
) -> None:
    image, ref = push(cluster, "create/app", seed=1421)
    since = cluster.upstream.log_position()
    durations, failures = cluster.pull_all(ref, [0, 1, 2])
    assert not failures, failures
    for c in cluster.containerds:  # each containerd checked each digest as it committed
        assert all(c.has_blob(d) for d in image.blobs)
    copies = layer_copies(cluster, image, since)
    by_node = {designated(d, NAMES) for d in image.platforms[0].layers}
    print(f"create phase, 3 nodes: {copies:.2f} upstream copies, pulls {durations}, "
          f"layers designated to {sorted(by_node)}")  # fmt: skip
    # The target: <= 1.1 upstream copies. With 4 layers one extra fetch is 1.25.
    assert copies <= 1.1
    served = sum(n.metric('spegeld_bytes_served_total{source="inflight"}') for n in cluster.nodes)
    assert served > 0  # the followers streamed from the designated nodes' downloads
    no_tracebacks(cluster)


def test_a_node_pulling_alone_never_waits(
    cluster: Cluster,
) -> None:
    image, ref = push(cluster, "alone/app", seed=1422)
    since = cluster.upstream.log_position()
    node = cluster.nodes[0]
    log_start = node.log_path.stat().st_size
    durations, failures = cluster.pull_all(ref, [0])
    assert not failures, failures
    assert layer_copies(cluster, image, since) <= 1.1
    waited = upstream_waits(node, log_start)
    print(f"alone: pull {durations[0]:.2f} s; blob misses that waited: {waited}")
    # No settle: each miss decides at its first look (a few ms under load, not 0.36 s).
    assert waited and all(w <= 0.1 for w in waited), waited
    no_tracebacks(cluster)


def test_the_others_fall_back_to_the_upstream_when_the_designated_node_dies(
    cluster: Cluster,
) -> None:
    image, ref = push(cluster, "dies/app", seed=1423)
    layers = image.platforms[0].layers
    # The node most layers are designated to (a tie: the first): its spegeld is killed
    # (SIGKILL) once its containerd has 1 MiB of one of them, while the others follow
    # that download through its peer listener.
    counts = {n: sum(designated(d, NAMES) == n for d in layers) for n in NAMES}
    victim = max(NAMES, key=lambda n: counts[n])
    v = NAMES.index(victim)
    others = [i for i in range(3) if i != v]
    ingest = cluster.containerds[v].content_path / "ingest"

    def downloading() -> bool:
        sizes = [f.stat().st_size for f in ingest.glob("*/data") if f.exists()]
        return any(size >= MiB for size in sizes)

    killed_at: list[float] = []

    def kill_mid_download() -> None:
        wait_for(downloading, 20, "the victim's download", poll=0.01)
        cluster.nodes[v].kill()
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_mid_download, daemon=True)
    killer.start()
    durations, failures = cluster.pull_all(ref, [0, 1, 2])
    killer.join(5)
    ended = time.monotonic()
    print(f"designated {victim} killed: pulls {durations}, failures {failures}")
    assert killed_at, "the victim was not killed mid-download"
    assert not failures, failures
    for i in others:
        assert all(cluster.containerds[i].has_blob(d) for d in image.blobs)
    # From the kill: a layer from the upstream alone (2 s), plus at most the wait for a
    # designated node (the cut follower's retry finds it dead), plus containerd's retry.
    assert ended - killed_at[0] <= max(LAYERS) / RATE + WAIT_FOR_DESIGNATED + 3.0
    cluster.nodes[v].start()  # for any later test in this module
    wait_for(lambda: all(len(gossip_peers(n)) == 2 for n in cluster.nodes), 20, "rejoin")
