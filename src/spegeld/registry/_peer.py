"""Fetching from a peer's registry: h11 for the response head, raw reads for the body.

The body bypasses h11 because its buffer copies every byte several times, and
the proxy's throughput target leaves no room for that. Each fetch uses its own
connection and closes it: peer responses are large and few.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import h11
import trio

from spegeld.errors import SpegeldError
from spegeld.routing import Peer

RECEIVE_SIZE = 1024 * 1024  # body reads: fewer, larger reads make the proxy faster
HEAD_RECEIVE_SIZE = 64 * 1024  # response-head reads: no large buffer for a few hundred bytes
MIRRORED_HEADER = b"x-spegeld-mirrored"


class PeerFailed(SpegeldError):
    """A peer could not be reached, broke the protocol, or stopped mid-body."""


@dataclass(slots=True)
class PeerResponse:
    peer: Peer
    status: int
    headers: dict[bytes, bytes]
    length: int
    _stream: trio.SocketStream
    _leftover: bytes

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    async def body(self) -> AsyncIterator[bytes]:
        """The body bytes as they arrive; PeerFailed if the peer stops short."""
        remaining = self.length
        if self._leftover:
            chunk, self._leftover = self._leftover[:remaining], b""
            remaining -= len(chunk)
            yield chunk
        while remaining > 0:
            try:
                chunk = await self._stream.receive_some(min(RECEIVE_SIZE, remaining))
            except (trio.BrokenResourceError, OSError) as exc:
                raise PeerFailed(f"{self.peer.registry} broke off: {exc}") from exc
            if not chunk:
                raise PeerFailed(f"{self.peer.registry} closed with {remaining} bytes unsent")
            remaining -= len(chunk)
            yield chunk

    async def read_all(self, limit: int) -> bytes:
        if self.length > limit:
            raise PeerFailed(f"{self.peer.registry} sent {self.length} bytes, over {limit}")
        return b"".join([chunk async for chunk in self.body()])

    async def aclose(self) -> None:
        with trio.move_on_after(1, shield=True):
            await self._stream.aclose()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def fetch(
    peer: Peer,
    method: bytes,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    connect_timeout: float,
    response_timeout: float,
) -> PeerResponse:
    """Send one request to ``peer`` and return once its response head has arrived."""
    host, port = _split(peer.registry)
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise PeerFailed(f"cannot connect to {peer.registry}: {exc}") from exc
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        request = h11.Request(
            method=method,
            target=target,
            headers=[
                (b"host", peer.registry.encode()),
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
                raise PeerFailed(f"{peer.registry} closed before answering")
        response_headers = {bytes(k): bytes(v) for k, v in event.headers}
        length_text = response_headers.get(b"content-length", b"0" if method == b"HEAD" else b"")
        if not length_text.isdigit():
            raise PeerFailed(f"{peer.registry} answered without a Content-Length")
        length = 0 if method == b"HEAD" else int(length_text)
        leftover, _ = conn.trailing_data
        return PeerResponse(
            peer, event.status_code, response_headers, length, stream, bytes(leftover)
        )
    except BaseException as exc:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
        if isinstance(
            exc, (OSError, trio.BrokenResourceError, h11.ProtocolError, trio.TooSlowError)
        ):
            raise PeerFailed(f"{peer.registry}: {exc}") from exc
        raise
