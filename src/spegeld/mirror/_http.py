"""A small HTTP/1.1 server on trio and h11, with sendfile and graceful shutdown.

It knows nothing of registries: a handler turns a Request into a Response
whose body is bytes, a file region (sent with zero-copy ``os.sendfile``) or a
stream of chunks. A stream that raises mid-body aborts the connection, so the
client sees a short read instead of a complete-looking wrong response.

Nothing a client or a body does ends the server: an unexpected exception in a
handler or a body ends that one connection, is counted (``on_error``) and logged
once; a client that goes away ends its connection quietly. Every wait on a client
has a deadline (:class:`Limits`), and connection slots are held per source
(``_slots``), so no client can hold the server or lock containerd out.
"""

from __future__ import annotations

import errno
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import h11
import trio

from spegeld.errors import SpegeldError

from ._messages import (
    ERROR_KINDS,
    AbortResponse,
    Body,
    BytesBody,
    FileBody,
    Handler,
    Limits,
    Request,
    Response,
    StreamBody,
)
from ._sendfile import BodyFailed, SentLength, WriteTimeout, sendfile
from ._slots import Slots, Source, source_of

__all__ = [
    "ERROR_KINDS",
    "AbortResponse",
    "Body",
    "BytesBody",
    "FileBody",
    "Handler",
    "HttpServer",
    "Limits",
    "Request",
    "Response",
    "RequestAccounting",
    "ServerStatistics",
    "StreamBody",
]

logger = logging.getLogger(__name__)

RECEIVE_SIZE = 64 * 1024
# h11 accepts any HTTP/d.d and would treat HTTP/7.3 as 1.1: answer 505 instead.
SUPPORTED_VERSIONS = frozenset({b"1.0", b"1.1"})
# accept() failing for want of file descriptors or memory: wait this long and try again
# (trio's serve_listeners does the same); the listen backlog holds clients meanwhile.
ACCEPT_RETRY = 0.1
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
REFUSED_LOG_INTERVAL = 60.0  # seconds between warnings of a flood (refused or failed accepts)


class _HandlerFailed(Exception):
    """The handler raised instead of answering."""


class _HandlerTimeout(Exception):
    """The handler did not answer within ``Limits.handler_timeout``."""


class _BodyTimeout(Exception):
    """The body stream gave no chunk for ``Limits.body_timeout`` seconds."""


class RequestAccounting(Protocol):
    """Told of every request given to the handler: when it began and how it ended.

    ``end`` gets the status sent (500 when the handler raised, 503 when it timed out) and
    the body bytes of a complete response (0 for HEAD, and for a response cut short).
    It runs on the hot path: keep it to a few dictionary lookups."""

    def begin(self, request: Request) -> object: ...

    def end(self, token: object, status: int, size: int) -> None: ...


@dataclass(slots=True)
class ServerStatistics:
    connections: int = 0
    in_flight: int = 0
    requests: int = 0
    aborted: int = 0
    bad_requests: int = 0
    errors: int = 0  # handlers and bodies that raised (each connection aborted, logged)
    timeouts: int = 0  # connections cut by the head or write deadline
    refused: int = 0  # connections closed at accept: their source was over its cap


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        limits: Limits,
        *,
        on_error: Callable[[str], object] | None = None,
        accounting: RequestAccounting | None = None,
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._on_error = on_error
        self._accounting = accounting
        self._slots = Slots(
            shared=limits.max_connections,
            per_source=limits.per_source_connections,
            loopback=limits.loopback_connections,
        )
        self._accepting: list[trio.CancelScope] = []
        self._idle_scopes: set[trio.CancelScope] = set()
        self._draining = False
        self._drained = trio.Event()
        self._refused_logged_at: float | None = None
        self._refused_since_log = 0
        self._accept_log_due = -math.inf
        self.stats = ServerStatistics()

    def record_error(self, kind: str) -> None:
        """Count one error of ``kind`` (one of ERROR_KINDS)."""
        if kind in ("handler", "body", "internal"):
            self.stats.errors += 1
        elif kind.endswith("_timeout"):
            self.stats.timeouts += 1
        elif kind == "refused":
            self.stats.refused += 1
        if self._on_error is not None:
            self._on_error(kind)

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
        names: Sequence[str] = (),
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`shutdown`, then drain within the grace period and return.

        ``names[i]`` (default ``""``) is the listener name each request from
        ``listeners[i]`` carries (``Request.listener``): the handler knows where it came in.
        """
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as acceptors:
                for i, listener in enumerate(listeners):
                    scope = trio.CancelScope()
                    self._accepting.append(scope)
                    name = names[i] if i < len(names) else ""
                    acceptors.start_soon(
                        self._accept, listener, name, scope, connections.start_soon
                    )
                task_status.started()
            with trio.move_on_after(self._limits.grace_period):
                await self._drained.wait()
            connections.cancel_scope.cancel()

    async def _accept(
        self,
        listener: trio.SocketListener,
        name: str,
        scope: trio.CancelScope,
        spawn: Callable[..., object],
    ) -> None:
        """Accept without ever waiting on a slot: a connection over its source's cap is
        closed at once, so one source's flood never delays another's (loopback's)."""
        try:
            with scope:
                while True:
                    stream = await self._accept_one(listener)
                    source = source_of(stream.socket)
                    if source is None or not self._slots.take(source):
                        stream.socket.close()  # no await: the accept loop never waits on it
                        self._refused(source)
                        continue
                    spawn(self._connection, stream, source, name)
        finally:
            listener.socket.close()  # however we leave: shutdown, or a crash

    async def _accept_one(self, listener: trio.SocketListener) -> trio.SocketStream:
        """The next connection; running out of file descriptors or memory is waited out."""
        while True:
            try:
                return await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise  # the listening socket itself is broken: our bug, crash-only
                self.record_error("accept")
                now = trio.current_time()
                if now >= self._accept_log_due:
                    self._accept_log_due = now + REFUSED_LOG_INTERVAL
                    logger.error(  # noqa: TRY400 - the errno says it all
                        "accept failed: %s; retrying every %g s (raise LimitNOFILE?)",
                        os.strerror(exc.errno or 0),
                        ACCEPT_RETRY,
                    )
                await trio.sleep(ACCEPT_RETRY)

    def _refused(self, source: Source | None) -> None:
        self.record_error("refused")
        self._refused_since_log += 1
        now = trio.current_time()
        last = self._refused_logged_at
        if last is None or now - last >= REFUSED_LOG_INTERVAL:
            logger.warning(
                "closed %d connection(s) over their source's limit (last from %s, holding %d)",
                self._refused_since_log,
                source.key if source else "a client already gone",
                self._slots.held(source) if source else 0,
            )
            self._refused_logged_at = now
            self._refused_since_log = 0

    async def _connection(self, stream: trio.SocketStream, source: Source, name: str) -> None:
        self.stats.connections += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes)
        try:
            while not self._draining:
                event = await self._next_request(conn, stream)
                if event is None:
                    return
                await self._exchange(conn, stream, event, name)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            self.stats.bad_requests += 1
            await self._send_error(conn, stream, exc.error_status_hint, f"bad request: {exc}")
        except WriteTimeout:
            self.record_error("write_timeout")
            logger.debug("%s accepted nothing for %g s: cut", source.key, self._write_timeout)
        except _HandlerFailed as exc:
            self._log_failure("the handler", exc.__cause__)
            self.record_error("handler")
            await self._send_error(conn, stream, 500, "internal error")
        except _HandlerTimeout:
            logger.warning("no answer within %g s: 503", self._limits.handler_timeout)
            self.record_error("handler_timeout")
            await self._send_error(conn, stream, 503, "no answer in time")
        except _BodyTimeout:
            logger.warning("a response body stalled for %g s: cut", self._limits.body_timeout)
            self.record_error("body_timeout")
        except BodyFailed as exc:
            self._log_failure("a response body", exc.__cause__)
            self.record_error("body")
        except (trio.BrokenResourceError, trio.ClosedResourceError, AbortResponse, OSError):
            pass  # the client went away, or the body cut itself on purpose: nothing to tell
        except Exception:  # a bug in serving this one connection: it ends, not the server
            logger.exception("serving a connection from %s failed", source.key)
            self.record_error("internal")
        finally:
            self.stats.connections -= 1
            self._slots.give(source)
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    @property
    def _write_timeout(self) -> float:
        return self._limits.write_timeout

    def _log_failure(self, what: str, cause: BaseException | None) -> None:
        if isinstance(cause, SpegeldError | OSError):
            # A known failure (containerd gone, a blob deleted meanwhile): one line.
            logger.warning("%s failed, connection aborted: %s", what, cause)
        else:
            logger.error("%s raised, connection aborted", what, exc_info=cause)

    async def _next_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> h11.Request | None:
        """The next request head: None on a clean end, an idle keep-alive timeout, or a
        head that did not arrive within ``head_timeout`` of its first byte."""
        with trio.CancelScope(deadline=trio.current_time() + self._limits.idle_timeout) as scope:
            self._idle_scopes.add(scope)
            started = False
            try:
                while True:
                    if not started and conn.trailing_data[0]:
                        started = True
                        scope.deadline = trio.current_time() + self._limits.head_timeout
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        # h11 checks its size limit only on an incomplete head, so a head
                        # that completes in the read that crosses the limit would pass:
                        # never buffer more than the limit, and refuse a head that fills it.
                        buffered = len(conn.trailing_data[0])
                        room = self._limits.max_header_bytes - buffered
                        if room <= 0:
                            raise h11.RemoteProtocolError(
                                "request head too large", error_status_hint=431
                            )
                        conn.receive_data(await stream.receive_some(min(RECEIVE_SIZE, room)))
                    elif isinstance(event, h11.Request):
                        if event.http_version not in SUPPORTED_VERSIONS:
                            raise h11.RemoteProtocolError(
                                f"HTTP/{event.http_version.decode()} is not supported",
                                error_status_hint=505,
                            )
                        return event
                    else:  # ConnectionClosed, or PAUSED on a misbehaving client
                        return None
            finally:
                self._idle_scopes.discard(scope)
        if started and not self._draining:
            self.record_error("head_timeout")
        return None

    async def _exchange(
        self, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request, name: str = ""
    ) -> None:
        self.stats.requests += 1
        self.stats.in_flight += 1
        accounting = self._accounting
        token: object = None
        status, size = 500, 0  # what a handler that raised gets (_HandlerFailed)
        try:
            request = Request(
                method=bytes(req.method),
                target=bytes(req.target),
                headers={bytes(k): bytes(v) for k, v in req.headers},
                listener=name,
            )
            if accounting is not None:
                token = accounting.begin(request)
            response: Response | None = None
            try:  # outside the scope too: what a cancelled nursery leaves is an ExceptionGroup
                with trio.move_on_after(self._limits.handler_timeout):
                    response = await self._handler(request)
            except Exception as exc:
                raise _HandlerFailed from exc
            if response is None:
                status = 503
                raise _HandlerTimeout
            status = response.status
            await self._send(conn, stream, request, response)
            if request.method != b"HEAD":
                size = response.body.length
            # Consume the request's end (and any body already buffered); a body
            # still on the wire is never read, and the connection then closes.
            while conn.their_state is h11.SEND_BODY:
                if conn.next_event() is h11.NEED_DATA:
                    return
        finally:
            if accounting is not None and token is not None:
                accounting.end(token, status, size)
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
                await self._write(stream, head + _end(conn))
                return
            if isinstance(body, BytesBody):
                await self._write(stream, head + _data(conn, body.data) + _end(conn))
                return
            await self._write(stream, head)
            if isinstance(body, FileBody):
                await sendfile(stream, body, self._write_timeout)
                conn.send_with_data_passthrough(h11.Data(data=SentLength(body.length)))  # type: ignore[arg-type]
            else:
                chunks = body.chunks
                while True:
                    chunk = await self._next_chunk(chunks)
                    if chunk is None:
                        break
                    for piece in conn.send_with_data_passthrough(h11.Data(data=chunk)) or ():
                        await self._write(stream, piece)
            await self._write(stream, _end(conn))
        except (AbortResponse, h11.LocalProtocolError):
            self.stats.aborted += 1
            raise AbortResponse from None
        except (BodyFailed, _BodyTimeout, WriteTimeout):
            self.stats.aborted += 1
            raise
        finally:
            await self._close_body(body)

    async def _next_chunk(self, chunks: AsyncIterator[bytes]) -> bytes | None:
        """The body's next chunk, None at its end; within ``body_timeout`` seconds."""
        try:
            with trio.move_on_after(self._limits.body_timeout):
                return await anext(chunks)
        except StopAsyncIteration:
            return None
        except AbortResponse:
            raise
        except Exception as exc:
            raise BodyFailed from exc
        raise _BodyTimeout

    async def _write(self, stream: trio.SocketStream, data: bytes) -> None:
        """``send_all`` with an inactivity deadline: each wait for the client to accept
        more bytes may last at most ``write_timeout`` seconds.

        One checkpoint per call, not per partial send: the kernel takes what the send
        buffer has room for, the loop sends the rest at once until the kernel refuses
        (EAGAIN), and only then waits. trio's ``send`` passes through the scheduler on
        every call, and a 1 MiB proxied chunk goes out in several partial sends: with
        it, the interpreter was 27 % of the relaying mirror's CPU samples, 16 % without
        (perf, bench/relay_micro.py), and the loop's passes per chunk halved (strace)."""
        await trio.lowlevel.checkpoint()
        sock = stream.socket
        view = memoryview(data)
        sent = 0
        while sent < len(view):
            try:
                sent += os.write(sock.fileno(), view[sent:])
            except BlockingIOError:
                with trio.move_on_after(self._write_timeout):
                    await trio.lowlevel.wait_writable(sock)
                    continue
                raise WriteTimeout from None

    async def _close_body(self, body: Body) -> None:
        if not isinstance(body, StreamBody):
            return
        with trio.move_on_after(1, shield=True):
            try:
                aclose = getattr(body.chunks, "aclose", None)
                if aclose is not None:
                    await aclose()
                if body.on_close is not None:
                    await body.on_close()
            except Exception:  # the response is over either way; the server goes on
                logger.exception("closing a response body failed")
                self.record_error("body")

    async def _send_error(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, text: str
    ) -> None:
        """A last plain answer before closing, when nothing of a response went out yet."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{text}\n".encode()
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
            await self._write(stream, (head or b"") + _data(conn, body) + _end(conn))
        except (
            h11.LocalProtocolError,
            WriteTimeout,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ):
            pass


def _data(conn: h11.Connection, data: bytes) -> bytes:
    return conn.send(h11.Data(data=data)) or b"" if data else b""


def _end(conn: h11.Connection) -> bytes:
    return conn.send(h11.EndOfMessage()) or b""
