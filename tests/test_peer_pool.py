"""Connection reuse to peers (mirror/_peer.PeerPool) over real loopback sockets.

The peer here is a small raw HTTP/1.1 server, not a spegeld: it must close idle
connections, cut bodies and refuse keep-alive on purpose, which a healthy spegeld
never does. Bodies are small: only the connection handling is under test.
"""

from __future__ import annotations

import functools
import gc
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from spegeld.mirror._peer import PeerFailed, PeerPool, PeerResponse, _quiet, fetch
from spegeld.routing import NodeId, Peer

BODY = b"x" * 100_000


@dataclass
class PeerLog:
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    # What the next responses do: "keep" (keep-alive), "close" (Connection: close),
    # "cut" (half the body, then close), "close_idle" (answer, then close the idle
    # connection after 50 ms, as a peer that restarts or drains does).
    mode: str = "keep"


@asynccontextmanager
async def keepalive_peer() -> AsyncIterator[tuple[Peer, PeerLog]]:
    log = PeerLog()

    async def handle(stream: trio.SocketStream) -> None:
        log.connections += 1
        buffered = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffered:
                    try:
                        data = await stream.receive_some(4096)
                    except trio.BrokenResourceError:
                        return  # the client reset it: it dropped an unread body
                    if not data:
                        return
                    buffered += data
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                log.requests.append(head)
                mode = log.mode
                body = b"" if head.startswith(b"HEAD ") else BODY
                extra = b"Connection: close\r\n" if mode == "close" else b""
                response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(BODY), extra)
                try:
                    if mode == "cut":
                        await stream.send_all(response + body[: len(body) // 2])
                        return
                    await stream.send_all(response + body)
                except trio.BrokenResourceError:
                    return
                if mode == "close":
                    return
                if mode == "close_idle":
                    await trio.sleep(0.05)
                    return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield Peer(NodeId("p"), f"127.0.0.1:{port}"), log
        nursery.cancel_scope.cancel()


async def get(peer: Peer, pool: PeerPool, method: bytes = b"GET") -> PeerResponse:
    return await fetch(
        peer, method, b"/v2/x/blobs/sha256:00", [], connect_timeout=1, response_timeout=2,
        idle_timeout=2, pool=pool,
    )  # fmt: skip


async def read(response: PeerResponse) -> bytes:
    try:
        return await response.read_all(len(BODY))
    finally:
        await response.aclose()


async def test_consecutive_requests_share_one_connection() -> None:
    with trio.fail_after(10):
        async with keepalive_peer() as (peer, log):
            pool = PeerPool()
            for _ in range(5):
                assert await read(await get(peer, pool)) == BODY
            head = await get(peer, pool, b"HEAD")
            await head.aclose()
            assert log.connections == 1
            assert len(log.requests) == 6
            assert b"connection: close" not in log.requests[0].lower()
            assert len(pool) == 1
            pool.close()


async def test_unread_or_cut_bodies_never_go_back() -> None:
    with trio.fail_after(10):
        async with keepalive_peer() as (peer, log):
            pool = PeerPool()
            unread = await get(peer, pool)  # a hedge's loser: released before its body
            await unread.aclose()
            await unread.aclose()  # idempotent
            assert len(pool) == 0
            log.mode = "cut"
            cut = await get(peer, pool)
            try:
                await read(cut)
            except PeerFailed:
                pass
            else:
                raise AssertionError("a cut body must fail")
            assert len(pool) == 0
            log.mode = "close"
            assert await read(await get(peer, pool)) == BODY
            assert len(pool) == 0, "Connection: close is honoured"
            log.mode = "keep"
            assert await read(await get(peer, pool)) == BODY
            assert log.connections == 4, "every failed or closed connection was replaced"
            pool.close()


async def test_a_connection_the_peer_closed_is_replaced_transparently() -> None:
    with trio.fail_after(10):
        async with keepalive_peer() as (peer, log):
            pool = PeerPool()
            log.mode = "close_idle"
            assert await read(await get(peer, pool)) == BODY
            assert len(pool) == 1
            await trio.sleep(0.2)  # the peer has closed the idle connection
            log.mode = "keep"
            assert await read(await get(peer, pool)) == BODY
            assert log.connections == 2
            pool.close()


async def test_a_request_on_a_dead_quiet_connection_is_sent_again_fresh() -> None:
    """The race the check before reuse cannot see: the connection looks idle (nothing to
    read) but is dead. Here: one whose sending side is shut, to a peer that says nothing.
    Sending fails before any response byte, and the request goes out on a new connection."""

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with keepalive_peer() as (peer, log), trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1")
            )
            dead = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
            # Shut through a duplicate: trio would refuse the send itself, not the kernel.
            with socket.fromfd(dead.socket.fileno(), socket.AF_INET, socket.SOCK_STREAM) as raw:
                raw.shutdown(socket.SHUT_WR)  # the kernel refuses our next send: EPIPE
            assert _quiet(dead), "it passes the check before reuse"
            pool = PeerPool()
            pool.give(peer.mirror, dead)
            assert await read(await get(peer, pool)) == BODY
            assert log.connections == 1
            assert len(pool) == 1
            pool.close()
            nursery.cancel_scope.cancel()


async def test_bounds_per_peer_in_all_and_in_time() -> None:
    with trio.fail_after(10):
        async with keepalive_peer() as (peer, log), keepalive_peer() as (other, _):
            pool = PeerPool(per_peer=2, total=3, ttl=0.2)
            responses = [await get(peer, pool) for _ in range(4)]
            for response in responses:
                assert await read(response) == BODY
            assert len(pool) == 2, "at most per_peer idle connections to one peer"
            responses = [await get(other, pool) for _ in range(2)]
            for response in responses:
                assert await read(response) == BODY
            assert len(pool) == 3, "at most total idle connections"
            await trio.sleep(0.3)
            assert pool.take(peer.mirror) is None, "never reused past the idle bound"
            assert len(pool) == 0, "and closed"
            assert log.connections == 4


async def test_idle_sockets_are_closed_with_the_pool() -> None:
    with trio.fail_after(10):
        async with keepalive_peer() as (peer, _):
            pool = PeerPool()
            assert await read(await get(peer, pool)) == BODY
            assert len(pool) == 1
            del pool
            gc.collect()  # filterwarnings=error: an unclosed socket would fail the test
