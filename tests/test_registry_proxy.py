"""The mirror proxy between real registries on loopback: resume, hedging, integrity."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from spegeld_harness import build_image

from spegeld.routing import MemoryCluster, NodeId, Peer, StaticRouter
from spegeld.store import MemoryStore

from ._support import image_in_memory, serving_registry

IMAGE = build_image("example.com/team/app:v1", [2_000_000], seed=51)
LAYER = IMAGE.platforms[0].layers[0]
LAYER_BYTES = IMAGE.read_blob(LAYER)
BLOB_PATH = f"/v2/team/app/blobs/{LAYER}?ns=example.com"


@asynccontextmanager
async def fake_peer(
    body: bytes, *, cut_after: int | None = None, delay: float = 0.0
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A peer registry that misbehaves on purpose: slow, cut short, or lying.

    It answers every request with ``body`` (honouring a Range start), stopping
    after ``cut_after`` body bytes when given. Yields its address and the
    request heads it received.
    """
    seen: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
        seen.append(head)
        await trio.sleep(delay)
        start = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"range: bytes="):
                start = int(line.split(b"=")[1].split(b"-")[0])
        part = body[start:]
        status = b"206 Partial Content" if start else b"200 OK"
        headers = [
            b"HTTP/1.1 " + status,
            b"Content-Length: %d" % len(part),
            b"Content-Type: application/octet-stream",
            b"Docker-Content-Digest: " + LAYER.encode(),
        ]
        if start:
            headers.append(b"Content-Range: bytes %d-%d/%d" % (start, len(body) - 1, len(body)))
        try:
            await stream.send_all(b"\r\n".join(headers) + b"\r\n\r\n")
            await stream.send_all(part if cut_after is None else part[:cut_after])
        except trio.BrokenResourceError:
            pass  # the proxy hung up: it had what it needed (or refused the rest)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield f"127.0.0.1:{port}", seen
        nursery.cancel_scope.cancel()


def cluster_with_holder() -> tuple[MemoryCluster, MemoryStore]:
    return MemoryCluster(), image_in_memory(IMAGE)


async def test_blob_and_manifest_come_from_the_peer_that_holds_them() -> None:
    cluster = MemoryCluster()
    holder = image_in_memory(IMAGE)
    with trio.fail_after(10):
        async with serving_registry(holder, StaticRouter([])) as (_, holder_url):
            router_a = cluster.router(NodeId("a"), holder_url.removeprefix("http://"))
            router_a.advertise(holder.list().keys())
            router_b = cluster.router(NodeId("b"), "127.0.0.1:1")
            async with serving_registry(MemoryStore(), router_b) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    blob = await client.get(BLOB_PATH)
                    assert blob.status_code == 200
                    assert hashlib.sha256(blob.content).hexdigest() == LAYER.removeprefix("sha256:")
                    manifest = await client.get("/v2/team/app/manifests/v1?ns=example.com")
                    assert manifest.status_code == 200
                    assert manifest.headers["docker-content-digest"] == IMAGE.digest
                    assert manifest.headers["content-type"] == IMAGE.media_type
                    part = await client.get(BLOB_PATH, headers={"range": "bytes=10-19"})
                    assert part.status_code == 206
                    assert part.content == LAYER_BYTES[10:20]
                    metrics = (await client.get("/metrics")).text
                    assert 'spegeld_bytes_served_total{source="peer"}' in metrics


async def test_a_mirrored_request_is_never_mirrored_again() -> None:
    with trio.fail_after(10):
        async with fake_peer(LAYER_BYTES) as (peer, seen):
            router = StaticRouter([Peer(NodeId("p"), peer)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    looped = await client.get(BLOB_PATH, headers={"x-spegeld-mirrored": "true"})
                    assert looped.status_code == 404
                    assert seen == []
                    direct = await client.get(BLOB_PATH)
                    assert direct.status_code == 200
                    assert len(seen) == 1 and b"x-spegeld-mirrored: true" in seen[0]


async def test_a_peer_that_dies_mid_blob_is_resumed_from_the_next_holder() -> None:
    with trio.fail_after(10):
        async with (
            fake_peer(LAYER_BYTES, cut_after=700_000) as (dying, dying_seen),
            fake_peer(LAYER_BYTES) as (healthy, healthy_seen),
        ):
            router = StaticRouter([Peer(NodeId("dying"), dying), Peer(NodeId("ok"), healthy)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    response = await client.get(BLOB_PATH)
        assert response.status_code == 200
        assert response.content == LAYER_BYTES
        assert len(dying_seen) == 1
        (resume,) = healthy_seen
        assert (
            b"range: bytes=700000-1999999" in resume.lower()
            or b"range: bytes=700000-" in resume.lower()
        )


async def test_corrupt_bytes_cut_the_response_and_mark_the_peer_bad() -> None:
    corrupt = bytes([LAYER_BYTES[0] ^ 0xFF]) + LAYER_BYTES[1:]
    with trio.fail_after(10):
        async with fake_peer(corrupt) as (liar, seen):
            router = StaticRouter([Peer(NodeId("liar"), liar)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await client.get(BLOB_PATH)
                asked = len(seen)
                # containerd's retry (here a resume) must not meet the liar again: with no
                # other holder it gets a 404 and goes to the upstream.
                async with httpx.AsyncClient(base_url=url) as client:
                    retry = await client.get(BLOB_PATH, headers={"range": "bytes=100-"})
                    metrics = (await client.get("/metrics")).text
        assert retry.status_code == 404
        assert len(seen) == asked
        assert "spegeld_bad_peers_total 1" in metrics


async def test_a_slow_peer_is_hedged() -> None:
    with trio.fail_after(10):
        async with (
            fake_peer(LAYER_BYTES, delay=3.0) as (slow, _),
            fake_peer(LAYER_BYTES) as (fast, _),
        ):
            router = StaticRouter([Peer(NodeId("slow"), slow), Peer(NodeId("fast"), fast)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    start = trio.current_time()
                    response = await client.get(BLOB_PATH)
                    took = trio.current_time() - start
                    metrics = (await client.get("/metrics")).text
        assert response.content == LAYER_BYTES
        assert took < 1.5, "the hedge should not wait for the slow peer"
        assert "spegeld_proxy_hedged_requests_total 1" in metrics


async def test_the_proxy_only_contacts_router_members() -> None:
    with trio.fail_after(10):
        async with fake_peer(LAYER_BYTES) as (bystander, seen):
            async with serving_registry(MemoryStore(), StaticRouter([])) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    tricks = [
                        f"/v2/team/app/blobs/{LAYER}?ns={bystander}",
                        f"/v2/{bystander}/app/blobs/{LAYER}",
                    ]
                    for path in tricks:
                        response = await client.get(path, headers={"host": bystander})
                        assert response.status_code in (400, 404)
        assert seen == []


async def test_head_requests_are_proxied_with_real_lengths() -> None:
    cluster = MemoryCluster()
    holder = image_in_memory(IMAGE)
    with trio.fail_after(10):
        async with serving_registry(holder, StaticRouter([])) as (_, holder_url):
            cluster.router(NodeId("a"), holder_url.removeprefix("http://")).advertise(
                holder.list().keys()
            )
            router_b = cluster.router(NodeId("b"), "127.0.0.1:1")
            async with serving_registry(MemoryStore(), router_b) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    blob = await client.head(BLOB_PATH)
                    assert blob.status_code == 200
                    assert blob.headers["content-length"] == str(len(LAYER_BYTES))
                    manifest = await client.head("/v2/team/app/manifests/v1?ns=example.com")
                    assert manifest.status_code == 200
                    assert manifest.headers["docker-content-digest"] == IMAGE.digest
                    assert manifest.headers["content-length"] == str(IMAGE.size)
                    metrics = (await client.get("/metrics")).text
                    assert "spegeld_bad_peers_total 0" in metrics


async def test_a_peer_that_does_not_answer_is_skipped_for_a_while(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A partitioned holder costs one connect timeout, not one per request of a pull."""
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(0)  # accepts nothing: the backlog fills, then SYNs go unanswered
    filler = [trio.socket.socket() for _ in range(4)]
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    with silent, trio.fail_after(30):
        for sock in filler:
            with trio.move_on_after(0.1):
                await sock.connect(silent.getsockname())
        router = StaticRouter([Peer(NodeId("gone"), address)])
        async with serving_registry(MemoryStore(), router) as (_, url):
            async with httpx.AsyncClient(base_url=url) as client:
                started = trio.current_time()
                first = await client.get(BLOB_PATH)
                first_took = trio.current_time() - started
                started = trio.current_time()
                second = await client.get(BLOB_PATH)
                second_took = trio.current_time() - started
                metrics = (await client.get("/metrics")).text
    for sock in filler:
        sock.close()
    assert first.status_code == second.status_code == 404
    assert 0.4 <= first_took <= 1.0  # the connect timeout, once
    assert second_took < 0.05  # skipped: straight to 404
    assert 'spegeld_proxy_errors_total{reason="unreachable"} 1\n' in metrics


async def test_a_resume_is_checked_against_the_whole_blob() -> None:
    # containerd resumes with Range: bytes=N-. The proxy fetches the whole blob, hashes
    # the first N bytes without sending them, and checks the digest at the end.
    with trio.fail_after(10):
        async with fake_peer(LAYER_BYTES) as (honest, seen):
            router = StaticRouter([Peer(NodeId("honest"), honest)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    response = await client.get(BLOB_PATH, headers={"range": "bytes=700000-"})
                    beyond = await client.get(
                        BLOB_PATH, headers={"range": f"bytes={len(LAYER_BYTES)}-"}
                    )
    assert response.status_code == 206
    assert response.content == LAYER_BYTES[700000:]
    size = len(LAYER_BYTES)
    assert response.headers["content-range"] == f"bytes 700000-{size - 1}/{size}"
    assert all(b"range:" not in head.lower() for head in seen)
    assert beyond.status_code == 416


async def test_a_lie_discards_every_partial_write_the_liar_fed() -> None:
    corrupt = bytes([LAYER_BYTES[0] ^ 0xFF]) + LAYER_BYTES[1:]
    discarded: list[str] = []

    async def discard(digest: str) -> list[str]:
        discarded.append(digest)
        return [f"layer-{digest}"]

    with trio.fail_after(10):
        async with fake_peer(corrupt) as (liar, _):
            router = StaticRouter([Peer(NodeId("liar"), liar)])
            async with serving_registry(MemoryStore(), router, discard_partial=discard) as (
                _,
                url,
            ):
                async with httpx.AsyncClient(base_url=url) as client:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await client.get(BLOB_PATH, headers={"range": "bytes=10-"})
    assert discarded == [LAYER]
