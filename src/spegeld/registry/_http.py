"""A small HTTP/1.1 server on trio and h11, with sendfile and graceful shutdown.

It knows nothing of registries: a handler turns a Request into a Response
whose body is bytes, a file region (sent with zero-copy ``os.sendfile``) or a
stream of chunks. A stream that raises mid-body aborts the connection, so the
client sees a short read instead of a complete-looking wrong response.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio

logger = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024  # large enough to amortise the syscall, small enough to be fair


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 1024
    max_header_bytes: int = 16 * 1024
    idle_timeout: float = 30.0  # seconds a connection may sit between (or inside) request heads
    grace_period: float = 10.0  # seconds in-flight responses get at shutdown


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


@dataclass(frozen=True, slots=True)
class BytesBody:
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class FileBody:
    path: Path
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class StreamBody:
    chunks: AsyncIterator[bytes]
    length: int
    # Runs however the response ends, even if it is dropped before its first chunk (an
    # async generator that never started never runs its own ``finally``).
    on_close: Callable[[], Awaitable[None]] | None = None


Body = BytesBody | FileBody | StreamBody


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Sequence[tuple[bytes, bytes]] = ()
    body: Body = field(default_factory=lambda: BytesBody(b""))


Handler = Callable[[Request], Awaitable[Response]]


class _Length:
    """Stands in for a body h11 must count but we send ourselves (sendfile)."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n


class AbortResponse(Exception):
    """Raised by a body stream to cut the response: the connection closes unfinished."""


@dataclass(slots=True)
class ServerStatistics:
    connections: int = 0
    in_flight: int = 0
    requests: int = 0
    aborted: int = 0
    bad_requests: int = 0


class HttpServer:
    def __init__(self, handler: Handler, limits: Limits) -> None:
        self._handler = handler
        self._limits = limits
        self._slots = trio.Semaphore(limits.max_connections)
        self._accepting: list[trio.CancelScope] = []
        self._idle_scopes: set[trio.CancelScope] = set()
        self._draining = False
        self._drained = trio.Event()
        self.stats = ServerStatistics()

    def shutdown(self) -> None:
        """Stop accepting, close idle connections, let in-flight responses finish."""
        self._draining = True
        for scope in self._accepting:
            scope.cancel()
        for scope in list(self._idle_scopes):
            scope.cancel()
        if self.stats.in_flight == 0:
            self._drained.set()

    async def serve(
        self,
        listeners: Sequence[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`shutdown`, then drain within the grace period and return."""
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    scope = trio.CancelScope()
                    self._accepting.append(scope)
                    acceptors.start_soon(self._accept, listener, scope, connections.start_soon)
                task_status.started()
            with trio.move_on_after(self._limits.grace_period):
                await self._drained.wait()
            connections.cancel_scope.cancel()

    async def _accept(
        self,
        listener: trio.SocketListener,
        scope: trio.CancelScope,
        spawn: Callable[..., object],
    ) -> None:
        with scope:
            while True:
                await self._slots.acquire()
                try:
                    stream = await listener.accept()
                except BaseException:
                    self._slots.release()
                    raise
                spawn(self._connection, stream)
        await listener.aclose()

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes)
        try:
            while not self._draining:
                event = await self._next_request(conn, stream)
                if event is None:
                    return
                await self._exchange(conn, stream, event)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            self.stats.bad_requests += 1
            await _send_protocol_error(conn, stream, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, AbortResponse, OSError):
            pass
        finally:
            self.stats.connections -= 1
            self._slots.release()
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    async def _next_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> h11.Request | None:
        with trio.move_on_after(self._limits.idle_timeout) as scope:
            self._idle_scopes.add(scope)
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        # Reads no bigger than the header limit, so h11 sees an
                        # over-long head as incomplete and refuses it (431).
                        size = min(RECEIVE_SIZE, self._limits.max_header_bytes)
                        conn.receive_data(await stream.receive_some(size))
                    elif isinstance(event, h11.Request):
                        return event
                    else:  # ConnectionClosed, or PAUSED on a misbehaving client
                        return None
            finally:
                self._idle_scopes.discard(scope)
        return None

    async def _exchange(
        self, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request
    ) -> None:
        self.stats.requests += 1
        self.stats.in_flight += 1
        try:
            request = Request(
                method=bytes(req.method),
                target=bytes(req.target),
                headers={bytes(k): bytes(v) for k, v in req.headers},
            )
            response = await self._handler(request)
            await self._send(conn, stream, request, response)
            # Consume the request's end (and any body already buffered); a body
            # still on the wire is never read, and the connection then closes.
            while conn.their_state is h11.SEND_BODY:
                if conn.next_event() is h11.NEED_DATA:
                    return
        finally:
            self.stats.in_flight -= 1
            if self._draining and self.stats.in_flight == 0:
                self._drained.set()

    async def _send(
        self, conn: h11.Connection, stream: trio.SocketStream, request: Request, response: Response
    ) -> None:
        body = response.body
        headers = [*response.headers, (b"content-length", str(body.length).encode())]
        if self._draining:
            headers.append((b"connection", b"close"))
        head = conn.send(h11.Response(status_code=response.status, headers=headers))
        assert head is not None
        try:
            if request.method == b"HEAD":
                await stream.send_all(head + _end(conn))
                return
            if isinstance(body, BytesBody):
                await stream.send_all(head + _data(conn, body.data) + _end(conn))
                return
            await stream.send_all(head)
            if isinstance(body, FileBody):
                await _sendfile(stream, body)
                conn.send_with_data_passthrough(h11.Data(data=_Length(body.length)))  # type: ignore[arg-type]
            else:
                async for chunk in body.chunks:
                    for piece in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():
                        await stream.send_all(piece)
            await stream.send_all(_end(conn))
        except (AbortResponse, h11.LocalProtocolError):
            self.stats.aborted += 1
            raise AbortResponse from None
        finally:
            await _close_body(body)


def _data(conn: h11.Connection, data: bytes) -> bytes:
    return conn.send(h11.Data(data=data)) or b"" if data else b""


def _end(conn: h11.Connection) -> bytes:
    return conn.send(h11.EndOfMessage()) or b""


async def _close_body(body: Body) -> None:
    if isinstance(body, StreamBody):
        with trio.move_on_after(1, shield=True):
            aclose = getattr(body.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            if body.on_close is not None:
                await body.on_close()


async def _sendfile(stream: trio.SocketStream, body: FileBody) -> None:
    sock = stream.socket
    fd = os.open(body.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset, remaining = body.offset, body.length
        while remaining > 0:
            await trio.lowlevel.checkpoint()
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, min(remaining, SENDFILE_CHUNK))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            if sent == 0:
                raise AbortResponse(f"{body.path} ended {remaining} bytes early")
            offset += sent
            remaining -= sent
    finally:
        os.close(fd)


async def _send_protocol_error(
    conn: h11.Connection, stream: trio.SocketStream, exc: h11.RemoteProtocolError
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = exc.error_status_hint
    body = f"bad request: {exc}\n".encode()
    try:
        head = conn.send(
            h11.Response(
                status_code=status,
                headers=[
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            )
        )
        await stream.send_all((head or b"") + _data(conn, body) + _end(conn))
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
