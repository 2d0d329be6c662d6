"""The proxy never hangs and never trusts a peer: deadlines and checks on the peer side.

The peers here are stand-ins written on raw trio sockets, because what they do
(drip a byte at a time, answer a range with another range, carry a member
address no real spegeld would have) is what a real spegeld cannot be made to
do. The SIGSTOP cases with real ``spegeld run`` processes are in
``test_proxy_sigstop.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from spegeld_harness import build_image

from spegeld.routing import NodeId, Peer, StaticRouter
from spegeld.store import MemoryStore

from spegeld.mirror._peer import (  # isort: skip
    KEEPCNT, KEEPIDLE, KEEPINTVL, BadPeerAddress, PeerFailed, fetch, split_address,
)  # fmt: skip
from spegeld.mirror._proxy import ProxySettings

from ._support import serving_registry

IMAGE = build_image("example.com/team/app:v1", [1_000_000], seed=71)
LAYER = IMAGE.platforms[0].layers[0]
LAYER_BYTES = IMAGE.read_blob(LAYER)
BLOB_PATH = f"/v2/team/app/blobs/{LAYER}?ns=example.com"
DEFAULTS = ProxySettings()

# What a peer does once it has read a request head: write to the stream, given the head.
Behaviour = Callable[[trio.SocketStream, bytes], object]


def _range(head: bytes) -> tuple[int, int] | None:
    """The ``bytes=start-[end]`` a request head asks for (end inclusive), if any."""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"range: bytes="):
            start, _, end = line.split(b"=")[1].partition(b"-")
            return int(start), int(end) if end else len(LAYER_BYTES) - 1
    return None


def _range_start(head: bytes) -> int | None:
    wanted = _range(head)
    return wanted[0] if wanted else None


def _head(status: bytes, length: int, *extra: bytes) -> bytes:
    lines = [b"HTTP/1.1 " + status, b"Content-Length: %d" % length, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def honest(stream: trio.SocketStream, head: bytes) -> None:
    """A correct peer: the blob, or the part a Range asks for."""
    wanted = _range(head)
    if wanted is None:
        await stream.send_all(_head(b"200 OK", len(LAYER_BYTES)) + LAYER_BYTES)
        return
    start, end = wanted
    part = LAYER_BYTES[start : end + 1]
    content_range = b"Content-Range: bytes %d-%d/%d" % (start, end, len(LAYER_BYTES))
    await stream.send_all(_head(b"206 Partial Content", len(part), content_range) + part)


@asynccontextmanager
async def peer(behaviour: Behaviour) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A stand-in peer on loopback; yields its address and the request heads it read."""
    seen: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(10):
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
            seen.append(head)
            # The proxy giving up on this peer is what these tests expect.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await behaviour(stream, head)  # type: ignore[misc]

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", seen
        nursery.cancel_scope.cancel()


async def metrics_of(url: str) -> str:
    async with httpx.AsyncClient(base_url=url) as client:
        return (await client.get("/metrics")).text


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:http", "127.0.0.1", "127.0.0.1:", ":5000", "127.0.0.1:0", "127.0.0.1:65536",
     "127.0.0.1:-1", "host name:5000", "a\x00b:5000", "ä.example:5000", "x" * 300 + ":1",
     "[::1:5000", "127.0.0.1:5000/x", ""],
)  # fmt: skip
def test_a_registry_address_that_is_not_host_port_is_a_peer_failure(address: str) -> None:
    with pytest.raises(BadPeerAddress):
        split_address(address)


@pytest.mark.parametrize(
    ("address", "want"),
    [("127.0.0.1:5000", ("127.0.0.1", 5000)), ("[::1]:5000", ("::1", 5000)),
     ("node-1.cluster.local:65535", ("node-1.cluster.local", 65535))],
)  # fmt: skip
def test_registry_addresses_split(address: str, want: tuple[str, int]) -> None:
    assert split_address(address) == want


async def test_a_member_with_a_bad_address_is_skipped_and_counted() -> None:
    """A non-numeric port (valid for the gossip codec) once made every lookup a 500."""
    with trio.fail_after(10):
        async with peer(honest) as (good, _):
            router = StaticRouter([Peer(NodeId("bad"), "127.0.0.1:http"), Peer(NodeId("ok"), good)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    response = await client.get(BLOB_PATH)
                metrics = await metrics_of(url)
    assert response.status_code == 200
    assert response.content == LAYER_BYTES
    assert 'spegeld_proxy_errors_total{reason="bad_address"} 1\n' in metrics


async def test_a_bad_address_met_during_a_resume_leaves_the_server_up() -> None:
    """The resume path once raised ValueError out of a response body: the daemon died."""

    async def dies(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(_head(b"200 OK", len(LAYER_BYTES)) + LAYER_BYTES[:300_000])

    with trio.fail_after(10):
        async with peer(dies) as (dying, _), peer(honest) as (good, good_seen):
            router = StaticRouter(
                [
                    Peer(NodeId("dying"), dying),
                    Peer(NodeId("bad"), "peer:x"),
                    Peer(NodeId("ok"), good),
                ]
            )
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    response = await client.get(BLOB_PATH)
                    assert (await client.get("/healthz")).status_code == 200
    assert response.content == LAYER_BYTES
    assert [_range_start(h) for h in good_seen] == [300_000]


async def test_a_peer_that_drips_is_cut_within_the_bound() -> None:
    """A byte now and then is not progress: the 64 KiB-per-2-s deadline cuts it."""
    settings = ProxySettings(body_idle_timeout=0.5)

    async def drips(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(_head(b"200 OK", len(LAYER_BYTES)) + LAYER_BYTES[:100_000])
        for i in range(100_000, len(LAYER_BYTES)):
            await stream.send_all(LAYER_BYTES[i : i + 1])
            await trio.sleep(0.05)

    with trio.fail_after(10):
        async with peer(drips) as (dripping, _):
            router = StaticRouter([Peer(NodeId("drip"), dripping)])
            async with serving_registry(MemoryStore(), router, proxy=settings) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    async with client.stream("GET", BLOB_PATH) as response:
                        assert response.status_code == 200
                        got = 0
                        with pytest.raises(httpx.RemoteProtocolError):
                            async for chunk in response.aiter_raw():
                                got += len(chunk)
                                if got >= 100_000:
                                    started = trio.current_time()
                    stalled = trio.current_time() - started
                metrics = await metrics_of(url)
    assert got < len(LAYER_BYTES)
    # Cut once 0.5 s of waiting brought under 64 KiB (a second, nothing resumes).
    assert stalled < 0.5 + 1.0
    assert 'spegeld_proxy_errors_total{reason="broken"} 1\n' in metrics


async def test_a_peer_that_accepts_and_never_answers_costs_at_most_the_first_byte_bound() -> None:
    """Two holders that hang after accepting: a 404 within first_byte_timeout, both counted."""
    release = trio.Event()

    async def hangs(stream: trio.SocketStream, head: bytes) -> None:
        await release.wait()

    settings = ProxySettings(response_timeout=10.0, first_byte_timeout=1.0)
    with trio.fail_after(15):
        async with peer(hangs) as (one, one_seen), peer(hangs) as (two, two_seen):
            router = StaticRouter([Peer(NodeId("one"), one), Peer(NodeId("two"), two)])
            async with serving_registry(MemoryStore(), router, proxy=settings) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    started = trio.current_time()
                    blob = await client.get(BLOB_PATH)
                    blob_took = trio.current_time() - started
                    started = trio.current_time()
                    manifest = await client.get("/v2/team/app/manifests/v1?ns=example.com")
                    manifest_took = trio.current_time() - started
                metrics = await metrics_of(url)
            release.set()
    assert blob.status_code == 404 and blob.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert manifest.status_code == 404
    assert len(one_seen) == len(two_seen) == 2  # the hedge asked both, both times
    # The bound is the setting; what it may exceed by is the request's own work.
    assert 1.0 <= blob_took < 1.0 + 0.5
    assert 1.0 <= manifest_took < 1.0 + 0.5
    assert 'spegeld_proxy_errors_total{reason="first_byte_timeout"} 2\n' in metrics


async def test_a_range_answered_with_another_range_is_not_passed_on() -> None:
    async def wrong_range(stream: trio.SocketStream, head: bytes) -> None:
        part = LAYER_BYTES[:10]
        content_range = b"Content-Range: bytes 0-9/%d" % len(LAYER_BYTES)
        await stream.send_all(_head(b"206 Partial Content", 10, content_range) + part)

    with trio.fail_after(10):
        async with peer(wrong_range) as (liar, _), peer(honest) as (good, _):
            router = StaticRouter([Peer(NodeId("liar"), liar), Peer(NodeId("ok"), good)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    part = await client.get(BLOB_PATH, headers={"range": "bytes=10-19"})
                metrics = await metrics_of(url)
    assert part.status_code == 206
    assert part.content == LAYER_BYTES[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(LAYER_BYTES)}"
    assert 'spegeld_proxy_errors_total{reason="bad_range"} 1\n' in metrics


async def test_a_206_to_a_request_without_range_is_refused() -> None:
    async def partial(stream: trio.SocketStream, head: bytes) -> None:
        content_range = b"Content-Range: bytes 0-9/%d" % len(LAYER_BYTES)
        await stream.send_all(_head(b"206 Partial Content", 10, content_range) + LAYER_BYTES[:10])

    with trio.fail_after(10):
        async with peer(partial) as (odd, _):
            router = StaticRouter([Peer(NodeId("odd"), odd)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    response = await client.get(BLOB_PATH)
                metrics = await metrics_of(url)
    assert response.status_code == 404
    assert 'spegeld_proxy_errors_total{reason="status_2xx"} 1\n' in metrics


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",  # > 20 digits
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # no length: the body would run to the close
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",  # a head past 64 KiB
        b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
)
async def test_what_a_peer_sends_in_its_head_is_checked(reply: bytes) -> None:
    async def answers(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(reply)

    with trio.fail_after(10):
        async with peer(answers) as (odd, _):
            router = StaticRouter([Peer(NodeId("odd"), odd)])
            async with serving_registry(MemoryStore(), router) as (_, url):
                async with httpx.AsyncClient(base_url=url) as client:
                    response = await client.get(BLOB_PATH)
                    assert (await client.get("/healthz")).status_code == 200
                metrics = await metrics_of(url)
    assert response.status_code == 404
    assert "spegeld_proxy_errors_total{" in metrics


async def test_peer_sockets_have_keepalive_and_nodelay() -> None:
    with trio.fail_after(10):
        async with peer(honest) as (address, _):
            response = await fetch(
                Peer(NodeId("p"), address), b"GET", b"/v2/x/blobs/" + LAYER.encode(), [],
                connect_timeout=1, response_timeout=1, idle_timeout=1,
            )  # fmt: skip
            try:
                stream = response._stream
                assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPIDLE
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == KEEPINTVL
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPCNT
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                body = b"".join([chunk async for chunk in response.body()])
            finally:
                await response.aclose()
    assert hashlib.sha256(body).hexdigest() == LAYER.removeprefix("sha256:")


async def test_a_body_wait_counts_only_time_spent_waiting_on_the_peer() -> None:
    """A consumer that pauses (its client reads slowly) does not make the peer late."""
    with trio.fail_after(10):
        async with peer(honest) as (address, _):
            response = await fetch(
                Peer(NodeId("p"), address), b"GET", b"/v2/x/blobs/" + LAYER.encode(), [],
                connect_timeout=1, response_timeout=1, idle_timeout=0.2,
            )  # fmt: skip
            received = 0
            try:
                async for chunk in response.body():
                    received += len(chunk)
                    await trio.sleep(0.3)  # longer than idle_timeout, between reads
            finally:
                await response.aclose()
    assert received == len(LAYER_BYTES)


async def test_a_head_that_never_comes_is_a_peer_failure() -> None:
    release = trio.Event()

    async def hangs(stream: trio.SocketStream, head: bytes) -> None:
        await release.wait()

    with trio.fail_after(10):
        async with peer(hangs) as (address, _):
            started = trio.current_time()
            with pytest.raises(PeerFailed, match=r"no response head in 0\.3 s"):
                await fetch(
                    Peer(NodeId("p"), address), b"GET", b"/v2/", [],
                    connect_timeout=1, response_timeout=0.3, idle_timeout=1,
                )  # fmt: skip
            assert trio.current_time() - started < 0.3 + 0.5
            release.set()
