"""Fetching from a peer's mirror: h11 for the response head, raw reads for the body.

The body bypasses h11 because its buffer copies every byte several times, and
the proxy's throughput target leaves no room for that. A connection whose response
was read to its exact end goes back to a :class:`PeerPool` for the next request to
that peer (a pull asks the same holder for every blob); any other is closed.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import h11
import trio

from spegeld.errors import SpegeldError
from spegeld.routing import Peer

RECEIVE_SIZE = 1024 * 1024  # body reads: fewer, larger reads make the proxy faster
HEAD_RECEIVE_SIZE = 64 * 1024  # response-head reads: no large buffer for a few hundred bytes
MIRRORED_HEADER = b"x-spegeld-mirrored"
# TCP keepalive on peer sockets: a peer host that vanishes (power loss, a cut link) while
# this side is not reading (its client is slow) is noticed by the kernel after
# KEEPIDLE + KEEPCNT * KEEPINTVL = 11 s of silence instead of the default 2 h 11 min, so
# the socket and its buffers go. Peers are on the local network, where an ACK takes well
# under a millisecond: 3 probes 2 s apart only fail for a peer that is really gone.
KEEPIDLE = 5  # seconds of silence before the first probe
KEEPINTVL = 2  # seconds between probes
KEEPCNT = 3  # unanswered probes before the connection is reset
# Body progress: while this side waits on the peer, at least MIN_PROGRESS bytes (or the
# rest of the body) must arrive within each ``idle_timeout`` seconds of waiting. This is the
# inactivity deadline, and it also catches a peer that drips a byte at a time. 64 KiB per
# 2 s is 32 KiB/s: a peer below that on a local network is broken, not slow.
MIN_PROGRESS = 64 * 1024
# A member's mirror address: a host name or IPv4 address, or a bracketed IPv6 address,
# then a port. Anything else (the gossip codec carries any string) is refused before use.
# Idle keep-alive connections kept for reuse (PeerPool). A new connection per request costs
# a connect, an accept and a task on the peer, and a cold window; a pull asks one holder
# for its manifest, config and every layer.
POOL_PER_PEER = 4  # idle connections per peer: containerd fetches 3 layers at once, plus one
POOL_MAX = 64  # idle connections in all: a bound on file descriptors held for nothing
# Seconds an idle connection may wait for its next request. Well under the peer's own idle
# timeout (Limits.idle_timeout, 30 s), so the peer does not close a connection as we
# reuse it, except when it restarts or drains (then the request is retried once, fresh).
POOL_IDLE_TTL = 5.0
# A live peer answers from its store (or its in-flight data) within milliseconds; a pooled
# connection silent this long is retried on a new connection. Costs a live but slow peer one
# new connection, never an error; saves the full head deadline when the peer went away.
REUSED_HEAD_TIMEOUT = 0.25
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})")


class PeerFailed(SpegeldError):
    """A peer could not be reached, broke the protocol, or stopped mid-body."""


class BadPeerAddress(PeerFailed):
    """A member's mirror address is not HOST:PORT: it is skipped, never contacted."""


class PeerPool:
    """Idle connections to peers, at most ``per_peer`` each and ``total`` in all, none
    reused after ``ttl`` seconds idle. Only a connection whose response ended exactly
    (PeerResponse.aclose) comes back; one that failed in any way is closed, never kept.
    Expired connections are closed at the next take or give. Trio-thread only."""

    def __init__(
        self, per_peer: int = POOL_PER_PEER, total: int = POOL_MAX, ttl: float = POOL_IDLE_TTL
    ) -> None:
        self._per_peer = per_peer
        self._total = total
        self._ttl = ttl
        self._idle: dict[str, list[tuple[float, trio.SocketStream]]] = {}
        # Sockets still idle when the pool goes away are closed then, not left to the GC.
        weakref.finalize(self, _close_idle, self._idle)

    def __len__(self) -> int:
        return sum(len(stack) for stack in self._idle.values())

    def take(self, address: str) -> trio.SocketStream | None:
        """The most recently used idle connection to ``address`` still fit for a request."""
        self._expire(trio.current_time())
        stack = self._idle.get(address)
        while stack:
            _, stream = stack.pop()
            if not stack:
                del self._idle[address]
            if _quiet(stream):
                return stream
            stream.socket.close()  # the peer closed it, or sent bytes nobody asked for
        return None

    def give(self, address: str, stream: trio.SocketStream) -> None:
        now = trio.current_time()
        self._expire(now)
        stack = self._idle.setdefault(address, [])
        if len(stack) >= self._per_peer or len(self) > self._total - 1:
            stream.socket.close()
            if not stack:
                del self._idle[address]
            return
        stack.append((now + self._ttl, stream))

    def close(self) -> None:
        _close_idle(self._idle)

    def _expire(self, now: float) -> None:
        for address in list(self._idle):
            stack = self._idle[address]
            while stack and stack[0][0] <= now:  # oldest first: given in time order
                stack.pop(0)[1].socket.close()
            if not stack:
                del self._idle[address]


def _close_idle(idle: dict[str, list[tuple[float, trio.SocketStream]]]) -> None:
    """Close every idle socket; outside trio too (the pool's finalizer): no trio call."""
    for stack in idle.values():
        for _, stream in stack:
            with contextlib.suppress(OSError):
                os.close(stream.socket.detach())
    idle.clear()


def _quiet(stream: trio.SocketStream) -> bool:
    """Whether an idle connection has nothing to read: readable means the peer closed it
    (end of file, a reset) or sent what no request asked for; either way it is not reused."""
    poller = select.poll()
    poller.register(stream.socket.fileno(), select.POLLIN | select.POLLPRI)
    try:
        return not poller.poll(0)
    except OSError:
        return False


@dataclass(slots=True)
class PeerResponse:
    peer: Peer
    status: int
    headers: dict[bytes, bytes]
    length: int
    _stream: trio.SocketStream
    _leftover: bytes
    idle_timeout: float = 2.0  # seconds of waiting for MIN_PROGRESS body bytes
    # Where the connection goes back when the response ended exactly (None: closed).
    _pool: PeerPool | None = None
    _ended: bool = False  # every body byte read, and not one more
    _released: bool = False  # aclose ran: the stream is closed, or another request's

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    async def body(self) -> AsyncIterator[bytes]:
        """The body bytes as they arrive; PeerFailed if the peer stops short."""
        remaining = self.length
        if self._leftover:
            if len(self._leftover) > remaining:
                self._pool = None  # more than Content-Length: the connection is not reused
            chunk, self._leftover = self._leftover[:remaining], b""
            remaining -= len(chunk)
            self._ended = remaining == 0
            yield chunk
        # Only time spent waiting on the peer counts: while the consumer is busy (its own
        # client reads slowly) the peer is not to blame.
        waited = 0.0
        progress = 0
        while remaining > 0:
            started = trio.current_time()
            try:
                with trio.fail_after(max(0.0, self.idle_timeout - waited)):
                    chunk = await self._stream.receive_some(min(RECEIVE_SIZE, remaining))
            except trio.TooSlowError as exc:
                raise PeerFailed(
                    f"{self.peer.mirror} sent {progress} bytes in {self.idle_timeout:g} s"
                    f" with {remaining} bytes to go"
                ) from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PeerFailed(f"{self.peer.mirror} broke off: {exc}") from exc
            if not chunk:
                raise PeerFailed(f"{self.peer.mirror} closed with {remaining} bytes unsent")
            waited += trio.current_time() - started
            progress += len(chunk)
            if progress >= MIN_PROGRESS:
                waited, progress = 0.0, 0
            remaining -= len(chunk)
            self._ended = remaining == 0
            yield chunk

    async def read_all(self, limit: int) -> bytes:
        if self.length > limit:
            raise PeerFailed(f"{self.peer.mirror} sent {self.length} bytes, over {limit}")
        return b"".join([chunk async for chunk in self.body()])

    async def aclose(self) -> None:
        """Give the connection back to the pool when the response ended exactly, else
        close it. Idempotent: once given back, the stream is another request's."""
        if self._released:
            return
        self._released = True
        # A short body (an error's) that arrived with the head ends the response too.
        ended = (
            self._ended
            or (not self.length and not self._leftover)
            or (len(self._leftover) == self.length)
        )
        if self._pool is not None and ended:
            self._pool.give(self.peer.mirror, self._stream)
            return
        with trio.move_on_after(1, shield=True):
            await self._stream.aclose()


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); BadPeerAddress for anything else."""
    match = _ADDRESS.fullmatch(address)
    port = int(match.group(2)) if match else 0
    if match is None or not 0 < port < 65536:
        raise BadPeerAddress(f"not a HOST:PORT mirror address: {address[:100]!r}")
    return match.group(1).strip("[]"), port


def _keepalive(stream: trio.SocketStream) -> None:
    """Turn on TCP keepalive with the timings above (trio already sets TCP_NODELAY)."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)


class _StaleConnection(Exception):
    """A reused connection ended before any byte of the response: the peer had closed it."""


async def fetch(
    peer: Peer,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    connect_timeout: float,
    response_timeout: float,
    idle_timeout: float,
    pool: PeerPool | None = None,
) -> PeerResponse:
    """Send one request to ``peer`` and return once its response head has arrived.

    The head must arrive within ``response_timeout`` seconds of the connection; body
    reads then have the ``idle_timeout`` progress deadline. Every failure, whatever the
    peer sent or did, is a PeerFailed. With a ``pool``, an idle connection to the peer is
    reused; if the peer had closed it, or sent nothing within REUSED_HEAD_TIMEOUT, the
    request is sent once more on a new connection (GET and HEAD only: safe to repeat).
    """
    host, port = split_address(peer.mirror)
    reused = pool.take(peer.mirror) if pool is not None else None
    if reused is not None:
        # A pooled connection to a peer that has since become unreachable (a partition,
        # a dropped route) takes the request and never answers: after REUSED_HEAD_TIMEOUT
        # of silence the request goes again on a new connection, with the full deadlines.
        try:
            return await _exchange(
                peer, reused, method, target, headers,
                min(response_timeout, REUSED_HEAD_TIMEOUT), idle_timeout, pool, reused=True,
            )  # fmt: skip
        except _StaleConnection:
            pass
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
    # ValueError: a host getaddrinfo or IDNA refuses (an embedded NUL, a bad label).
    except (OSError, ValueError, trio.TooSlowError) as exc:
        raise PeerFailed(f"cannot connect to {peer.mirror}: {exc}") from exc
    try:
        _keepalive(stream)
    except OSError as exc:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
        raise PeerFailed(f"{peer.mirror}: {exc}") from exc
    return await _exchange(
        peer, stream, method, target, headers, response_timeout, idle_timeout, pool,
        reused=False,
    )  # fmt: skip


async def _exchange(
    peer: Peer,
    stream: trio.SocketStream,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    response_timeout: float,
    idle_timeout: float,
    pool: PeerPool | None,
    *,
    reused: bool,
) -> PeerResponse:
    """One request on ``stream`` (closed on any failure), up to the response head.
    _StaleConnection when a ``reused`` stream ends before any response byte."""
    received = False
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        request = h11.Request(
            method=method,
            target=target,
            headers=[
                (b"host", peer.mirror.encode()),
                (MIRRORED_HEADER, b"true"),
                *([] if pool is not None else [(b"connection", b"close")]),
                *headers,
            ],
        )
        with trio.fail_after(response_timeout):
            await stream.send_all(
                (conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            )
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(HEAD_RECEIVE_SIZE)
                    received = received or bool(data)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    break
                if isinstance(event, h11.InformationalResponse):
                    continue
                raise PeerFailed(f"{peer.mirror} closed before answering")
        response_headers = {bytes(k): bytes(v) for k, v in event.headers}
        length_text = response_headers.get(b"content-length", b"0" if method == b"HEAD" else b"")
        if not length_text.isdigit():
            raise PeerFailed(f"{peer.mirror} answered without a Content-Length")
        length = 0 if method == b"HEAD" else int(length_text)
        leftover, _ = conn.trailing_data
        # Reused only when both sides keep it: HTTP/1.1 and no "Connection: close".
        keep = (
            pool is not None
            and event.http_version == b"1.1"
            and b"close" not in response_headers.get(b"connection", b"").lower()
        )
        return PeerResponse(
            peer, event.status_code, response_headers, length, stream, bytes(leftover),
            idle_timeout, pool if keep else None,
        )  # fmt: skip
    except BaseException as exc:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
        stale = (
            reused
            and not received
            and method in (b"GET", b"HEAD")
            and isinstance(exc, (PeerFailed, OSError, trio.BrokenResourceError, trio.TooSlowError))
        )
        if stale:
            raise _StaleConnection from exc
        if isinstance(exc, trio.TooSlowError):
            raise PeerFailed(
                f"{peer.mirror} sent no response head in {response_timeout:g} s"
            ) from exc
        if isinstance(
            exc,
            (OSError, ValueError, trio.BrokenResourceError, trio.ClosedResourceError,
             h11.ProtocolError),
        ):  # fmt: skip
            raise PeerFailed(f"{peer.mirror}: {exc}") from exc
        raise
