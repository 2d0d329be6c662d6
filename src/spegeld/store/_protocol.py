"""The Store seam: what this node holds, as the mirror and the router see it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from spegeld.oci import Descriptor, Digest

from ._ingest import Ingest, inflight_key


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the node would advertise: digests with descriptors, and tag keys."""

    digests: Mapping[Digest, Descriptor] = field(default_factory=dict)
    tags: Mapping[str, Digest] = field(default_factory=dict)
    inflight: frozenset[Digest] = frozenset()  # blobs being downloaded, not yet complete

    def keys(self) -> frozenset[str]:
        inflight = frozenset(inflight_key(d) for d in self.inflight)
        return frozenset(self.digests) | frozenset(self.tags) | inflight


@dataclass(frozen=True, slots=True)
class KeysChanged:
    """Keys that appeared in or left the index; what gossip advertises or withdraws."""

    added: frozenset[str]
    removed: frozenset[str]


@dataclass(frozen=True, slots=True)
class OpenBlob:
    """A readable blob: a file for sendfile when there is one, and always a chunk stream."""

    descriptor: Descriptor
    path: Path | None
    chunks: AsyncIterator[bytes]


class Store(Protocol):
    def list(self) -> Snapshot:
        """The current index."""
        ...

    def resolve(self, tag_key: str) -> Digest:
        """The digest a ``registry/repository:tag`` key points at; NotFound otherwise."""
        ...

    def descriptor(self, digest: Digest) -> Descriptor:
        """Media type and size of a digest held here; NotFound otherwise."""
        ...

    async def open(self, digest: Digest, offset: int = 0, length: int | None = None) -> OpenBlob:
        """Open a held blob from ``offset`` for ``length`` bytes (None: to the end)."""
        ...

    def inflight(self, digest: Digest) -> Ingest | None:
        """The blob's download under way here (or its landed file), when it is shared."""
        ...

    def image_names(self, digest: Digest) -> tuple[str, ...]:
        """The names of the images that reach a digest held here (none for a loose blob)."""
        ...

    def watch(
        self,
    ) -> AbstractAsyncContextManager[tuple[Snapshot, trio.MemoryReceiveChannel[KeysChanged]]]:
        """The index now, plus every change after it, with nothing lost in between."""
        ...
