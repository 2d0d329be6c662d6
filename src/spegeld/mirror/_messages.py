"""What the HTTP server speaks: requests, responses and their bodies, and its limits.

Plain data, shared by the server (``_http``) and the handlers that build responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Kinds of ``on_error``: a bounded set, so a metric label may take them.
ERROR_KINDS = (
    "handler",
    "body",
    "internal",
    "head_timeout",
    "write_timeout",
    "handler_timeout",
    "body_timeout",
    "refused",
    "accept",
)


@dataclass(frozen=True, slots=True)
class Limits:
    # Connections from all non-loopback sources together (peers and pods). Each costs a
    # file descriptor, and a proxied one a second: 1024 + 256 below stay well inside
    # LimitNOFILE=65536 with room for containerd, gossip and peer sockets.
    max_connections: int = 1024
    # Per non-loopback address. A peer proxies for its containerd: a few layers at once
    # (containerd's max_concurrent_downloads is 3), times parallel pulls, plus hedges;
    # 64 is far above that and still leaves 15 other sources room in max_connections.
    per_source_connections: int = 64
    # Reserved for loopback: containerd on this node (and kubelet's probes, `spegeld
    # status`). Never shared with other sources, so a flood from a pod cannot lock
    # containerd out; 256 is far above what containerd opens (3 per pull, a few pulls).
    loopback_connections: int = 256
    max_header_bytes: int = 16 * 1024
    # Keep-alive: seconds a connection may wait for the first byte of a request. Go's
    # http.Transport (containerd) reuses idle connections for up to 90 s and redials
    # transparently when we close first; 30 s keeps idle slots short-lived.
    idle_timeout: float = 30.0
    # Seconds a whole request head may take from its first byte (slowloris): a head is
    # under 16 KiB, so even a lossy link with three TCP retransmissions (1 + 2 + 4 s)
    # delivers it well inside 10 s; a client dripping bytes is cut then.
    head_timeout: float = 10.0
    # Seconds a response may wait with the client accepting no byte at all. A slow WAN
    # link still drains a socket buffer in well under a second; a receiver that accepts
    # nothing for 30 s is dead or hostile, and holds a slot and a body stream.
    write_timeout: float = 30.0
    # Backstops, never reached while the components keep their own deadlines (the proxy's
    # first byte 3 s and body idle 2 s, containerd calls and streams 30 s): the seconds
    # a handler may take to answer (then 503), and a body stream between two chunks
    # (then the response is cut). A component that lost its deadline cannot hang us.
    handler_timeout: float = 60.0
    body_timeout: float = 60.0
    grace_period: float = 10.0  # seconds in-flight responses get at shutdown


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    target: bytes
    headers: dict[bytes, bytes]
    listener: str = ""  # the name of the listener the connection came in on

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


class AbortResponse(Exception):
    """Raised by a body stream to cut the response: the connection closes unfinished."""
