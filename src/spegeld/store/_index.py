"""The index as data: per-image key sets, merged with reference counts.

Several images share layers, so a digest leaves the index only when the last
image that reaches it goes. Pure: no I/O, no trio.

Loose blobs (containerd 2.1+): content committed that no image references yet,
announced by a ``/content/create`` event. Each holds one reference of its own,
like an image holding one digest, until an image that reaches it takes it over
(``put``), containerd deletes it (``remove_loose``), or a full resync drops it
(``replace_all`` keeps only what its caller carries over). Digests only: a tag
still comes from an image.

Registry filters (``ShareFilter``): an image the filter does not share never enters the
index, so a digest stays only while a shared image reaches it. While any rule is set, a
loose blob is not held at all: nothing says yet which image it belongs to, and a private
layer must not be advertised for the length of its pull. The same holds while a private
registry is set (``ShareFilter.names_required``): its digests are served only under names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from spegeld.oci import Descriptor, Digest, ShareFilter

from ._protocol import KeysChanged, Snapshot


@dataclass(frozen=True, slots=True)
class LooseBlob:
    """Content committed but referenced by no image, and when it was seen committed."""

    descriptor: Descriptor
    committed_at: float


@dataclass(frozen=True, slots=True)
class ImageEntry:
    """What one containerd image contributes to the index."""

    digests: Mapping[Digest, Descriptor]
    tags: Mapping[str, Digest]

    def keys(self) -> frozenset[str]:
        return frozenset(self.digests) | frozenset(self.tags)


class Index:
    def __init__(self, share: ShareFilter | None = None) -> None:
        self._share = share or ShareFilter()
        self._withheld: set[str] = set()  # image names the filter keeps out
        self._images: dict[str, ImageEntry] = {}
        self._refs: Counter[str] = Counter()
        self._digests: dict[Digest, Descriptor] = {}
        self._tags: dict[str, Digest] = {}
        self._loose: dict[Digest, LooseBlob] = {}

    def snapshot(self) -> Snapshot:
        return Snapshot(digests=dict(self._digests), tags=dict(self._tags))

    def descriptor(self, digest: Digest) -> Descriptor | None:
        return self._digests.get(digest)

    def resolve(self, tag_key: str) -> Digest | None:
        return self._tags.get(tag_key)

    def image_names(self) -> frozenset[str]:
        return frozenset(self._images)

    def images_with(self, digest: Digest) -> list[str]:
        """The names of the images that reach ``digest`` (O(images): for the private-registry
        binding, asked only while one is set)."""
        return [name for name, entry in self._images.items() if digest in entry.digests]

    def loose(self) -> list[LooseBlob]:
        return list(self._loose.values())

    def withheld(self) -> int:
        """How many images the registry filters keep out of the index."""
        return len(self._withheld)

    def put(self, name: str, entry: ImageEntry) -> KeysChanged:
        if not self._share.shares_image(name):
            change = self.remove(name)  # it may have been shared under an older filter
            self._withheld.add(name)
            return change
        before = self._images.get(name)
        self._images[name] = entry
        change = self._apply(add=entry, remove=before)
        self._adopt(entry)
        return change

    def add_loose(self, blob: LooseBlob) -> KeysChanged:
        """Hold committed content by digest; O(1), nothing if already held any way."""
        digest = blob.descriptor.digest
        if digest in self._refs or self._share.names_required:
            return KeysChanged(frozenset(), frozenset())
        self._loose[digest] = blob
        self._bump(digest, +1)
        self._digests[digest] = blob.descriptor
        return KeysChanged(added=frozenset((digest,)), removed=frozenset())

    def remove_loose(self, digest: Digest) -> KeysChanged:
        """Drop a loose blob; a digest an image still reaches stays (the image decides)."""
        if self._loose.pop(digest, None) is None:
            return KeysChanged(frozenset(), frozenset())
        self._bump(digest, -1)
        if digest in self._refs:
            return KeysChanged(frozenset(), frozenset())
        self._digests.pop(digest, None)
        return KeysChanged(added=frozenset(), removed=frozenset((digest,)))

    def remove(self, name: str) -> KeysChanged:
        self._withheld.discard(name)
        before = self._images.pop(name, None)
        return self._apply(add=None, remove=before)

    def replace_all(
        self, entries: Mapping[str, ImageEntry], loose: Iterable[LooseBlob] = ()
    ) -> KeysChanged:
        """Swap in a full resync and report only the net difference.

        ``loose`` is what the caller carries over; a blob an image now reaches is
        the image's, not loose.
        """
        old_keys = frozenset(self._refs)
        self._images, self._refs, self._digests, self._tags = {}, Counter(), {}, {}
        self._loose = {}
        self._withheld = {name for name in entries if not self._share.shares_image(name)}
        for name, entry in entries.items():
            if name in self._withheld:
                continue
            self._images[name] = entry
            self._count(entry, +1)
        for blob in loose:
            self.add_loose(blob)
        new_keys = frozenset(self._refs)
        return KeysChanged(added=new_keys - old_keys, removed=old_keys - new_keys)

    def _apply(self, add: ImageEntry | None, remove: ImageEntry | None) -> KeysChanged:
        old = remove.keys() if remove else frozenset()
        new = add.keys() if add else frozenset()
        if remove:
            self._count(remove, -1)
        if add:
            self._count(add, +1)
        added = frozenset(k for k in new - old if self._refs[k] == 1)
        removed = frozenset(k for k in old - new if k not in self._refs)
        return KeysChanged(added=added, removed=removed)

    def _adopt(self, entry: ImageEntry) -> None:
        """An image that reaches a loose blob takes over its reference and descriptor.

        The image's descriptor carries the real media type; the loose one cannot.
        """
        for digest in [d for d in entry.digests if d in self._loose]:
            del self._loose[digest]
            self._bump(digest, -1)  # the image's own reference keeps it above zero
            self._digests[digest] = entry.digests[digest]

    def _count(self, entry: ImageEntry, delta: int) -> None:
        for digest, desc in entry.digests.items():
            self._bump(digest, delta)
            if delta > 0:
                self._digests.setdefault(digest, desc)
            elif digest not in self._refs:
                self._digests.pop(digest, None)
        for key, digest in entry.tags.items():
            self._bump(key, delta)
            if delta > 0:
                self._tags[key] = digest
            elif key not in self._refs:
                self._tags.pop(key, None)
            elif self._tags.get(key) == digest:
                # Two images can carry one tag key (``app:v1`` and ``app:v1@sha256:…``):
                # when the one that set it goes, the survivor's digest takes over.
                self._tags[key] = self._tag_holder(key, excluding=entry)

    def _tag_holder(self, key: str, excluding: ImageEntry) -> Digest:
        for other in self._images.values():
            if other is not excluding and key in other.tags:
                return other.tags[key]
        raise AssertionError(f"tag {key} is counted but no image holds it")

    def _bump(self, key: str, delta: int) -> None:
        self._refs[key] += delta
        if self._refs[key] <= 0:
            del self._refs[key]


def merge_changes(changes: Iterable[KeysChanged]) -> KeysChanged:
    added: set[str] = set()
    removed: set[str] = set()
    for change in changes:
        added = (added - change.removed) | change.added
        removed = (removed - change.added) | change.removed
    return KeysChanged(frozenset(added), frozenset(removed))
