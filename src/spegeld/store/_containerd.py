"""The Store backed by a real containerd: index, walk, watch.

The index is rebuilt in full at start, kept current from containerd's events,
and rebuilt again every ``resync_interval`` as a safety net: containerd's
garbage collector deletes content without sending any event.

containerd 2.1+ also publishes ``/content/create`` when a blob is committed: the
blob is then held by digest at once (a loose blob, see ``_index``), so a layer
is advertised as soon as it lands rather than when its image record appears.
1.6 and 1.7 publish no such event, and there an image brings its blobs in.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import trio

from spegeld.containerd import (
    TOPIC_FILTERS,
    ContainerdClient,
    ContainerdEvent,
    ContentCreated,
    ContentDeleted,
    ImageChanged,
    ImageDeleted,
    ImageRecord,
)
from spegeld.errors import ContainerdError, NotFound, RemoteProtocolError
from spegeld.metrics import MetricsRegistry
from spegeld.oci import Descriptor, Digest, ShareFilter, parse_reference

from ._contentpath import ContentPath, ContentPathFinder
from ._files import file_chunks, no_chunks, readable_file
from ._index import ImageEntry, Index, LooseBlob
from ._ingest import INGEST_SCAN_ACTIVE, INGEST_SCAN_IDLE, InflightTable, Ingest
from ._protocol import KeysChanged, OpenBlob, Snapshot
from ._walk import DocumentCache, IsPresent, read_document_with, walk_image
from ._watchers import Watchers

logger = logging.getLogger(__name__)

# containerd's ContentCreate event carries a digest and a size, no media type. A blob
# served by digest needs neither more nor the type (it goes out as octet-stream), and
# the mirror serves as a manifest only what an image's descriptor calls one.
LOOSE_MEDIA_TYPE = "application/octet-stream"
# containerd's garbage collector deletes content silently, and an import or pull
# leaves content behind that the GC removes a moment later (a multi-platform
# import writes every platform, then keeps one). Walk a changed image again,
# and check the loose blobs, after this long to drop what the GC took.
IMAGE_RECHECK_DELAY = 2.0  # seconds
# A pull or import deletes its lease right after creating the image, and containerd's
# GC scheduler (pause_threshold 0.02, schedule_delay 0) collects what nothing holds
# within milliseconds: check the loose blobs this soon after an image event, and again
# with the image rechecks for a GC that ran late. One Info call per loose blob.
LOOSE_RECHECK_DELAY = 0.25  # seconds


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    images: int
    digests: int
    loose_blobs: int  # committed content no image references yet (containerd 2.1+)
    tags: int
    full_syncs: int
    events_applied: int
    synced: bool
    direct_reads: bool  # containerd's blobs directory is readable right now
    read_mode: str  # how the last blob was served: "file", "grpc", or "none" yet
    file_reads: int  # blobs served from their file in the content store (sendfile)
    grpc_reads: int  # blobs streamed over containerd's Content.Read (the fallback)
    warnings: tuple[str, ...]


def tag_keys_for(image: ImageRecord) -> dict[str, Digest]:
    """``registry/repo:tag`` → target digest, for images named with a registry and a tag."""
    try:
        ref = parse_reference(image.name)
    except RemoteProtocolError:
        return {}
    key = ref.tag_key()
    return {key: image.target.digest} if key else {}


class ContainerdStore:
    def __init__(
        self,
        client: ContainerdClient,
        content_path: Path | None = None,
        resync_interval: float = 300.0,
        *,
        metrics: MetricsRegistry | None = None,
        share: ShareFilter | None = None,
    ) -> None:
        self._client = client
        self._share = share or ShareFilter()  # registry filters: images kept out of the index
        # None: ask containerd on each (re)connect (``_contentpath``); a path given here
        # wins over containerd's answer.
        self._finder = ContentPathFinder(content_path)
        self._resync_interval = resync_interval
        self._index = Index(self._share)
        self._watchers = Watchers()
        self._cache = DocumentCache()
        self._synced = trio.Event()
        self._full_syncs = 0
        self._last_sync_at = -math.inf
        self._events_applied = 0
        self._warnings: tuple[str, ...] = ()
        # Decided per blob when it is served, never once at start: on a fresh node the
        # blobs directory appears only with the first pull.
        self._reads = _ReadPaths(self._blobs_dir, metrics)
        self._inflight = InflightTable()

    # The Store seam.

    def list(self) -> Snapshot:
        return self._snapshot()

    def _snapshot(self) -> Snapshot:
        return dataclasses.replace(self._index.snapshot(), inflight=self._inflight.digests())

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
        if length == 0:
            return OpenBlob(desc, None, no_chunks())  # gRPC would read size 0 as "to the end"
        path = self._file_of(desc)
        if path is None:
            await self._confirm_held(digest)
        self._reads.record(digest, path)
        if path is not None:
            return OpenBlob(desc, path, file_chunks(path, offset, length))
        chunks = self._client.read(digest, offset, 0 if length is None else length)
        return OpenBlob(desc, None, chunks)

    def inflight(self, digest: Digest) -> Ingest | None:
        return self._inflight.get(digest)

    def image_names(self, digest: Digest) -> tuple[str, ...]:
        return tuple(self._index.images_with(digest))

    def watch(
        self,
    ) -> AbstractAsyncContextManager[tuple[Snapshot, trio.MemoryReceiveChannel[KeysChanged]]]:
        return self._watchers.open(self._snapshot)

    async def follow_ingests(self) -> NoReturn:
        """Advertise the blobs containerd is downloading until their ingest ends: committed
        (the complete key takes over once the index has it) or aborted (``_ingest``)."""
        while True:
            self.scan_ingests_once()
            active = self._inflight.active()
            await trio.sleep(INGEST_SCAN_ACTIVE if active else INGEST_SCAN_IDLE)

    def scan_ingests_once(self) -> KeysChanged:
        """One scan of the ingest area, its change published to the watchers. An ingest
        names no image: with registry filters or a private registry set, none is known to
        be shared."""
        change = self._inflight.rescan(
            None if self._share.names_required else self._content_path,
            self._client.namespace,
            time.monotonic(),
            indexed=lambda d: self._index.descriptor(d) is not None,
            landed=lambda i: readable_file(self._blobs_dir, i.digest, i.total) is not None,
        )
        published = KeysChanged(added=change.added, removed=change.removed)
        self._watchers.publish(published)
        return published

    # Lifecycle and diagnostics.

    @property
    def content_path(self) -> ContentPath:
        """The content directory in use, and how it was found."""
        return self._finder.current

    @property
    def _content_path(self) -> Path:
        return self._finder.current.path

    @property
    def _blobs_dir(self) -> Path:
        return self._finder.current.path / "blobs" / "sha256"

    async def find_content_path(self) -> ContentPath:
        """Ask containerd where its content is (on every (re)connect: it may have moved).
        Only ``ContainerdUnavailable`` escapes; any other failure falls back, logged."""
        found = await self._finder.refresh(self._client)
        self._reads.blobs_dir = self._blobs_dir
        return found

    def blob_path(self, digest: Digest) -> Path | None:
        """The blob's file in the content store, when we may read it directly."""
        desc = self._index.descriptor(digest)
        return self._file_of(desc) if desc is not None else readable_file(self._blobs_dir, digest)

    def _file_of(self, desc: Descriptor) -> Path | None:
        return readable_file(self._blobs_dir, desc.digest, desc.size)

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def withheld_images(self) -> int:
        """How many images the registry filters keep out of the index (and of sharing)."""
        return self._index.withheld()

    def statistics(self) -> StoreStatistics:
        snap = self._index.snapshot()
        return StoreStatistics(
            images=len(self._index.image_names()),
            digests=len(snap.digests),
            loose_blobs=len(self._index.loose()),
            tags=len(snap.tags),
            full_syncs=self._full_syncs,
            events_applied=self._events_applied,
            synced=self._synced.is_set(),
            direct_reads=os.access(self._blobs_dir, os.R_OK | os.X_OK),
            read_mode=self._reads.mode,
            file_reads=self._reads.counts["file"],
            grpc_reads=self._reads.counts["grpc"],
            warnings=self._warnings,
        )

    async def sync(self) -> KeysChanged:
        """Rebuild the whole index from containerd and publish the net change.

        A loose blob survives the first resync after its commit when it is still
        present (its pull may be half-way), and is dropped by the next one unless
        an image has taken it by then: an orphan the GC will take, or an ingest no
        image names, stays advertised at most two resync intervals.
        """
        started_at = trio.current_time()
        loose: list[LooseBlob] = []
        if not await self._client.namespace_exists():
            self._set_warnings(
                f"containerd namespace {self._client.namespace!r} does not exist at "
                f"{self._client.socket}: nothing to advertise"
            )
            entries: dict[str, ImageEntry] = {}
        else:
            self._set_warnings()
            images = await self._client.list_images()
            present = {info.digest for info in await self._client.list_content()}

            async def is_present(digest: Digest) -> bool:
                return digest in present

            # A withheld image is not walked: the index keeps only its name.
            entries = {
                image.name: await self._entry(image, is_present)
                if self._share.shares_image(image.name)
                else ImageEntry({}, {})
                for image in images
            }
            self._cache.retain(present)
            loose = [
                blob
                for blob in self._index.loose()
                if blob.descriptor.digest in present and blob.committed_at >= self._last_sync_at
            ]
        change = self._index.replace_all(entries, loose)
        self._watchers.publish(change)
        self._last_sync_at = started_at
        self._full_syncs += 1
        self._synced.set()
        return change

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Sync, follow events (and the ingest area); on an outage, wait and start over."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.follow_ingests)
            await self._run_index(task_status)

    async def _run_index(self, task_status: trio.TaskStatus[None]) -> NoReturn:
        started = False
        outage = False
        while True:
            try:
                await self.find_content_path()
                async with self._client.subscribe(TOPIC_FILTERS) as events:
                    await self.sync()
                    if outage:
                        logger.info("containerd is back at %s; index resynced", self._client.socket)
                        outage = False
                    if not started:
                        task_status.started()
                        started = True
                    await self._follow(events)
            except ContainerdError as exc:
                if not outage:
                    logger.warning("lost containerd, retrying with backoff: %s", exc)
                    outage = True
            await self._client.wait_available()

    async def _follow(self, events: trio.MemoryReceiveChannel[ContainerdEvent]) -> None:
        next_resync = trio.current_time() + self._resync_interval
        rechecks: dict[str, float] = {}  # image name → when to walk it again
        loose_soon = loose_late = math.inf  # when to look for loose blobs the GC took
        while True:
            event: ContainerdEvent | None = None
            # Only the wait is under the deadline: an event being applied when a timer
            # falls due must not be cancelled half-way (it would be lost until a resync).
            with trio.move_on_at(min([next_resync, loose_soon, loose_late, *rechecks.values()])):
                try:
                    event = await events.receive()
                except trio.EndOfChannel:
                    return  # subscribe() raises the reason on exit
            now = trio.current_time()
            if event is not None:
                await self._apply(event)
                if isinstance(event, ImageChanged):
                    rechecks[event.name] = now + IMAGE_RECHECK_DELAY
                    loose_soon = min(loose_soon, now + LOOSE_RECHECK_DELAY)
                    loose_late = now + IMAGE_RECHECK_DELAY
            # Timers run after an event too, so a steady stream of events cannot starve them.
            if now >= next_resync:
                rechecks.clear()
                loose_soon = loose_late = math.inf
                await self.sync()
                next_resync = trio.current_time() + self._resync_interval
            for name in [n for n, when in rechecks.items() if when <= now]:
                del rechecks[name]
                await self._refresh_image(name)
            if now >= min(loose_soon, loose_late):
                loose_soon = math.inf if now >= loose_soon else loose_soon
                loose_late = math.inf if now >= loose_late else loose_late
                await self._recheck_loose()

    async def _apply(self, event: ContainerdEvent) -> None:
        self._events_applied += 1
        if isinstance(event, ImageDeleted):
            self._watchers.publish(self._index.remove(event.name))
        elif isinstance(event, ImageChanged):
            await self._refresh_image(event.name)
        elif isinstance(event, ContentDeleted):
            await self._forget(event.digest)
        elif isinstance(event, ContentCreated):
            # O(1) and no containerd call: a pull commits many blobs in a burst.
            desc = Descriptor(LOOSE_MEDIA_TYPE, event.digest, event.size)
            blob = LooseBlob(desc, committed_at=trio.current_time())
            self._watchers.publish(self._index.add_loose(blob))

    async def _forget(self, digest: Digest) -> None:
        """containerd no longer has ``digest``: drop it loose, walk the images reaching it."""
        self._watchers.publish(self._index.remove_loose(digest))
        for name in self._index.images_with(digest):
            await self._refresh_image(name)

    async def _confirm_held(self, digest: Digest) -> None:
        """NotFound (and the blob forgotten) when containerd no longer has it.

        Checked before a blob with no readable file is served over gRPC, so the mirror
        answers 404 rather than a 200 it cannot finish. containerd's GC deletes what a
        failed pull committed (its lease goes, no image takes the blobs) without an event;
        on 2.1+ those blobs were held from their /content/create events, and every retry
        of that pull met a 200 cut at its first byte until the next resync.
        """
        try:
            await self._client.info(digest)
        except NotFound:
            await self._forget(digest)
            raise

    async def _recheck_loose(self) -> None:
        """Drop loose blobs the GC took: a finished pull or import leaves blobs no
        image kept (the archive's index, other platforms), and the GC deletes them
        without an event. One Info call per loose blob; images own the rest.
        """
        for blob in self._index.loose():
            try:
                await self._client.info(blob.descriptor.digest)
            except NotFound:
                self._watchers.publish(self._index.remove_loose(blob.descriptor.digest))

    async def _refresh_image(self, name: str) -> None:
        if not self._share.shares_image(name):
            self._watchers.publish(self._index.put(name, ImageEntry({}, {})))
            return
        try:
            image = await self._client.get_image(name)
        except NotFound:
            self._watchers.publish(self._index.remove(name))
            return

        async def is_present(digest: Digest) -> bool:
            try:
                await self._client.info(digest)
            except NotFound:
                return False
            return True

        self._watchers.publish(self._index.put(name, await self._entry(image, is_present)))

    async def _entry(self, image: ImageRecord, is_present: IsPresent) -> ImageEntry:
        digests = await walk_image(
            image.target, is_present, read_document_with(self._read_document), self._cache
        )
        tags = tag_keys_for(image) if image.target.digest in digests else {}
        return ImageEntry(digests=digests, tags=tags)

    async def _read_document(self, desc: Descriptor) -> bytes:
        path = self._file_of(desc)
        if path is not None:
            try:
                return await trio.Path(path).read_bytes()
            except FileNotFoundError as exc:
                raise NotFound(f"{desc.digest} vanished from {path}") from exc
        return await self._client.read_all(desc.digest, limit=max(desc.size, 1) + 1)

    def _set_warnings(self, *warnings: str) -> None:
        if warnings != self._warnings:
            for warning in warnings:
                logger.warning("%s", warning)
        self._warnings = warnings


class _ReadPaths:
    """Counts which path served each blob, and logs once each time the mode changes."""

    def __init__(self, blobs_dir: Path, metrics: MetricsRegistry | None) -> None:
        self.blobs_dir = blobs_dir
        self.mode = "none"
        self.counts = {"file": 0, "grpc": 0}
        counter = (
            metrics.counter(
                "spegeld_blob_reads_total",
                "Local blobs served, by path: file (sendfile from containerd's content "
                "directory) or grpc (containerd's Content.Read stream, the slower fallback).",
                ("path",),
            )
            if metrics is not None
            else None
        )
        self._children = (
            {path: counter.labels(path=path) for path in self.counts} if counter else {}
        )

    def record(self, digest: Digest, path: Path | None) -> None:
        mode = "grpc" if path is None else "file"
        self.counts[mode] += 1
        if self._children:
            self._children[mode].inc()
        if mode == self.mode:
            return
        previous, self.mode = self.mode, mode
        if mode == "file":
            logger.info("serving blobs from their files in %s (sendfile)", self.blobs_dir)
        else:
            logger.warning(
                "%s is not readable in %s: streaming blobs over containerd's Content.Read, "
                "which is slower (was: %s)",
                digest,
                self.blobs_dir,
                previous,
            )
