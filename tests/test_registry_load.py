"""The registry under load: 200 concurrent blob GETs, connection limits, graceful shutdown.

The blob GETs run against a real private containerd through the real ContainerdStore, once
with the content directory readable (the zero-copy sendfile path) and once without it (the
containerd ``Content.Read`` gRPC stream). Each test records its figures (seconds for the
burst, RSS growth) in ``user_properties`` and prints them (visible with ``-rP``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from spegeld_harness import PrivateContainerd, build_image

from spegeld.containerd import open_containerd
from spegeld.mirror import Limits, MirrorServer
from spegeld.oci import Descriptor, Digest
from spegeld.routing import StaticRouter
from spegeld.store import ContainerdStore, KeysChanged, MemoryStore, OpenBlob, Snapshot

from ._support import count_sendfile, image_in_memory, import_image, serving_registry

MiB = 1024 * 1024
CLIENTS = 200
RSS_GROWTH_LIMIT = 150 * MiB


# -- measuring ------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def rss() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so it measures this burst alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


# -- a plain HTTP/1.1 client over raw trio streams -----------------------------------------


@dataclass
class Fetched:
    status: int
    headers: dict[bytes, bytes]
    length: int
    sha256: str


async def get(stream: trio.SocketStream, target: str, *, close: bool = True) -> Fetched:
    """One GET on an open stream; the body is hashed as it arrives, never kept."""
    conn = h11.Connection(h11.CLIENT)
    headers = [(b"host", b"registry"), *([(b"connection", b"close")] if close else [])]
    await stream.send_all(
        conn.send(h11.Request(method="GET", target=target, headers=headers))
        + (conn.send(h11.EndOfMessage()) or b"")
    )
    hasher = hashlib.sha256()
    length = 0
    response: h11.Response | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            # Small reads, so 200 clients in this process add little to the server's RSS.
            conn.receive_data(await stream.receive_some(64 * 1024))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            hasher.update(event.data)
            length += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            return Fetched(response.status_code, dict(response.headers), length, hasher.hexdigest())
        else:
            raise AssertionError(f"connection ended mid-response: {event!r}")


def split(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@dataclass
class Burst:
    results: list[Fetched]
    seconds: float
    peak_in_flight: int
    peak_connections: int


async def burst(registry: MirrorServer, url: str, target: str, clients: int) -> Burst:
    """``clients`` connections, all accepted by the server first, then one GET on each."""
    host, port = split(url)
    results: list[Fetched] = []
    go = trio.Event()
    peaks = {"in_flight": 0, "connections": 0}

    async def client() -> None:
        async with await trio.open_tcp_stream(host, port) as stream:
            await go.wait()
            results.append(await get(stream, target))

    async def watch() -> None:
        while True:
            stats = registry.statistics()
            peaks.update({key: max(peak, stats[key]) for key, peak in peaks.items()})
            await trio.sleep(0.001)

    async with trio.open_nursery() as outer:
        outer.start_soon(watch)
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(client)
            while registry.statistics()["connections"] < clients:
                await trio.sleep(0.005)
            go.set()
            start = trio.current_time()
        seconds = trio.current_time() - start
        outer.cancel_scope.cancel()
    return Burst(results, seconds, peaks["in_flight"], peaks["connections"])


# -- 200 concurrent GETs through a real ContainerdStore -----------------------------------


@asynccontextmanager
async def containerd_store(
    containerd: PrivateContainerd, tmp_path: Path, layer_size: int, *, readable: bool
) -> AsyncIterator[tuple[ContainerdStore, str, int]]:
    """A synced ContainerdStore holding one image; yields it, the layer digest and size."""
    image = build_image("example.com/load/app:v1", [layer_size], seed=2024, compresslevel=0)
    layer = image.platforms[0].layers[0]
    await import_image(containerd, image, trio.Path(tmp_path))
    content = containerd.content_path if readable else tmp_path / "nope"
    async with open_containerd(containerd.socket, "k8s.io") as client:
        store = ContainerdStore(client, content)
        await store.sync()
        assert layer in store.list().digests
        assert (store.blob_path(Digest(layer)) is not None) == readable
        yield store, layer, image.blobs[layer].size


async def run_burst(
    request: pytest.FixtureRequest, store: ContainerdStore, layer: str, size: int
) -> Burst:
    target = f"/v2/load/app/blobs/{layer}?ns=example.com"
    want = layer.removeprefix("sha256:")
    async with serving_registry(store, StaticRouter([])) as (registry, url):
        host, port = split(url)
        async with await trio.open_tcp_stream(host, port) as warm:  # first-use allocations
            assert (await get(warm, target)).sha256 == want
        before = rss()
        peak_known = reset_peak_rss()
        result = await burst(registry, url, target, CLIENTS)
        after = rss()
        peak = peak_rss() if peak_known else after
        stats = registry.statistics()
    assert len(result.results) == CLIENTS
    for fetched in result.results:
        assert fetched.status == 200
        assert fetched.headers[b"docker-content-digest"] == layer.encode()
        assert (fetched.length, fetched.sha256) == (size, want)
    assert result.peak_connections >= CLIENTS, "the GETs were not concurrent"
    assert stats["aborted"] == 0 and stats["bad_requests"] == 0
    figures = {
        "blob_bytes": size,
        "clients": CLIENTS,
        "seconds": round(result.seconds, 3),
        "MiB_per_second": round(CLIENTS * size / MiB / result.seconds, 1),
        "peak_in_flight": result.peak_in_flight,
        "rss_before_MiB": round(before / MiB, 1),
        "rss_peak_growth_MiB": round((peak - before) / MiB, 1),
        "rss_after_growth_MiB": round((after - before) / MiB, 1),
    }
    request.node.user_properties.extend(figures.items())
    print(request.node.name, figures)
    assert peak - before < RSS_GROWTH_LIMIT, figures
    assert after - before < RSS_GROWTH_LIMIT, figures
    return result


async def test_200_concurrent_gets_over_sendfile(
    containerd: PrivateContainerd,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = count_sendfile(monkeypatch)
    with trio.fail_after(120):
        async with containerd_store(containerd, tmp_path, 2 * MiB, readable=True) as (
            store,
            layer,
            size,
        ):
            await run_burst(request, store, layer, size)
    assert sent == [size] * (CLIENTS + 1), "every body went out with sendfile"


async def test_200_concurrent_gets_over_the_grpc_stream(
    containerd: PrivateContainerd,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Content.Read path, with 256 KiB blobs.

    Each stream holds about three times containerd's 1 MiB reply in memory while its client
    catches up (measured: 200 x 2 MiB blobs grow RSS by ~600 MiB, 50 x 2 MiB and 50 x 8 MiB
    by ~150 MiB alike), so 2 MiB blobs would not fit the bound; smaller ones show that the
    rest of the path stays flat.
    """
    sent = count_sendfile(monkeypatch)
    with trio.fail_after(120):
        async with containerd_store(containerd, tmp_path, MiB // 4, readable=False) as (
            store,
            layer,
            size,
        ):
            assert not store.statistics().direct_reads
            await run_burst(request, store, layer, size)
    assert sent == [], "no content directory, so no sendfile"


# -- connection limit and graceful shutdown ------------------------------------------------


async def test_a_full_pool_closes_new_connections_at_once_and_answers_once_idle_ones_time_out() -> (
    None
):
    """Over its pool a client is closed at accept, never queued behind the others (a queued
    containerd would hang); once idle connections time out, slots come back."""
    limits = Limits(loopback_connections=4, idle_timeout=0.3)
    with trio.fail_after(15):
        async with serving_registry(MemoryStore(), StaticRouter([]), limits=limits) as (
            registry,
            url,
        ):
            host, port = split(url)
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, registry.statistics()["connections"])
                    await trio.sleep(0.002)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                idle = [await trio.open_tcp_stream(host, port) for _ in range(10)]
                for conn in idle:  # four held until their idle timeout, six closed at once
                    with trio.fail_after(3):
                        assert await conn.receive_some(16) == b""
                    await conn.aclose()
                async with await trio.open_tcp_stream(host, port) as stream:
                    answer = await get(stream, "/healthz")
                nursery.cancel_scope.cancel()
            stats = registry.statistics()
    assert answer.status == 200
    assert stats["refused"] == 6, stats
    assert stats["timeouts"] == 0, "an idle keep-alive timeout is not an error"
    assert peak == 4, peak


class SlowStore:
    """A MemoryStore whose blob streams pause between chunks: a response that takes a while."""

    def __init__(self, inner: MemoryStore, pause: float) -> None:
        self._inner = inner
        self._pause = pause

    def list(self) -> Snapshot:
        return self._inner.list()

    def resolve(self, tag_key: str) -> Digest:
        return self._inner.resolve(tag_key)

    def descriptor(self, digest: Digest) -> Descriptor:
        return self._inner.descriptor(digest)

    async def open(self, digest: Digest, offset: int = 0, length: int | None = None) -> OpenBlob:
        blob = await self._inner.open(digest, offset, length)
        return OpenBlob(blob.descriptor, None, _slowly(blob.chunks, self._pause))

    def watch(
        self,
    ) -> AbstractAsyncContextManager[tuple[Snapshot, trio.MemoryReceiveChannel[KeysChanged]]]:
        return self._inner.watch()


async def _slowly(chunks: AsyncIterator[bytes], pause: float) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        await trio.sleep(pause)
        yield chunk


async def refused(host: str, port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def eventually(condition: Callable[[], Any], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not await condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def test_shutdown_finishes_the_response_in_flight_and_refuses_new_connections() -> None:
    image = build_image("example.com/team/slow:v1", [1_000_000], seed=5)
    layer = image.platforms[0].layers[0]
    data = image.read_blob(layer)
    chunks = -(-len(data) // (64 * 1024))
    store = SlowStore(image_in_memory(image), pause=0.8 / chunks)  # about 0.8 s in all
    with trio.fail_after(15):
        async with serving_registry(store, StaticRouter([])) as (registry, url):
            host, port = split(url)
            idle = await trio.open_tcp_stream(host, port)
            stream = await trio.open_tcp_stream(host, port)
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(
                conn.send(
                    h11.Request(
                        method="GET",
                        target=f"/v2/team/slow/blobs/{layer}",
                        headers=[(b"host", b"registry")],
                    )
                )
                + (conn.send(h11.EndOfMessage()) or b"")
            )
            received = bytearray()
            while not received:  # the head and the first chunk are out: mid-response
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(64 * 1024))
                elif isinstance(event, h11.Response):
                    assert event.status_code == 200
                elif isinstance(event, h11.Data):
                    received += event.data
            assert registry.statistics()["in_flight"] == 1
            shutdown_at = trio.current_time()
            registry.shutdown()

            await eventually(lambda: refused(host, port), 2, "new connections to be refused")
            with trio.fail_after(2):
                assert await idle.receive_some(16) == b"", "an idle connection is closed at once"
            await idle.aclose()

            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(64 * 1024))
                elif isinstance(event, h11.Data):
                    received += event.data
                else:
                    assert isinstance(event, h11.EndOfMessage), event
                    break
            finished_at = trio.current_time()
            assert bytes(received) == data, "the response in flight completed intact"
            assert await stream.receive_some(16) == b"", "then its connection closed"
            await stream.aclose()
            assert registry.statistics()["aborted"] == 0
    assert finished_at - shutdown_at > 0.3, "the response was still streaming at shutdown"
