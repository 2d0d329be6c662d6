"""The HTTP server's body writes (mirror/_http._write) over real loopback sockets.

A chunk goes out in as many partial sends as the client's reading allows, with one
checkpoint per chunk rather than per send: these tests give the server one chunk far
larger than any socket buffer and check that it arrives whole to a slow reader, that
other tasks keep running meanwhile, and that a client resetting mid-chunk ends only its
own connection.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator

import trio

from spegeld.mirror._http import HttpServer, Limits, Request, Response, StreamBody

CHUNK = os.urandom(16 * 1024 * 1024)  # one chunk, many times a loopback socket buffer
TIMEOUT = 20


async def _one_chunk() -> AsyncIterator[bytes]:
    yield CHUNK


async def _handler(request: Request) -> Response:
    length = str(len(CHUNK)).encode()
    return Response(200, [(b"content-length", length)], StreamBody(_one_chunk(), len(CHUNK)))


async def _read_response(stream: trio.SocketStream, pause_every: int) -> bytes:
    """The body of one response; a short sleep every ``pause_every`` bytes read."""
    await stream.send_all(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    parts, have, since_pause = [body], len(body), 0
    while have < len(CHUNK):
        part = await stream.receive_some(65536)
        assert part, f"closed after {have} bytes"
        parts.append(part)
        have += len(part)
        since_pause += len(part)
        if since_pause >= pause_every:
            since_pause = 0
            await trio.sleep(0.001)
    return b"".join(parts)


async def test_a_chunk_larger_than_the_socket_buffer_reaches_a_slow_reader_whole() -> None:
    server = HttpServer(_handler, Limits(write_timeout=5))
    ticks = 0

    async def ticker() -> None:  # another task of the server's trio run
        nonlocal ticks
        while True:
            await trio.sleep(0.001)
            ticks += 1

    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            nursery.start_soon(ticker)
            stream = await trio.open_tcp_stream(host, port)
            for pause_every in (256 * 1024, 4 * 1024 * 1024):  # two responses, one connection
                before = ticks
                body = await _read_response(stream, pause_every)
                assert hashlib.sha256(body).digest() == hashlib.sha256(CHUNK).digest()
                assert ticks > before  # the write waited for the reader, it did not spin
            await stream.aclose()
            server.shutdown()
            nursery.cancel_scope.cancel()
    assert server.stats.aborted == 0


async def test_a_client_resetting_mid_chunk_ends_only_its_connection() -> None:
    server = HttpServer(_handler, Limits(write_timeout=5))
    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        host, port = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listeners)
            quitter = await trio.open_tcp_stream(host, port)
            await quitter.send_all(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
            got = 0
            while got < 1024 * 1024:  # the server is inside the chunk's write now
                got += len(await quitter.receive_some(65536))
            # SO_LINGER 0: close sends a reset, the server's next send fails (EPIPE or
            # ECONNRESET), as when containerd is killed mid-pull.
            quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await quitter.aclose()
            stream = await trio.open_tcp_stream(host, port)
            body = await _read_response(stream, 8 * 1024 * 1024)
            assert body == CHUNK  # the server goes on serving
            await stream.aclose()
            server.shutdown()
            nursery.cancel_scope.cancel()
    assert server.stats.errors == 0  # a client going away is no error of ours
