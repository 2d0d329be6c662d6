"""Walk one image from its target down to configs and layers.

Only content present locally is recorded, and only manifests present locally
are followed: an image imported for one platform of a multi-platform index
yields the index, that platform's manifest, config and layers, and nothing
else. Missing or unreadable content is skipped, never fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from spegeld.errors import NotFound, RemoteProtocolError
from spegeld.oci import Descriptor, Digest, Index, Manifest, is_index, is_manifest, parse_document

logger = logging.getLogger(__name__)

MAX_DOCUMENT_SIZE = 4 * 1024 * 1024  # distribution's own manifest limit

IsPresent = Callable[[Digest], Awaitable[bool]]
ReadDocument = Callable[[Descriptor], Awaitable[Index | Manifest | None]]


class DocumentCache:
    """Parsed indexes and manifests by digest: content-addressed, so never stale."""

    def __init__(self) -> None:
        self._docs: dict[Digest, Index | Manifest | None] = {}

    def get(self, digest: Digest) -> Index | Manifest | bool | None:
        """The parsed document, or False when it was never read."""
        return self._docs.get(digest, False)

    def put(self, digest: Digest, doc: Index | Manifest | None) -> None:
        self._docs[digest] = doc

    def retain(self, digests: set[Digest]) -> None:
        for digest in [d for d in self._docs if d not in digests]:
            del self._docs[digest]


def read_document_with(read_bytes: Callable[[Descriptor], Awaitable[bytes]]) -> ReadDocument:
    async def read(desc: Descriptor) -> Index | Manifest | None:
        if not (is_index(desc.media_type) or is_manifest(desc.media_type)):
            return None  # configs and layers point at nothing: never read them
        if desc.size > MAX_DOCUMENT_SIZE:
            raise RemoteProtocolError(f"{desc.digest} is {desc.size} bytes, too big to index")
        return parse_document(desc.media_type, await read_bytes(desc))

    return read


async def walk_image(
    target: Descriptor, is_present: IsPresent, read_document: ReadDocument, cache: DocumentCache
) -> dict[Digest, Descriptor]:
    found: dict[Digest, Descriptor] = {}
    pending = [target]
    while pending:
        desc = pending.pop()
        if desc.digest in found or not await is_present(desc.digest):
            continue
        found[desc.digest] = desc
        doc = cache.get(desc.digest)
        if doc is False:
            try:
                doc = await read_document(desc)
            except RemoteProtocolError as exc:
                # A broken document stays broken: its digest pins its bytes.
                logger.warning("cannot index %s (%s): %s", desc.digest, desc.media_type, exc)
                doc = None
            except NotFound:
                continue  # deleted while we walked; the next event or resync catches up
            cache.put(desc.digest, doc)
        if isinstance(doc, Index):
            pending.extend(entry.descriptor for entry in doc.manifests)
        elif isinstance(doc, Manifest):
            pending.append(doc.config)
            pending.extend(doc.layers)
    return found
