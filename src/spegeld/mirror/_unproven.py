"""Which blobs a peer's bytes reached the client in before they could be checked.

The proxy checks a blob's digest only at its end and holds back just the last byte, so
the rest is already in the client's hands: for containerd on this node, in a partial
write it resumes from and never re-checks. When a peer is caught lying about one blob,
every other blob it was sending (in parallel, or cut off before its end) may be poisoned
too; this record names them, so their partial writes can be discarded.
"""

from __future__ import annotations

from spegeld.oci import Digest
from spegeld.routing import Peer

MAX_ENTRIES = 4096  # (peer, digest) pairs; a node proxies a few dozen blobs at once


class UnprovenBytes:
    def __init__(self, ttl: float) -> None:
        self._ttl = ttl  # seconds a record lasts: the partial write has expired or finished
        self._sent: dict[tuple[Peer, Digest], float] = {}

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
