"""An in-memory Store: the twin of the containerd store, for tests and simulations."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager

import trio

from spegeld.errors import NotFound
from spegeld.oci import Descriptor, Digest, ShareFilter

from ._index import ImageEntry, Index
from ._ingest import Ingest
from ._protocol import KeysChanged, OpenBlob, Snapshot
from ._watchers import Watchers

CHUNK_SIZE = 64 * 1024


def sha256_digest(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


class MemoryStore:
    """Holds images as plain bytes; ``add_image`` and ``remove_image`` drive ``watch()``."""

    def __init__(self, share: ShareFilter | None = None) -> None:
        self._index = Index(share)
        self._blobs: dict[Digest, bytes] = {}
        self._watchers = Watchers()
        self._inflight: dict[Digest, Ingest] = {}

    def add_image(
        self, name: str, blobs: Mapping[Digest, tuple[str, bytes]], tags: Mapping[str, Digest]
    ) -> None:
        """Add an image: its blobs by digest as (media type, bytes), and its tag keys."""
        for digest, (_, data) in blobs.items():
            self._blobs[digest] = data
        entry = ImageEntry(
            digests={d: Descriptor(mt, d, len(data)) for d, (mt, data) in blobs.items()},
            tags=dict(tags),
        )
        self._watchers.publish(self._index.put(name, entry))

    def remove_image(self, name: str) -> None:
        self._watchers.publish(self._index.remove(name))
        held = self._index.snapshot().digests
        for digest in [d for d in self._blobs if d not in held]:
            del self._blobs[digest]

    def list(self) -> Snapshot:
        return self._index.snapshot()

    def resolve(self, tag_key: str) -> Digest:
        digest = self._index.resolve(tag_key)
        if digest is None:
            raise NotFound(f"tag {tag_key} is not held here")
        return digest

    def descriptor(self, digest: Digest) -> Descriptor:
        desc = self._index.descriptor(digest)
        if desc is None:
            raise NotFound(f"{digest} is not held here")
        return desc

    async def open(self, digest: Digest, offset: int = 0, length: int | None = None) -> OpenBlob:
        desc = self.descriptor(digest)
        data = self._blobs[digest]
        end = len(data) if length is None else min(len(data), offset + length)
        return OpenBlob(descriptor=desc, path=None, chunks=_chunks(data[offset:end]))

    def inflight(self, digest: Digest) -> Ingest | None:
        return self._inflight.get(digest)

    def image_names(self, digest: Digest) -> tuple[str, ...]:
        return tuple(self._index.images_with(digest))

    def set_inflight(self, ingest: Ingest) -> None:
        """Hold ``ingest`` as a download under way (its files are the caller's)."""
        self._inflight[ingest.digest] = ingest

    def watch(
        self,
    ) -> AbstractAsyncContextManager[tuple[Snapshot, trio.MemoryReceiveChannel[KeysChanged]]]:
        return self._watchers.open(self._index.snapshot)


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), CHUNK_SIZE):
        await trio.lowlevel.checkpoint()
        yield data[start : start + CHUNK_SIZE]
