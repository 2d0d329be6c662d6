"""One large blob from several complete holders at once: the I/O shell of ``_stripes``.

Each source fetches its stripes with signed Range GETs (through the proxy's ``_open``,
so on the peer pool's connections), one stripe at a time; the client gets the bytes in
order, hashed as they go, the last byte held back until the whole blob matches its
digest. A source that fails (refused, reset, silent past the body deadline, a wrong
Content-Range) is dropped and the rest of its stripe goes to another; an idle source
takes the back half of a slow one's stripe (``StripePlan``). Memory: at most
``WINDOW + CHUNK`` bytes buffered per blob, whatever the client's or the peers' pace.

Why the source tasks run in a system task: the response body is an async generator that
the HTTP server drives under its own per-chunk deadlines, so it cannot hold a nursery
open across its yields (the cancel scopes would not nest). The swarm's tasks live in one
system task instead, inside a cancel scope that the body cancels however it ends
(``aclose``, also called when the response is dropped before its first chunk). Nothing
escapes it: every error ends in the body's AbortResponse, never in the trio run.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import trio

from spegeld.oci import Digest
from spegeld.routing import Peer

from ._hashing import stream_hasher
from ._http import AbortResponse, StreamBody
from ._metrics import MirrorMetrics
from ._peer import PeerFailed, PeerResponse
from ._ranges import content_range_start
from ._stripes import Stripe, StripePlan
from ._unproven import UnprovenBytes

logger = logging.getLogger(__name__)

# Blobs smaller than this come from one holder. Below it a second source saves little:
# 24 MiB takes 0.2 s at 1 Gbit/s, against which a swarm's extra requests, connections
# and the head-of-line stripe weigh; a typical layer (a few MiB) keeps the single-source
# path and its per-layer cost. Large layers (CUDA, models, JDKs) are what a swarm is for.
MIN_SIZE = 24 * 1024 * 1024
MAX_SOURCES = 4  # holders asked at once: 4 uplinks already exceed most nodes' downlink
# Bytes per Range request: 2 MiB is 17 ms at 1 Gbit/s, so a request's fixed cost (a
# signature, a head, well under 1 ms on a local network) stays a few percent of it.
CHUNK = 2 * 1024 * 1024
# Stripes in flight per peer, each on its own connection: the next request is on its way
# while a stripe lands, so a busy peer's or client's scheduling delay between stripes
# does not idle the peer's uplink.
LANES = 2
# Bytes past what the client has been sent that may be fetched: two stripes per lane,
# so a lane that finishes early starts its next stripe while the earliest one lands.
# The memory bound per blob is WINDOW + CHUNK, for any client and peer pace.
WINDOW = 2 * LANES * MAX_SOURCES * CHUNK
# A stripe is split for an idle source only while twice this is left of it: smaller
# pieces cost a request and a connection (the victim's is closed) for little gain.
MIN_SPLIT = 512 * 1024
# Seconds a source may hold a stripe before an idle one may split it, at least; and how
# many times the typical time per byte (of the stripes done so far) it may take. A 2 MiB
# stripe takes 17 ms at 1 Gbit/s and 0.17 s at 100 Mbit/s: a stripe 3 times slower than
# the others, or a quarter second late, is from a slow or stopped peer. Splitting sooner
# cost more than it saved: with splits allowed at once, 4 sources at 1 Gbit/s reached
# 1.28x one source instead of 3.21x (bench/multi_peer.py, 256 MiB), each split closing
# the victim's connection with its peer's queued bytes wasted.
PATIENCE = 0.25
SLOW_FACTOR = 3.0
HELD_BACK = 1  # the last byte waits for the digest, as on the single-source path

# Called as ``open_range(peer, range_header=b"bytes=A-B")``: the proxy's signed GET.
Lane = tuple[Peer, int]  # one of a peer's LANES connections: a source of the plan
Opener = Callable[..., Awaitable[PeerResponse | None]]
CaughtLying = Callable[[Sequence[Peer]], Awaitable[None]]


def swarm_sources(first: PeerResponse, complete: Sequence[Peer]) -> list[Peer]:
    """The holders to fetch ranges from beside ``first``'s peer: none for a small blob, or
    when that peer is not a complete holder (an in-flight one stays one source, §8)."""
    if first.length < MIN_SIZE or first.peer not in complete:
        return []
    return [p for p in complete if p != first.peer][: MAX_SOURCES - 1]


class Swarm:
    """The body of one blob fetched from ``first``'s peer and ``others`` at once."""

    def __init__(
        self,
        first: PeerResponse,
        others: Sequence[Peer],
        open_range: Opener,
        digest: Digest,
        metrics: MirrorMetrics,
        unproven: UnprovenBytes,
        caught_lying: CaughtLying,
    ) -> None:
        self._digest = digest
        self._size = first.length
        self._open = open_range
        self._metrics = metrics
        self._unproven = unproven
        self._caught_lying = caught_lying
        sources = [first.peer, *others]
        self._lanes = [(peer, lane) for peer in sources for lane in range(LANES)]
        self._plan = StripePlan(
            self._size, self._lanes, chunk=CHUNK, window=WINDOW, min_split=MIN_SPLIT,
            patience=PATIENCE, slow_factor=SLOW_FACTOR,
        )  # fmt: skip
        # The first holder's response (the whole blob, from byte 0) serves the first stripe.
        initial = self._plan.take((first.peer, 0), trio.current_time())
        assert initial is not None and initial.start == 0
        self._first = (first, initial)
        self._buffers: dict[Stripe[Lane], deque[bytes]] = {}
        self._served: dict[Peer, int] = dict.fromkeys(sources, 0)
        # Woken only when it matters, as a wake-up of every task per piece cost more than
        # the fetch itself on fast links: the body (_chunks) when bytes land at the point
        # it sends from; idle lanes when a stripe ends or is delivered, or a peer fails.
        self._data = trio.lowlevel.ParkingLot()
        self._work = trio.lowlevel.ParkingLot()
        self._offset = 0  # bytes the body has sent on
        self._scope = trio.CancelScope()
        self._running = False
        self._ended = False  # the source tasks are over (done, failed, or cancelled)

    def body(self) -> StreamBody:
        return StreamBody(self._chunks(), self._size, self.aclose)

    async def aclose(self) -> None:
        self._scope.cancel()
        if not self._running:
            with trio.move_on_after(1, shield=True):
                await self._first[0].aclose()

    async def _run(self) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    for lane in self._lanes:
                        first = self._first if lane == (self._first[0].peer, 0) else None
                        nursery.start_soon(self._source, lane, first)
        except Exception:  # a bug here must cut one response, never end the daemon
            logger.exception("fetching %s from several peers failed", self._digest)
        finally:
            self._ended = True
            self._wake()

    def _wake(self) -> None:
        self._data.unpark_all()
        self._work.unpark_all()

    async def _source(self, lane: Lane, first: tuple[PeerResponse, Stripe[Lane]] | None) -> None:
        peer = lane[0]
        response, stripe = first if first is not None else (None, None)
        try:
            while True:
                if stripe is None:
                    stripe = self._plan.take(lane, trio.current_time())
                if stripe is None:
                    if self._plan.complete or lane not in self._plan.sources:
                        return
                    # Re-checked at least this often: a stripe held too long is split.
                    with trio.move_on_after(PATIENCE / 2):
                        await self._work.park()
                    continue
                if response is None:
                    response = await self._request(peer, stripe)
                await self._read(lane, stripe, response)
                await response.aclose()  # back to the pool when the range ended exactly
                response, stripe = None, None
        except PeerFailed as exc:
            self._metrics.proxy_errors.labels(reason="broken").inc()
            logger.info("%s: its ranges of %s move to the other holders: %s",
                        peer.mirror, self._digest, exc)  # fmt: skip
            for other in self._lanes:  # the peer's other lanes stop at their next piece
                if other[0] == peer:
                    self._plan.failed(other)
            self._wake()
        finally:
            if response is not None:
                await response.aclose()

    async def _request(self, peer: Peer, stripe: Stripe[Lane]) -> PeerResponse:
        start, end = stripe.next_byte, stripe.end
        response = await self._open(peer, range_header=f"bytes={start}-{end - 1}".encode())
        if response is None:
            raise PeerFailed(f"no answer to a range of {self._digest}")
        right = (
            response.status == 206
            and content_range_start(response.header(b"content-range")) == start
            and response.length == end - start
        )
        if not right:
            self._metrics.proxy_errors.labels(reason="bad_range").inc()
            await response.aclose()
            raise PeerFailed(f"answered bytes={start}-{end - 1} with {response.status}, "
                             f"{response.header(b'content-range')!r}")  # fmt: skip
        return response

    async def _read(self, lane: Lane, stripe: Stripe[Lane], response: PeerResponse) -> None:
        """Receive ``stripe`` (whose end may move down meanwhile) from ``response``."""
        buffer = self._buffers.setdefault(stripe, deque())
        body = response.body()
        async with contextlib.aclosing(body):  # type: ignore[type-var]
            async for chunk in body:
                if stripe.owner != lane:
                    return  # the peer failed on another lane: this stripe is another's now
                peer = lane[0]
                piece = chunk[: stripe.remaining]
                if piece:
                    if not self._served[peer]:
                        self._unproven.sent(peer, self._digest, trio.current_time())
                    self._served[peer] += len(piece)
                    buffer.append(piece)
                    self._plan.received(stripe, len(piece), trio.current_time())
                    if stripe.start <= self._offset:
                        self._data.unpark_all()
                if stripe.remaining == 0:
                    self._work.unpark_all()
                    return
        if stripe.remaining and stripe.owner == lane:  # the response ended short
            raise PeerFailed(f"a range of {self._digest} ended {stripe.remaining} bytes short")

    async def _chunks(self) -> AsyncIterator[bytes]:
        hasher = stream_hasher(self._size)
        offset = 0
        held = b""
        try:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name=f"spegeld-swarm {self._digest}")
            while offset < self._size:
                stripe = self._plan.stripe_at(offset)
                buffer = self._buffers.get(stripe) if stripe is not None else None
                if not buffer:
                    if self._plan.failed_all or self._ended:
                        raise AbortResponse(f"no holder could send the rest of {self._digest}")
                    await self._data.park()
                    continue
                assert stripe is not None
                piece = buffer.popleft()
                await hasher.update(piece)
                offset += len(piece)
                self._offset = offset
                self._plan.delivered(offset)
                if offset >= stripe.end and not buffer:
                    del self._buffers[stripe]
                    self._work.unpark_all()  # the window moved on by a stripe
                if offset == self._size:
                    piece, held = piece[:-HELD_BACK], piece[-HELD_BACK:]
                if piece:
                    self._metrics.bytes_served.labels(source="peer").inc(len(piece))
                    yield piece
            served = [peer for peer, count in self._served.items() if count]
            if "sha256:" + await hasher.hexdigest() != self._digest:
                await self._caught_lying(served)
                raise AbortResponse(f"bytes for {self._digest} from {len(served)} peers "
                                    "do not match it")  # fmt: skip
            self._unproven.proven(self._digest)
            shares = ", ".join(f"{p.node} {n}" for p, n in self._served.items())
            logger.info("%s (%d bytes, %d splits) came from %d peers: %s", self._digest,
                        self._size, self._plan.splits, len(served), shares)  # fmt: skip
            self._metrics.bytes_served.labels(source="peer").inc(len(held))
            yield held
        finally:
            hasher.close()
            self._scope.cancel()
