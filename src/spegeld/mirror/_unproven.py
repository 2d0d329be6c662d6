"""Which blobs a peer's bytes reached the client in before they could be checked.

The proxy checks a blob's digest only at its end and holds back just the last byte, so
the rest is already in the client's hands: for containerd on this node, in a partial
write it resumes from and never re-checks. When a peer is caught lying about one blob,
every other blob it was sending (in parallel, or cut off before its end) may be poisoned
too; this record names them, so their partial writes can be discarded.

The discard comes before any response of the caught peer is cut: containerd gives up a
whole pull at the first blob that fails, and the pull's other partial writes must be gone
by then, or the retry resumes one of them. Two responses of one liar are caught apart (in
parallel pulls, the first takes every digest), so the second waits for the first's
discard (``discard``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from spegeld.errors import SpegeldError
from spegeld.oci import Digest
from spegeld.routing import Peer

logger = logging.getLogger(__name__)

MAX_ENTRIES = 4096  # (peer, digest) pairs; a node proxies a few dozen blobs at once
# Seconds to discard containerd's partial writes of the blobs a caught peer sent; the
# client waits that long at most for its response to be cut (two local gRPC calls per
# blob, a few milliseconds each; seconds only on a machine under heavy load).
DISCARD_TIMEOUT = 5.0

DiscardPartial = Callable[[Digest], Awaitable[object]]


class UnprovenBytes:
    def __init__(self, ttl: float) -> None:
        self._ttl = ttl  # seconds a record lasts: the partial write has expired or finished
        self._sent: dict[tuple[Peer, Digest], float] = {}
        self._discarding: dict[Peer, trio.Event] = {}  # set when that peer's discard ends

    def sent(self, peer: Peer, digest: Digest, now: float) -> None:
        """Bytes of ``digest`` from ``peer`` went to the client, not yet checked."""
        if len(self._sent) >= MAX_ENTRIES:
            for key in [k for k, until in self._sent.items() if until <= now]:
                del self._sent[key]
            if len(self._sent) >= MAX_ENTRIES:  # all live: forget the oldest
                del self._sent[min(self._sent, key=self._sent.__getitem__)]
        self._sent[(peer, digest)] = now + self._ttl

    def proven(self, digest: Digest) -> None:
        """The whole of ``digest`` checked out: its partial write holds good bytes."""
        for key in [k for k in self._sent if k[1] == digest]:
            del self._sent[key]

    def take(self, peer: Peer, now: float) -> list[Digest]:
        """The unexpired digests ``peer`` sent unchecked bytes of; forgotten afterwards."""
        taken = [d for (p, d), until in self._sent.items() if p == peer and until > now]
        for key in [k for k in self._sent if k[0] == peer]:
            del self._sent[key]
        return taken

    async def discard(
        self, peers: Sequence[Peer], now: float, discard_partial: DiscardPartial | None
    ) -> None:
        """Discard the client's partial writes of every blob ``peers`` sent unchecked bytes
        of, and wait for a discard of one of them already under way; at most
        ``DISCARD_TIMEOUT`` in all. Returns when the caller may cut its response."""
        digests = {digest for peer in peers for digest in self.take(peer, now)}
        running = {self._discarding[peer] for peer in peers if peer in self._discarding}
        with trio.move_on_after(DISCARD_TIMEOUT) as deadline:
            if digests and discard_partial is not None:
                done = trio.Event()
                mine = [peer for peer in peers if peer not in self._discarding]
                self._discarding.update((peer, done) for peer in mine)
                try:
                    for digest in sorted(digests):
                        await _discard_one(digest, discard_partial)
                finally:
                    done.set()
                    for peer in mine:
                        del self._discarding[peer]
            for event in running:
                await event.wait()
        if deadline.cancelled_caught:
            logger.warning(
                "partial writes of %s not all discarded within %g s", sorted(digests),
                DISCARD_TIMEOUT,
            )  # fmt: skip


async def _discard_one(digest: Digest, discard_partial: DiscardPartial) -> None:
    try:
        discarded = await discard_partial(digest)
    except SpegeldError as exc:
        logger.warning("could not discard the partial write of %s: %s", digest, exc)
    else:
        logger.warning("discarded the partial write of %s: %s", digest, discarded)
