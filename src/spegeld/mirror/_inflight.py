"""Serving a blob to peers while containerd is still downloading it (docs/protocol.md,
"In-flight content").

The bytes come from the ingest's ``data`` file as it grows; every byte is hashed from
the start of the blob, and the last chunk is held back until the whole digest checks out,
so a wrong download is a cut response, never a complete-looking wrong one. When the
``data`` file leaves the ingest area the download ended: the rest comes from the
committed blob file at the same offset, or, if there is none (aborted), the response is
cut. A download that stops growing for ``INFLIGHT_STALL`` seconds is cut too.

Only peers are served this way (never containerd on this node: its own request is what
feeds the ingest), and never an ingest that is itself fed from another node's in-flight
data (``InflightFeeds``): two nodes following each other's empty downloads would both
wait out their stall bounds instead of going to the upstream at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import replace

import trio

from spegeld.oci import Digest
from spegeld.routing import Peer, Router
from spegeld.store import Ingest, inflight_key

from ._designate import (
    CLAIM_BACKING,
    MAX_COPULLERS,
    PULL_IDLE,
    Pulls,
    Verdict,
    decide,
    fetching_key,
    followable,
)
from ._hashing import stream_hasher
from ._http import AbortResponse, Request, Response, StreamBody
from ._proxy import Proxy
from ._ranges import parse_range

CHUNK_SIZE = 1024 * 1024  # bytes per read of the growing file
# Seconds between looks at a file that has no new bytes yet. containerd appends as the
# network delivers (32 KiB copies), so a follower is at most this far behind the download.
GROWTH_POLL = 0.02
# Seconds without a new byte before the response is cut. The requesting proxy gives up
# sooner (body_idle_timeout, 2 s) and resumes elsewhere or cuts; this bound only frees
# this side of a download that stopped (a stalled upstream, a wedged containerd).
INFLIGHT_STALL = 5.0
# Seconds a feed mark outlives a response nobody closed: never in practice (every body is
# closed by the server); a bound so no mark can stay for the life of the daemon.
FEED_MARK_TTL = 600.0
# Seconds between looks for a holder while a miss waits for the designated node: a
# lookup is a local read, and this is small beside a gossip round (0.2 s).
HOLDER_POLL = 0.05
# Looks for a holder one miss makes at most: the wait's deadline (2.5 s) ends it after
# about 50 at HOLDER_POLL; a bound on the loop whatever the clock does.
MAX_POLLS = 200
# Seconds between sweeps that withdraw the keys of pulls gone idle.
EXPIRE_EVERY = 5.0
# Seconds between looks at this node's claims for a download that backs them: a second
# beside CLAIM_BACKING's 3; a look is a dictionary read per claim.
CLAIM_CHECK_EVERY = 1.0

logger = logging.getLogger(__name__)


class InflightFeeds:
    """Digests this node's mirror is proxying from another node's in-flight data now."""

    def __init__(self) -> None:
        self._feeds: dict[Digest, list[float]] = {}

    def start(self, digest: Digest) -> Callable[[], None]:
        """Mark ``digest``; returns the function that removes this one mark."""
        mark = trio.current_time() + FEED_MARK_TTL
        self._feeds.setdefault(digest, []).append(mark)

        def done() -> None:
            marks = self._feeds.get(digest, [])
            with suppress(ValueError):
                marks.remove(mark)
            if not marks:
                self._feeds.pop(digest, None)

        return done

    def fed(self, digest: Digest) -> bool:
        now = trio.current_time()
        marks = [m for m in self._feeds.get(digest, []) if m > now]
        if marks:
            self._feeds[digest] = marks
        else:
            self._feeds.pop(digest, None)
        return bool(marks)


def blob_holders(proxy: Proxy, digest: Digest) -> tuple[list[Peer], bool]:
    """A blob's holders: complete ones, or, only when there are none, nodes downloading
    it now (in flight); and whether they are the in-flight ones."""
    complete = proxy.holders(digest)
    if complete:
        return complete, False
    return proxy.holders(inflight_key(digest)), True


class Designation:
    """The I/O around ``_designate``: advertises this node's pulls and upstream fetches
    through the router (at once: their worth is in their timing), and holds a blob miss
    back while another node fetches it or is designated to."""

    def __init__(
        self,
        router: Router,
        me: Callable[[], str],
        holders_to_try: int,
        downloading: Callable[[Digest], bool],
    ) -> None:
        self._router = router
        self._me = me
        self._limit = holders_to_try  # how many holders Proxy.holders answers at most
        self._downloading = downloading  # this node's containerd writes the blob now
        self._pulls = Pulls()
        self._claims: dict[Digest, float] = {}  # this node's claims, and when made

    def manifest(self, repository: str, manifest_key: str) -> None:
        """containerd asked this node's mirror for a manifest of ``repository``."""
        key = self._pulls.manifest(repository, manifest_key, trio.current_time())
        if key is not None:
            self._router.advertise([key], urgent=True)

    def blob(self, repository: str) -> None:
        self._pulls.blob(repository, trio.current_time())

    async def holders(
        self, proxy: Proxy, digest: Digest, repository: str
    ) -> tuple[list[Peer], bool]:
        """``blob_holders``, except that while this node pulls with others it follows only
        the downloads ``_designate.followable`` allows, and waits (bounded,
        ``_designate.decide``) for one when another node fetches the blob or is designated
        to. Going to the upstream itself, it claims the blob's fetch."""
        missed_at = trio.current_time()
        for _ in range(MAX_POLLS):
            complete = proxy.holders(digest)
            if complete:
                return complete, False
            now = trio.current_time()
            if self._pulls.started(repository, now) is None:  # not a pull seen begin: §8
                return proxy.holders(inflight_key(digest)), True
            inflight, unusable = self._inflight(proxy, digest)
            me = self._me()
            pulling = [
                peer
                for key in self._pulls.keys(repository, now)
                for peer in self._router.lookup(key, MAX_COPULLERS)
            ]
            fetching = self._router.lookup(fetching_key(digest), MAX_COPULLERS)
            # A partitioned or lying node is not waited for, whatever it claims.
            unusable |= proxy.unusable(pulling + fetching)
            copullers = {peer.node for peer in pulling} - {me}
            fetchers = {peer.node for peer in fetching}
            allowed = followable(me, copullers, fetchers, [p.node for p in inflight])
            chosen = [p for p in inflight if p.node in allowed][: self._limit]
            if chosen:
                return chosen, True
            showing = [p.node for p in inflight] + sorted(unusable)
            decision = decide(
                me, digest, copullers, fetchers, showing, pulling=True, missed_at=missed_at,
                now=now, unusable=unusable,
            )  # fmt: skip
            if decision.verdict is Verdict.UPSTREAM:
                logger.debug(
                    "%s: to the upstream after %.3f s (co-pullers %s; fetching at %s; "
                    "in flight at %s)", digest, now - missed_at, sorted(copullers),
                    sorted(fetchers), sorted(p.node for p in inflight),
                )  # fmt: skip
                self._claim(repository, digest)
                return [], False
            await trio.sleep(max(0.0, min(HOLDER_POLL, decision.until - now)))
        self._claim(repository, digest)  # not reached: decide's deadline ends the wait first
        return [], False

    def _claim(self, repository: str, digest: Digest) -> None:
        now = trio.current_time()
        key = self._pulls.claim(repository, digest, now)
        self._claims[digest] = now
        if key is not None:
            self._router.advertise([key], urgent=True)

    def _unback(self, now: float) -> None:
        """Withdraw the claims that no download of this node backs ``CLAIM_BACKING`` after
        they were made: cancelled or failed (a finished one is held complete anyway)."""
        for digest, at in list(self._claims.items()):
            if now - at < CLAIM_BACKING or self._downloading(digest):
                continue
            del self._claims[digest]
            key = self._pulls.unclaim(digest)
            if key is not None:
                self._router.withdraw([key])

    def _inflight(self, proxy: Proxy, digest: Digest) -> tuple[list[Peer], set[str]]:
        """Every in-flight holder the proxy may use, best first, and those it may not.

        ``Proxy.holders`` answers only the first few usable ones: the node to follow may
        rank after co-pullers that are only waiting. When it answered fewer than its
        limit, the others the router names are unusable (unreachable, or marked bad)."""
        key = inflight_key(digest)
        named = self._router.lookup(key, MAX_COPULLERS)
        usable = proxy.holders(key)
        if len(usable) >= self._limit:
            return named, set()
        return [p for p in named if p in usable], {p.node for p in named if p not in usable}

    async def expire(self) -> None:
        """Withdraw the keys of pulls gone idle, and claims no download backs, for as
        long as it runs."""
        next_expiry = trio.current_time() + EXPIRE_EVERY
        while True:
            await trio.sleep(CLAIM_CHECK_EVERY)
            now = trio.current_time()
            self._unback(now)
            if now >= next_expiry:
                next_expiry = now + EXPIRE_EVERY
                for digest in [d for d, at in self._claims.items() if now - at > PULL_IDLE]:
                    del self._claims[digest]  # its pull has gone idle too
                gone = self._pulls.expire(now)
                if gone:
                    self._router.withdraw(gone)


async def inflight_response(
    ingest: Ingest, request: Request, on_bytes: Callable[[int], object]
) -> Response | None:
    """The blob from its download under way: 200, or 206 for a Range; None when the
    download is already gone (the caller answers 404)."""
    total = ingest.total
    wanted = parse_range(request.header(b"range"), total)
    start, end = (wanted.start, wanted.end) if wanted else (0, total - 1)
    headers = [
        (b"content-type", b"application/octet-stream"),
        (b"docker-content-digest", ingest.digest.encode()),
        (b"accept-ranges", b"bytes"),
    ]
    if wanted is not None:
        headers.append((b"content-range", wanted.content_range(total).encode()))
    status = 206 if wanted else 200
    length = end - start + 1
    try:
        fd = os.open(ingest.data, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        committed = _open_committed(ingest)
        if committed is None:
            return None
        fd = committed
    if request.method == b"HEAD":
        os.close(fd)
        return Response(status, headers, StreamBody(_no_chunks(), length))
    follower = _Follower(ingest, fd)
    chunks = follower.chunks(start, end, on_bytes)
    return Response(status, headers, StreamBody(chunks, length, follower.aclose))


class _Follower:
    def __init__(self, ingest: Ingest, fd: int) -> None:
        self._ingest = ingest
        self._fd = fd

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def chunks(
        self, start: int, end: int, on_bytes: Callable[[int], object]
    ) -> AsyncIterator[bytes]:
        """Bytes ``start`` to ``end`` (inclusive); every byte from 0 is hashed, and when
        the range reaches the blob's end the last chunk waits for the digest to match."""
        ingest = self._ingest
        verify = end == ingest.total - 1
        stop = ingest.total if verify else end + 1
        hasher = stream_hasher(ingest.total) if verify else None
        position = 0
        held: bytes | None = None
        idle_until = trio.current_time() + INFLIGHT_STALL
        try:
            while position < stop:
                want = min(CHUNK_SIZE, stop - position)
                chunk = await trio.to_thread.run_sync(os.pread, self._fd, want, position)
                if not chunk:
                    await self._wait_for_growth(idle_until)
                    continue
                idle_until = trio.current_time() + INFLIGHT_STALL
                if hasher is not None:
                    await hasher.update(chunk)
                before, position = position, position + len(chunk)
                if position <= start:
                    continue
                part = chunk[max(0, start - before) :]
                if held is not None:
                    on_bytes(len(held))
                    yield held
                held = part
            if hasher is not None and "sha256:" + await hasher.hexdigest() != ingest.digest:
                raise AbortResponse(f"the download of {ingest.digest} does not match it")
            if held is not None:
                on_bytes(len(held))
                yield held
        finally:
            if hasher is not None:
                hasher.close()

    async def _wait_for_growth(self, idle_until: float) -> None:
        """Return when more bytes may be there (maybe in another file); AbortResponse
        when the download was aborted or stalled."""
        if not await trio.Path(self._ingest.data).exists():
            # Committed (renamed to the blob file, the same bytes) or aborted (deleted).
            committed = _open_committed(self._ingest)
            if committed is None:
                raise AbortResponse(f"the download of {self._ingest.digest} was aborted")
            await self.aclose()
            self._fd = committed
            return
        if trio.current_time() >= idle_until:
            raise AbortResponse(
                f"the download of {self._ingest.digest} stalled for {INFLIGHT_STALL:g} s"
            )
        await trio.sleep(GROWTH_POLL)


def _open_committed(ingest: Ingest) -> int | None:
    """A descriptor of the committed blob file; None when it is not there whole."""
    try:
        fd = os.open(ingest.blob, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    if os.fstat(fd).st_size != ingest.total:
        os.close(fd)
        return None
    return fd


async def _no_chunks() -> AsyncIterator[bytes]:
    return
    yield


async def tracked(
    feeds: InflightFeeds, digest: Digest, fetch: Awaitable[Response | None]
) -> Response | None:
    """Await ``fetch`` (a proxy from in-flight holders) with ``digest`` marked as fed
    from in-flight data, from before its first request until its response is closed."""
    done = feeds.start(digest)
    try:
        response = await fetch
    except BaseException:
        done()
        raise
    if response is None or not isinstance(response.body, StreamBody):
        done()
        return response
    body = response.body
    inner = body.on_close

    async def on_close() -> None:
        done()
        if inner is not None:
            await inner()

    return replace(response, body=replace(body, on_close=on_close))
