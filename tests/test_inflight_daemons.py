"""In-flight sharing end to end: two ``spegeld run`` daemons with gossip, two containerds
(1.6, and 2.3 whose ctr pulls through the transfer service).

Node A pulls an image from a real Distribution over a slow link (``_slowrelay``, see
there why). While A's layer is still downloading, node B pulls the same image through
its mirror: B's miss finds A only as an in-flight holder (gossip carries the
``inflight:`` key), proxies from A's growing download, and B's containerd commits the
layer (it verifies the digest). The upstream sends the layer once, to A.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from spegeld_harness import (
    CtrError,
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
    write_cluster_key,
)

from spegeld.mirror._designate import WAIT_FOR_DESIGNATED
from spegeld.store._ingest import INGEST_STALE

from ._slowrelay import SlowRelay
from ._support import configure_hosts, upstream_waits, wait_for

pytestmark = pytest.mark.containerd

MiB = 1024 * 1024
RATE = 4 * MiB  # bytes/s on the upstream link: the 24 MiB layer takes about 6 s
IMAGE = build_image("example.com/slow/app:v1", [24 * MiB], seed=142, compresslevel=0)
LAYER = IMAGE.platforms[0].layers[0]
DEADLINE = 60  # seconds for the whole scenario, a hard bound on every wait below


@dataclass
class Pair:
    """Two nodes with keyed gossip (B joins through A), and the slow link to the upstream."""

    a: PrivateContainerd
    b: PrivateContainerd
    node_a: SpegeldProcess
    node_b: SpegeldProcess
    relay: SlowRelay


@contextlib.contextmanager
def pair(
    tmp_path: Path, upstream: UpstreamRegistry, containerd_bin_dir: Path | None
) -> Iterator[Pair]:
    host, port = upstream.address.split(":")
    a = PrivateContainerd(tmp_path / "a-containerd", bin_dir=containerd_bin_dir)
    b = PrivateContainerd(tmp_path / "b-containerd", bin_dir=containerd_bin_dir)
    key = write_cluster_key(tmp_path / "cluster.key")
    try:
        a.start()
        b.start()
        with SlowRelay((host, int(port)), RATE) as relay:
            node_a = SpegeldProcess(tmp_path / "node-a", a, host="127.0.0.2", key_file=key)
            with node_a:
                node_b = SpegeldProcess(
                    tmp_path / "node-b", b, host="127.0.0.3", key_file=key,
                    peers=[node_a.gossip_address],
                )  # fmt: skip
                with node_b:
                    configure_hosts(tmp_path / "hosts-a", node_a.url, f"http://{relay.address}")
                    configure_hosts(tmp_path / "hosts-b", node_b.url, f"http://{relay.address}")
                    yield Pair(a, b, node_a, node_b, relay)
    finally:
        a.close()
        b.close()


def test_a_node_pulls_a_layer_from_a_peer_still_downloading_it(
    tmp_path: Path, upstream: UpstreamRegistry, containerd_bin_dir: Path | None
) -> None:
    upstream.push(IMAGE, "slow/app", "v1")
    with pair(tmp_path, upstream, containerd_bin_dir) as p:
        ref = f"{p.relay.address}/slow/app:v1"
        run_scenario(tmp_path, upstream, p.relay, ref, p.a, p.b, p.node_a, p.node_b)


def run_scenario(
    tmp_path: Path,
    upstream: UpstreamRegistry,
    relay: SlowRelay,
    ref: str,
    a: PrivateContainerd,
    b: PrivateContainerd,
    node_a: SpegeldProcess,
    node_b: SpegeldProcess,
) -> None:
    def a_at_b() -> tuple[int, int]:
        """A's keys and key version as B holds them (-1, -1: B does not know A yet)."""
        peers: list[dict[str, Any]] = node_b.status()["gossip"]["peers"]
        return (int(peers[0]["keys"]), int(peers[0]["version"])) if peers else (-1, -1)

    start = time.monotonic()
    # B knows A, with no keys yet, and holds A's key version: until then a delta of A's
    # waits for a state pull (docs/protocol.md §4). One CI run on a loaded machine (2.3)
    # saw B miss A's whole 6 s download; this is the one gossip state the test had not
    # pinned, and the likeliest cause (not proven: the run kept no gossip status).
    wait_for(lambda: a_at_b()[0] == 0 and a_at_b()[1] > 0, 15, "B to know A (no keys yet)")
    log_start = upstream.log_position()
    failures: list[CtrError] = []

    def pull(node: PrivateContainerd, hosts: str) -> threading.Thread:
        def run() -> None:
            try:
                node.ctr(
                    "images", "pull", "--hosts-dir", str(tmp_path / hosts), ref, timeout=DEADLINE
                )
            except CtrError as exc:
                failures.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    pull_a = pull(a, "hosts-a")
    # B's mirror finds the layer once gossip brought A's in-flight key (a HEAD is proxied
    # to A's peer listener, which answers it from the download under way).
    layer_path = f"/v2/slow/app/blobs/{LAYER}?ns={relay.address}"
    wait_for(lambda: node_b.get(layer_path, method="HEAD")[0] == 200, 15, "B to find A's layer")
    assert not a.has_blob(LAYER) and pull_a.is_alive(), "A's layer must still be downloading"
    pull_b = pull(b, "hosts-b")
    pull_b.join(DEADLINE - (time.monotonic() - start))
    pull_a.join(max(1.0, DEADLINE - (time.monotonic() - start)))
    assert not pull_a.is_alive() and not pull_b.is_alive(), "a pull did not finish"
    assert not failures, failures
    assert a.has_blob(LAYER) and b.has_blob(LAYER)  # each containerd checked the digest
    layer_gets = [
        r
        for r in upstream.requests(log_start)
        if r.method == "GET" and r.path.endswith(f"/blobs/{LAYER}") and r.status in (200, 206)
    ]
    assert len(layer_gets) == 1, [str(r) for r in layer_gets]
    assert node_a.metric('spegeld_bytes_served_total{source="inflight"}') >= IMAGE.blobs[LAYER].size
    for node in (node_a, node_b):
        assert "Traceback" not in node.log_path.read_text()


CANCELLED = build_image("example.com/slow/cancelled:v1", [24 * MiB], seed=143, compresslevel=0)
CANCELLED_LAYER = CANCELLED.platforms[0].layers[0]


def test_a_cancelled_pull_is_not_followed_and_the_next_node_gets_the_layer_elsewhere(
    tmp_path: Path, upstream: UpstreamRegistry, containerd_bin_dir: Path | None
) -> None:
    """A's pull is killed mid-layer (``ctr`` SIGKILLed: on 2.3 that cancels the transfer
    service's download). containerd keeps the ingest for a resume, so its data stops
    growing but stays. Within ``INGEST_STALE`` A stops offering it in flight (B's mirror
    answers 404 for the layer), and B's pull then completes from the upstream instead of
    following a download that will never finish."""
    upstream.push(CANCELLED, "slow/cancelled", "v1")
    with pair(tmp_path, upstream, containerd_bin_dir) as p:
        ref = f"{p.relay.address}/slow/cancelled:v1"
        pull_a = subprocess.Popen(
            p.a.ctr_argv("images", "pull", "--hosts-dir", tmp_path / "hosts-a", ref),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(lambda: ingest_bytes(p.a) >= 4 * MiB, 20, "A's download")
        finally:
            pull_a.kill()
            pull_a.wait(10)
        assert not p.a.has_blob(CANCELLED_LAYER)
        layer_path = f"/v2/slow/cancelled/blobs/{CANCELLED_LAYER}?ns={p.relay.address}"
        wait_for(
            lambda: p.node_b.get(layer_path, method="HEAD")[0] == 404,
            INGEST_STALE + 10, "A to stop offering its abandoned download",
        )  # fmt: skip
        assert ingest_bytes(p.a) >= 4 * MiB  # kept for a resume, not shared
        # A's claim on the layer (its mirror sent it upstream) went with its download
        # (CLAIM_BACKING): B's misses do not wait the 2.5 s for it. A still pulls the tag
        # (its keys last PULL_IDLE) and may be the layer's designated node, passed over
        # once it shows nothing in flight (SHOW_GRACE).
        log_start = p.node_b.log_path.stat().st_size
        started = time.monotonic()
        p.b.ctr("images", "pull", "--hosts-dir", tmp_path / "hosts-b", ref, timeout=DEADLINE)
        took = time.monotonic() - started
        waits = upstream_waits(p.node_b, log_start)
        print(f"B's pull after A's cancelled one: {took:.2f} s; misses waited {waits}")
        assert p.b.has_blob(CANCELLED_LAYER)  # B's containerd checked the digest
        # Never the claim's 2.5 s (measured: the 1 s grace at most); no tighter wall-clock
        # margin, which a loaded machine would break.
        assert all(w < WAIT_FOR_DESIGNATED for w in waits), waits
        for node in (p.node_a, p.node_b):
            assert "Traceback" not in node.log_path.read_text()


def ingest_bytes(node: PrivateContainerd) -> int:
    """The bytes in the node's ingest area (its downloads under way or abandoned)."""
    total = 0
    for data in (node.content_path / "ingest").glob("*/data"):
        with contextlib.suppress(OSError):
            total += data.stat().st_size
    return total
