"""Fetching from a peer's mirror: h11 for the response head, raw reads for the body.

The body bypasses h11 because its buffer copies every byte several times, and
the proxy's throughput target leaves no room for that. Each fetch uses its own
connection and closes it: peer responses are large and few.
"""

from __future__ import annotations

import re
import socket
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
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})")


class PeerFailed(SpegeldError):
    """A peer could not be reached, broke the protocol, or stopped mid-body."""


class BadPeerAddress(PeerFailed):
    """A member's mirror address is not HOST:PORT: it is skipped, never contacted."""


@dataclass(slots=True)
class PeerResponse:
    peer: Peer
    status: int
    headers: dict[bytes, bytes]
    length: int
    _stream: trio.SocketStream
    _leftover: bytes
    idle_timeout: float = 2.0  # seconds of waiting for MIN_PROGRESS body bytes

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    async def body(self) -> AsyncIterator[bytes]:
        """The body bytes as they arrive; PeerFailed if the peer stops short."""
        remaining = self.length
        if self._leftover:
            chunk, self._leftover = self._leftover[:remaining], b""
            remaining -= len(chunk)
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
            yield chunk

    async def read_all(self, limit: int) -> bytes:
        if self.length > limit:
            raise PeerFailed(f"{self.peer.mirror} sent {self.length} bytes, over {limit}")
        return b"".join([chunk async for chunk in self.body()])

    async def aclose(self) -> None:
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


async def fetch(
    peer: Peer,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    connect_timeout: float,
    response_timeout: float,
    idle_timeout: float,
) -> PeerResponse:
    """Send one request to ``peer`` and return once its response head has arrived.

    The head must arrive within ``response_timeout`` seconds of the connection; body
    reads then have the ``idle_timeout`` progress deadline. Every failure, whatever the
    peer sent or did, is a PeerFailed.
    """
    host, port = split_address(peer.mirror)
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
    # ValueError: a host getaddrinfo or IDNA refuses (an embedded NUL, a bad label).
    except (OSError, ValueError, trio.TooSlowError) as exc:
        raise PeerFailed(f"cannot connect to {peer.mirror}: {exc}") from exc
    try:
        _keepalive(stream)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        request = h11.Request(
            method=method,
            target=target,
            headers=[
                (b"host", peer.mirror.encode()),
                (MIRRORED_HEADER, b"true"),
                (b"connection", b"close"),
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
                    conn.receive_data(await stream.receive_some(HEAD_RECEIVE_SIZE))
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
        return PeerResponse(
            peer, event.status_code, response_headers, length, stream, bytes(leftover),
            idle_timeout,
        )  # fmt: skip
    except BaseException as exc:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
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
