"""The mirror proxy: fetch what this node lacks from peers that hold it.

Only addresses the router names are ever contacted, never one from the
request. Blob bytes are hashed as they stream; when a peer breaks off, the
rest comes from the next holder with a Range request from the byte already
received, so the client sees one intact response. The last byte is held back
until the digest checks out: on a mismatch the response is cut and the peer
is marked bad. A large blob is hashed in a worker thread (``_hashing``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import trio

from spegeld.oci import Digest
from spegeld.routing import NodeId, Peer, Router

from ._auth import HEADER as AUTH_HEADER
from ._errors import OciError
from ._hashing import stream_hasher
from ._hedge import LatencyTracker, first_success
from ._http import AbortResponse, BytesBody, Request, Response, StreamBody
from ._metrics import MirrorMetrics
from ._peer import BadPeerAddress, PeerFailed, PeerPool, PeerResponse, fetch
from ._quorum import agreed
from ._ranges import (
    ByteRange,
    answers_range,
    content_range_start,
    open_ended_start,
    unsatisfiable,
)
from ._swarm import MAX_SOURCES, Swarm, swarm_sources
from ._unproven import DiscardPartial, UnprovenBytes

logger = logging.getLogger(__name__)

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
FORWARDED_HEADERS = (b"accept", b"user-agent")
# A client's header longer than this is not forwarded: containerd's Accept for manifests is
# about 500 bytes, and a peer's head limit (16 KiB) must not turn a long one into a 431.
MAX_FORWARDED_HEADER = 2048
# Peers remembered as bad or unreachable; past this, expired entries are dropped. Peers
# come from the router, so this only matters in a cluster whose members churn for weeks.
MAX_REMEMBERED_PEERS = 1024
# Bytes of a verified blob held back until its digest checks out. One is enough: without
# it the client cannot complete the blob, so wrong bytes are never a finished download.
HELD_BACK = 1


@dataclass(frozen=True, slots=True)
class ProxySettings:
    holders_to_try: int = 3
    # Seconds. Peers are on the local network, where a connect takes well under a
    # millisecond; a partitioned peer must cost a pull little before the upstream.
    connect_timeout: float = 0.5
    # Seconds from connecting to a peer until its response head is in. A healthy peer
    # answers from its own index and store in milliseconds; one that accepted the connection
    # and hangs (SIGSTOP, a wedged process) must not hold the pull: containerd does not bound
    # a mirror that accepts and hangs (containerd #10624). Hedging already asks the next
    # holder after at most 1 s, so this only ends attempts that nobody is waiting on.
    response_timeout: float = 2.0
    # Seconds, in all, before the first byte goes to the client: across every holder tried,
    # hedges included. Past it the client gets the 404 that sends containerd upstream. The
    # same bound applies to finding a holder that resumes a broken body. 3 s: the hedge
    # (<= 1 s) plus one holder's response_timeout, with room for a busy node.
    first_byte_timeout: float = 3.0
    # Seconds of waiting on a peer's body for 64 KiB (MIN_PROGRESS) to arrive. A sendfile
    # peer on a local network sends that in well under a millisecond; a TCP segment lost
    # three times over is retransmitted within 1.4 s (RTO 0.2 s doubling). Past it the body
    # is resumed from another holder, or cut: a stall costs the client at most
    # body_idle_timeout + first_byte_timeout = 5 s.
    body_idle_timeout: float = 2.0
    bad_peer_ttl: float = 300.0  # seconds a peer that sent corrupt bytes is avoided
    # Seconds a peer that did not answer is skipped: the rest of the pull's requests
    # then go to other holders, or 404 at once, instead of each waiting out a connect.
    unreachable_ttl: float = 5.0
    # Holders on distinct hosts that must name one digest before a tag is answered from
    # peers (_quorum). 1 trusts any one holder; the daemon passes --tag-quorum (default 2).
    tag_quorum: int = 1


# (method, target) → the node authentication header's value, or None to send none.
Signer = Callable[[bytes, bytes], bytes | None]


class Proxy:
    def __init__(
        self,
        router: Router,
        metrics: MirrorMetrics,
        settings: ProxySettings,
        discard_partial: DiscardPartial | None = None,
        sign: Signer | None = None,
    ) -> None:
        # Called with a digest whose proxied bytes did not match it, before the response is
        # cut: the client (containerd on this node) holds them in a partial write it would
        # resume from, and never re-check, on every later pull of that blob.
        self._discard_partial = discard_partial
        self._sign = sign
        self._unproven = UnprovenBytes(settings.bad_peer_ttl)
        self._router = router
        self._metrics = metrics
        self._settings = settings
        self._latency = LatencyTracker()
        self._pool = PeerPool()  # idle connections to peers, reused by the next request
        self._bad: dict[Peer, float] = {}
        self._unreachable: dict[Peer, float] = {}

    def mark_bad(self, peer: Peer) -> None:
        logger.warning(
            "peer %s (%s) sent bytes that do not match their digest", peer.node, peer.mirror
        )
        self._metrics.bad_peers.inc()
        _remember(self._bad, peer, trio.current_time() + self._settings.bad_peer_ttl)

    async def _caught_lying(self, peers: Sequence[Peer]) -> None:
        """Mark ``peers`` bad, and discard the client's partial writes of every blob they
        sent unchecked bytes of (any of them may hold the lie) before a response is cut."""
        for peer in peers:
            self.mark_bad(peer)
        await self._unproven.discard(peers, trio.current_time(), self._discard_partial)

    def holders(self, key: str, *, tag: bool = False) -> list[Peer]:
        start = trio.current_time()
        want = max(self._settings.holders_to_try, self._settings.tag_quorum if tag else 0)
        found = self._router.lookup(key, want * 2)
        self._metrics.resolve_duration.labels(router="local").observe(trio.current_time() - start)
        return self._usable(found)[: want if tag else self._settings.holders_to_try]

    def unusable(self, peers: Sequence[Peer]) -> set[NodeId]:
        """The nodes of ``peers`` this proxy would not ask now (unreachable, or bad)."""
        return {p.node for p in peers} - {p.node for p in self._usable(peers)}

    def _usable(self, found: Sequence[Peer]) -> list[Peer]:
        # A peer that sent corrupt bytes is not asked at all while it is marked: bytes it
        # sent reached containerd before the digest could be checked, so containerd's
        # retry must meet another holder, or a 404 that sends it to the upstream.
        now = trio.current_time()
        return [p for p in found if max(self._unreachable.get(p, 0), self._bad.get(p, 0)) <= now]

    async def tag(
        self, holders: Sequence[Peer], request: Request, target: bytes
    ) -> Response | None:
        """A manifest by tag: from one holder, or only when ``tag_quorum`` hosts agree."""
        if self._settings.tag_quorum <= 1:
            return await self.manifest(holders, request, target, None)
        won = await agreed(
            holders,
            lambda peer: self._manifest_from(peer, request, target, None),
            self._settings.tag_quorum,
            within=self._settings.first_byte_timeout,
            disagreed=self._metrics.proxy_errors.labels(reason="tag_disagreement").inc,
        )
        return None if won is None else self._manifest_response(*won)

    async def _manifest_from(
        self, peer: Peer, request: Request, target: bytes, digest: Digest | None
    ) -> tuple[PeerResponse, bytes] | None:
        # Always GET, even for a HEAD: a manifest is small, and only its bytes
        # prove the digest the peer claims.
        response = await self._open(peer, request, target, None, method=b"GET")
        if response is None:
            return None
        try:
            body = await response.read_all(MAX_MANIFEST_SIZE)
        except PeerFailed as exc:
            self._metrics.proxy_errors.labels(reason="broken").inc()
            logger.info("manifest from %s failed: %s", peer.mirror, exc)
            return None
        finally:
            await response.aclose()
        claimed = (response.header(b"docker-content-digest") or b"").decode("latin-1")
        if "sha256:" + hashlib.sha256(body).hexdigest() != (digest or claimed):
            await self._caught_lying([peer])
            return None
        return response, body

    async def manifest(
        self, holders: Sequence[Peer], request: Request, target: bytes, digest: Digest | None
    ) -> Response | None:
        """A manifest from the first holder whose bytes hash to the digest they claim."""
        won = await first_success(
            holders,
            lambda peer: self._manifest_from(peer, request, target, digest),
            _release_pair,
            self._latency.hedge_delay(),
            within=self._settings.first_byte_timeout,
            on_timeout=self._first_byte_timed_out,
        )
        return None if won is None else self._manifest_response(*won)

    def _manifest_response(self, response: PeerResponse, body: bytes) -> Response:
        self._metrics.bytes_served.labels(source="peer").inc(len(body))
        content_type = response.header(b"content-type") or b"application/octet-stream"
        digest_text = ("sha256:" + hashlib.sha256(body).hexdigest()).encode()
        headers = [(b"content-type", content_type), (b"docker-content-digest", digest_text)]
        return Response(200, headers, BytesBody(body))

    async def blob(
        self,
        holders: Sequence[Peer],
        request: Request,
        target: bytes,
        digest: Digest,
        wanted: ByteRange | None,
        range_header: bytes | None,
    ) -> Response | None:
        # containerd resumes a download with ``Range: bytes=N-``. Bytes a peer sends for such
        # a range cannot be checked against the digest alone, and wrong ones would stick in
        # containerd's partial write: fetch the whole blob, hash the first N bytes without
        # sending them, and check the rest as for a whole blob. The extra N bytes cross the
        # local network once, for a request that only a broken download makes.
        skip = open_ended_start(range_header) if request.method == b"GET" else None
        if skip == 0:  # containerd 2.x's chunked fetch opens with bytes=0-: a 200 (a server
            skip = range_header = None  # may ignore Range) makes it read one stream
        peer_range = None if skip is not None else range_header

        async def attempt(peer: Peer) -> PeerResponse | None:
            response = await self._open(peer, request, target, peer_range)
            if response is None or response.status != 206 or peer_range is None:
                return response
            if answers_range(
                response.header(b"content-range"),
                response.length,
                peer_range,
                check_length=request.method != b"HEAD",
            ):
                return response
            self._metrics.proxy_errors.labels(reason="bad_range").inc()
            logger.info("peer %s answered %r with Content-Range %r", peer.mirror,
                        peer_range[:100], response.header(b"content-range"))  # fmt: skip
            await response.aclose()
            return None

        first = await first_success(
            holders,
            attempt,
            _release,
            self._latency.hedge_delay(),
            self._metrics.hedges.inc,
            within=self._settings.first_byte_timeout,
            on_timeout=self._first_byte_timed_out,
        )
        if first is None:
            return None
        if request.method == b"HEAD":
            await first.aclose()
            length = (first.header(b"content-length") or b"").decode("latin-1")
            if not length.isdigit():
                return None
            first.length = int(length)
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"docker-content-digest", digest.encode()),
            (b"accept-ranges", b"bytes"),
        ]
        status = first.status
        if skip is not None and status == 200:
            if skip >= first.length:
                await first.aclose()
                raise unsatisfiable(first.length)
            headers.append(
                (b"content-range", f"bytes {skip}-{first.length - 1}/{first.length}".encode())
            )
            others = [p for p in holders if p != first.peer]
            chunks = self._stream(
                first, others, request, target, 0, first.length, digest, verify=True, skip=skip
            )
            return Response(206, headers, StreamBody(chunks, first.length - skip, first.aclose))
        if status == 206:
            content_range = first.header(b"content-range")
            if content_range is None:
                await first.aclose()
                raise OciError(502, "UNKNOWN", "peer answered a range without Content-Range")
            headers.append((b"content-range", content_range))
        offset = content_range_start(first.header(b"content-range")) if status == 206 else 0
        if request.method == b"HEAD":
            return Response(status, headers, StreamBody(_no_chunks(), first.length))
        complete = self._usable(self._router.lookup(digest, 2 * MAX_SOURCES))
        if status == 200 and (sources := swarm_sources(first, complete)):
            opener = functools.partial(self._open, request=request, target=target, method=b"GET")
            swarm = Swarm(first, sources, opener, digest, self._metrics, self._unproven,
                          self._caught_lying)  # fmt: skip
            return Response(200, headers, swarm.body())
        others = [p for p in holders if p != first.peer]
        chunks = self._stream(
            first, others, request, target, offset, first.length, digest, verify=status == 200
        )
        return Response(status, headers, StreamBody(chunks, first.length, first.aclose))

    async def _open(
        self,
        peer: Peer,
        request: Request,
        target: bytes,
        range_header: bytes | None,
        *,
        method: bytes | None = None,
    ) -> PeerResponse | None:
        headers = [
            (name, value)
            for name in FORWARDED_HEADERS
            if (value := request.header(name)) and len(value) <= MAX_FORWARDED_HEADER
        ]
        if range_header is not None:
            headers.append((b"range", range_header))
        method = method or request.method
        # Signed per attempt, as it is sent: each carries its own nonce and time.
        auth = self._sign(method, target) if self._sign is not None else None
        if auth is not None:
            headers.append((AUTH_HEADER, auth))
        start = trio.current_time()
        try:
            response = await fetch(
                peer,
                method,
                target,
                headers,
                connect_timeout=self._settings.connect_timeout,
                response_timeout=self._settings.response_timeout,
                idle_timeout=self._settings.body_idle_timeout,
                pool=self._pool,
            )
        except PeerFailed as exc:
            reason = "bad_address" if isinstance(exc, BadPeerAddress) else "unreachable"
            self._metrics.proxy_errors.labels(reason=reason).inc()
            until = trio.current_time() + self._settings.unreachable_ttl
            _remember(self._unreachable, peer, until)
            logger.info("peer %s: %s; skipped for %g s", peer.mirror, exc,
                        self._settings.unreachable_ttl)  # fmt: skip
            return None
        self._latency.observe(trio.current_time() - start)
        # A 206 is only an answer to a Range this side sent.
        if response.status == 200 or (response.status == 206 and range_header is not None):
            return response
        if response.status == 401:
            # The peer does not take our signature (another cluster key, a clock far off)
            # or it is an old node's mirror port: a failed peer, skipped like one.
            self._metrics.proxy_errors.labels(reason="unauthorized").inc()
            until = trio.current_time() + self._settings.unreachable_ttl
            _remember(self._unreachable, peer, until)
            logger.warning("peer %s (%s) refused our node authentication (401); skipped for %g s",
                           peer.node, peer.mirror, self._settings.unreachable_ttl)  # fmt: skip
        elif response.status != 404:
            self._metrics.proxy_errors.labels(reason=_status_reason(response.status)).inc()
        await response.aclose()
        return None

    async def _stream(
        self,
        current: PeerResponse,
        others: list[Peer],
        request: Request,
        target: bytes,
        offset: int,
        length: int,
        digest: Digest,
        *,
        verify: bool,
        skip: int = 0,
    ) -> AsyncIterator[bytes]:
        """The peer's bytes from ``offset``, hashed when ``verify``, the first ``skip`` bytes
        hashed but not sent, the last HELD_BACK bytes held back until the digest checks out.

        Every other byte goes to the client as it arrives: holding back a whole chunk
        (up to RECEIVE_SIZE) delayed the client by a chunk's transfer, and the hash of the
        last chunk, on every blob."""
        hasher = stream_hasher(length) if verify else None
        received = 0
        held: bytes | None = None
        served_by = [current.peer]
        self._unproven.sent(current.peer, digest, trio.current_time())
        try:
            while True:
                try:
                    async for chunk in current.body():
                        if hasher is not None:
                            await hasher.update(chunk)
                        before = received
                        received += len(chunk)
                        if received <= skip:
                            continue
                        piece = chunk[skip - before :] if before < skip else chunk
                        if received == length:  # the end: its last bytes wait for the digest
                            piece, held = piece[:-HELD_BACK], piece[-HELD_BACK:]
                        if piece:
                            self._metrics.bytes_served.labels(source="peer").inc(len(piece))
                            yield piece
                    break
                except PeerFailed as exc:
                    self._metrics.proxy_errors.labels(reason="broken").inc()
                    logger.info("resuming after %d bytes: %s", received, exc)
                    await current.aclose()
                    resumed = None
                    with trio.move_on_after(self._settings.first_byte_timeout):
                        resumed = await self._resume(
                            others, request, target, offset + received, length - received
                        )
                    if resumed is None:
                        raise AbortResponse("no holder could resume the blob") from exc
                    current = resumed
                    served_by.append(current.peer)
                    self._unproven.sent(current.peer, digest, trio.current_time())
                    others = [p for p in others if p != current.peer]
            if hasher is not None:
                if "sha256:" + await hasher.hexdigest() != digest:
                    await self._caught_lying(served_by)
                    raise AbortResponse(f"bytes for {digest} do not match it")
                self._unproven.proven(digest)
            if held is not None:
                self._metrics.bytes_served.labels(source="peer").inc(len(held))
                yield held
        finally:
            if hasher is not None:
                hasher.close()
            await current.aclose()

    async def _resume(
        self, holders: list[Peer], request: Request, target: bytes, start: int, remaining: int
    ) -> PeerResponse | None:
        header = f"bytes={start}-{start + remaining - 1}".encode()
        for peer in holders:
            response = await self._open(peer, request, target, header, method=b"GET")
            if response is None:
                continue
            if (
                response.status == 206
                and content_range_start(response.header(b"content-range")) == start
                and response.length == remaining
            ):
                return response
            await response.aclose()
        return None

    def _first_byte_timed_out(self) -> None:
        self._metrics.proxy_errors.labels(reason="first_byte_timeout").inc()
        logger.info(
            "no holder answered within %g s; the client is told 404",
            self._settings.first_byte_timeout,
        )


def _remember(peers: dict[Peer, float], peer: Peer, until: float) -> None:
    """Record ``peer`` until ``until``, dropping expired entries when the dict is large."""
    if len(peers) >= MAX_REMEMBERED_PEERS:
        now = trio.current_time()
        for expired in [p for p, t in peers.items() if t <= now]:
            del peers[expired]
        if len(peers) >= MAX_REMEMBERED_PEERS:  # all live: forget the soonest to expire
            del peers[min(peers, key=peers.__getitem__)]
    peers[peer] = until


def _status_reason(status: int) -> str:
    """A bounded label for a peer's unexpected status: ``status_4xx``, ``status_5xx``, ..."""
    return f"status_{status // 100}xx" if 100 <= status < 600 else "status_other"


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield


async def _release(response: PeerResponse) -> None:
    await response.aclose()


async def _release_pair(pair: tuple[PeerResponse, bytes]) -> None:
    await pair[0].aclose()
