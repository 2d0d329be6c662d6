"""In-flight content (issue 14 item 1): a blob is shared while containerd downloads it.

Real containerd pulls from a real Distribution through a slow loopback link
(``_slowrelay``, see there why), a real ContainerdStore follows its ingest area, and real
MirrorServers on loopback proxy between nodes that share a MemoryCluster ownership table
(the Router seam's twin: gossip's propagation is not what is under test here).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from spegeld_harness import CtrError, PrivateContainerd, UpstreamRegistry, build_image

from spegeld.containerd import open_containerd
from spegeld.mirror import MirrorServer, _inflight
from spegeld.oci import Digest
from spegeld.routing import MemoryCluster, NodeId, Peer, advertise_store
from spegeld.store import ContainerdStore, Ingest, MemoryStore, inflight_key
from spegeld.store._ingest import INGEST_STALE, InflightTable, scan_ingests

from ._slowrelay import SlowRelay
from ._support import image_in_memory, serving_registry, wait_until

MiB = 1024 * 1024
LAYER_SIZE = 24 * MiB
RATE = 6 * MiB  # bytes/s on the upstream link: the 24 MiB layer takes about 4 s
IMAGE = build_image("example.com/slow/app:v1", [LAYER_SIZE], seed=141, compresslevel=0)
LAYER = Digest(IMAGE.platforms[0].layers[0])
LAYER_BYTES = IMAGE.read_blob(LAYER)
BLOB_PATH = f"/v2/slow/app/blobs/{LAYER}?ns=example.com"
MIRRORED = {"x-spegeld-mirrored": "true"}  # what a peer's request carries without a peer listener


def inflight_served(server: MirrorServer) -> float:
    return server._metrics.bytes_served.labels(source="inflight").value


# --- the sans-I/O table and the scan ------------------------------------------------------


def write_ingest(content: Path, name: str, ref: str, total: int, data: bytes) -> Path:
    ingest = content / "ingest" / name
    ingest.mkdir(parents=True)
    (ingest / "ref").write_text(ref)
    (ingest / "total").write_text(str(total))
    (ingest / "data").write_bytes(data)
    return ingest


def test_scan_reads_only_this_namespaces_digest_named_ingests(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    write_ingest(tmp_path, "a", f"k8s.io/1/layer-{digest}", 10, b"12345")
    write_ingest(tmp_path, "b", f"default/2/layer-{'sha256:' + 'cd' * 32}", 10, b"1")
    write_ingest(tmp_path, "c", "k8s.io/3/some-upload", 10, b"1")
    write_ingest(tmp_path, "d", f"k8s.io/4/config-{'sha256:' + 'ef' * 32}", 0, b"")
    found = scan_ingests(tmp_path, "k8s.io")
    assert list(found) == [digest]
    assert found[Digest(digest)].total == 10
    assert found[Digest(digest)].data == tmp_path / "ingest" / "a" / "data"
    assert scan_ingests(tmp_path / "missing", "k8s.io") == {}


def test_an_abandoned_ingest_is_not_shared_until_it_grows_again(tmp_path: Path) -> None:
    """A cancelled pull leaves its ingest for a resume: followers of it would be cut."""
    digest = Digest("sha256:" + "ab" * 32)
    ingest = write_ingest(tmp_path, "a", f"k8s.io/1/layer-{digest}", 10, b"12345")
    assert list(scan_ingests(tmp_path, "k8s.io")) == [digest]
    old = time.time() - INGEST_STALE - 1
    os.utime(ingest / "data", (old, old))
    assert scan_ingests(tmp_path, "k8s.io") == {}
    with (ingest / "data").open("ab") as f:  # the pull resumed: containerd appends
        f.write(b"678")
    assert list(scan_ingests(tmp_path, "k8s.io")) == [digest]


def test_table_advertises_withdraws_and_keeps_a_landed_blob(tmp_path: Path) -> None:
    digest = Digest("sha256:" + "ab" * 32)
    ingest = Ingest(digest, tmp_path / "data", 10, tmp_path / "blob")
    table = InflightTable()
    change = table.update({digest: ingest}, 0.0, indexed=lambda d: False, landed=lambda i: False)
    assert change.added == {inflight_key(digest)} and not change.removed
    assert table.active()
    # The ingest ended with the blob committed but no image naming it yet: kept.
    change = table.update({}, 1.0, indexed=lambda d: False, landed=lambda i: True)
    assert not change.added and not change.removed and not table.active()
    # The index holds it complete now: the in-flight key goes.
    change = table.update({}, 2.0, indexed=lambda d: True, landed=lambda i: True)
    assert change.removed == {inflight_key(digest)}
    # Aborted (no committed file): withdrawn at once.
    table.update({digest: ingest}, 3.0, indexed=lambda d: False, landed=lambda i: False)
    change = table.update({}, 4.0, indexed=lambda d: False, landed=lambda i: False)
    assert change.removed == {inflight_key(digest)} and table.get(digest) is None


# --- real containerd ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> UpstreamRegistry:
    registry = UpstreamRegistry(tmp_path_factory.mktemp("upstream"))
    registry.start()
    registry.push(IMAGE, "slow/app", "v1")
    yield registry  # type: ignore[misc]
    registry.close()


@asynccontextmanager
async def slow_pull(
    node: PrivateContainerd, upstream: UpstreamRegistry
) -> AsyncIterator[threading.Thread]:
    """``ctr images pull`` of IMAGE from ``upstream`` through a slow link, in a thread."""
    host, port = upstream.address.split(":")
    with SlowRelay((host, int(port)), RATE) as relay:
        failed: list[BaseException] = []

        def pull() -> None:
            try:
                node.ctr("images", "pull", "--plain-http", f"{relay.address}/slow/app:v1")
            except CtrError as exc:
                failed.append(exc)

        thread = threading.Thread(target=pull, daemon=True)
        thread.start()
        try:
            yield thread
        finally:
            await trio.to_thread.run_sync(thread.join, 60)


@asynccontextmanager
async def holder_node(
    node: PrivateContainerd, cluster: MemoryCluster
) -> AsyncIterator[tuple[ContainerdStore, MirrorServer]]:
    """Node A: a ContainerdStore on ``node``, advertising into ``cluster``, and its mirror."""
    async with open_containerd(node.socket, node.namespace) as client:
        store = ContainerdStore(client, node.content_path, resync_interval=60)
        router = cluster.router(NodeId("a"), "")
        async with serving_registry(store, router) as (server, url):
            router.me = Peer(router.me.node, url.removeprefix("http://"))
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                await nursery.start(advertise_store, store, router)
                yield store, server
                nursery.cancel_scope.cancel()


async def fetch(url: str, *, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(url + BLOB_PATH, headers=headers)
        return response.status_code, response.content


@pytest.mark.containerd
async def test_a_peer_gets_the_blob_from_a_download_under_way(
    tmp_path: Path, upstream: UpstreamRegistry, containerd_bin_dir: Path | None
) -> None:
    node = PrivateContainerd(tmp_path / "a", bin_dir=containerd_bin_dir)
    node.start()
    cluster = MemoryCluster()
    try:
        with trio.fail_after(60):
            async with holder_node(node, cluster) as (store, a_server):
                # The router's own copy of A's mirror address, for B's lookups.
                b_router = cluster.router(NodeId("b"), "127.0.0.1:1")
                async with serving_registry(MemoryStore(), b_router) as (_, b_url):
                    async with slow_pull(node, upstream):
                        key = inflight_key(LAYER)
                        await wait_until(lambda: bool(cluster.holders(key)), 10, "in-flight key")
                        assert not node.has_blob(LAYER), "the pull must still be under way"
                        status, body = await fetch(b_url)
                        assert status == 200
                        assert hashlib.sha256(body).hexdigest() == LAYER.removeprefix("sha256:")
                        assert body == LAYER_BYTES
                        assert inflight_served(a_server) == len(LAYER_BYTES)
                    # The pull finished: the complete key is there, the in-flight one gone.
                    await wait_until(
                        lambda: not cluster.holders(key) and bool(cluster.holders(LAYER)),
                        10,
                        "the in-flight key withdrawn for the complete one",
                    )
                    assert store.inflight(LAYER) is None
    finally:
        node.close()


@pytest.mark.containerd
async def test_an_aborted_download_is_withdrawn_and_its_follower_cut(
    tmp_path: Path, upstream: UpstreamRegistry
) -> None:
    node = PrivateContainerd(tmp_path / "a")
    node.start()
    cluster = MemoryCluster()
    try:
        with trio.fail_after(60):
            async with holder_node(node, cluster) as (_, a_server):
                async with slow_pull(node, upstream):
                    key = inflight_key(LAYER)
                    await wait_until(lambda: bool(cluster.holders(key)), 10, "in-flight key")
                    url = "http://" + cluster.holders(key)[0].mirror
                    received = 0
                    cut = False
                    async with httpx.AsyncClient(timeout=30) as client:
                        async with client.stream("GET", url + BLOB_PATH, headers=MIRRORED) as resp:
                            assert resp.status_code == 200
                            try:
                                async for chunk in resp.aiter_raw():
                                    received += len(chunk)
                                    if received >= MiB and not cut:
                                        async with open_containerd(
                                            node.socket, node.namespace
                                        ) as c:
                                            assert await c.abort_ingests(LAYER)
                                        cut = True
                            except httpx.RemoteProtocolError:
                                pass  # the cut: fewer bytes than Content-Length
                    assert cut and received < len(LAYER_BYTES)
                    await wait_until(lambda: not cluster.holders(key), 5, "the key withdrawn")
                    assert 0 < inflight_served(a_server) < len(LAYER_BYTES)
    finally:
        node.close()


async def test_a_complete_holder_is_preferred_to_an_in_flight_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A's stall bound, shortened: after B's proxy gave up, the test's end waits for it.
    monkeypatch.setattr(_inflight, "INFLIGHT_STALL", 1.0)
    cluster = MemoryCluster()
    # A: only a download under way (a file that never grows past half: any follower of it
    # would stall). C: the whole blob.
    data = tmp_path / "data"
    data.write_bytes(LAYER_BYTES[: len(LAYER_BYTES) // 2])
    downloading = MemoryStore()
    downloading.set_inflight(Ingest(LAYER, data, len(LAYER_BYTES), tmp_path / "blob"))
    a_router = cluster.router(NodeId("a"), "")
    c_router = cluster.router(NodeId("c"), "")
    b_router = cluster.router(NodeId("b"), "127.0.0.1:1")
    with trio.fail_after(20):
        async with serving_registry(downloading, a_router) as (a_server, a_url):
            async with serving_registry(image_in_memory(IMAGE), c_router) as (_, c_url):
                for router, url in ((a_router, a_url), (c_router, c_url)):
                    router.me = Peer(router.me.node, url.removeprefix("http://"))
                a_router.advertise([inflight_key(LAYER)])
                c_router.advertise([LAYER])
                async with serving_registry(MemoryStore(), b_router) as (_, b_url):
                    status, body = await fetch(b_url)
                    assert status == 200 and body == LAYER_BYTES
                    assert inflight_served(a_server) == 0
                    # Without the complete holder, B follows A's download (here: its half,
                    # then the stall cuts it; B's proxy reports the cut to its client).
                    c_router.withdraw([LAYER])
                    with pytest.raises(httpx.RemoteProtocolError):
                        await fetch(b_url)
                    assert inflight_served(a_server) > 0


async def test_an_ingest_fed_from_in_flight_data_is_not_served_on(tmp_path: Path) -> None:
    """Two nodes downloading one blob each from the other would wait out their stall bounds:
    a node proxying from an in-flight holder answers 404 for its own in-flight copy."""
    data = tmp_path / "data"
    data.write_bytes(b"")
    cluster = MemoryCluster()
    store = MemoryStore()
    store.set_inflight(Ingest(LAYER, data, len(LAYER_BYTES), tmp_path / "blob"))
    router = cluster.router(NodeId("a"), "")
    with trio.fail_after(20):
        async with serving_registry(store, router) as (server, url):
            done = server._feeds.start(LAYER)
            status, _ = await fetch(url, headers=MIRRORED)
            assert status == 404
            done()
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.head(url + BLOB_PATH, headers=MIRRORED)
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(LAYER_BYTES))
            # containerd on this node itself never gets its own download back.
            status, _ = await fetch(url)
            assert status == 404


async def test_a_follower_goes_on_from_the_committed_blob_and_serves_ranges(
    tmp_path: Path,
) -> None:
    """The download's ``data`` file grows, then is committed (renamed to the blob file,
    as containerd does): the follower gets every byte, in order, checked; a Range is
    answered from the same stream."""
    data, blob = tmp_path / "ingest-data", tmp_path / "blob"
    half = len(LAYER_BYTES) // 2
    data.write_bytes(LAYER_BYTES[:half])
    store = MemoryStore()
    store.set_inflight(Ingest(LAYER, data, len(LAYER_BYTES), blob))
    router = MemoryCluster().router(NodeId("a"), "")
    with trio.fail_after(20):
        async with serving_registry(store, router) as (server, url):
            received = bytearray()
            async with httpx.AsyncClient(timeout=30) as client:
                async with client.stream("GET", url + BLOB_PATH, headers=MIRRORED) as resp:
                    assert resp.status_code == 200
                    async for chunk in resp.aiter_raw():
                        received += chunk
                        if len(received) >= MiB and data.exists():
                            # containerd writes the rest, then commits: rename, not copy.
                            with data.open("ab") as f:
                                f.write(LAYER_BYTES[half:])
                            data.rename(blob)
            assert bytes(received) == LAYER_BYTES
            # The download is committed now: a Range from the committed file, checked
            # because it reaches the end; one that stops short is sent as asked.
            last = {"range": f"bytes={half}-", **MIRRORED}
            middle = {"range": "bytes=100-199", **MIRRORED}
            async with httpx.AsyncClient(timeout=30) as client:
                tail = await client.get(url + BLOB_PATH, headers=last)
                part = await client.get(url + BLOB_PATH, headers=middle)
            assert tail.status_code == 206 and tail.content == LAYER_BYTES[half:]
            assert part.status_code == 206 and part.content == LAYER_BYTES[100:200]
            assert inflight_served(server) == len(LAYER_BYTES) + (len(LAYER_BYTES) - half) + 100
