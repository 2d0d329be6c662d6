"""Content events (containerd 2.1+): a committed blob is held by digest before any image.

containerd 2.3 publishes ``/content/create`` (digest, size) when a blob is committed and
``/content/delete`` when one is deleted through the API; 1.6 publishes only the delete,
and its garbage collector, like 2.3's, deletes content silently. The real containerds
show both; the decoder tests feed it envelopes directly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from spegeld_harness import PrivateContainerd, build_image

from spegeld.containerd import ContentCreated, ContentDeleted, open_containerd
from spegeld.containerd._events import decode_envelope
from spegeld.containerd._gen import content_events_pb2
from spegeld.oci import Digest
from spegeld.store import ContainerdStore, KeysChanged
from spegeld.store._containerd import IMAGE_RECHECK_DELAY

from ._support import expected_keys, import_image, remove_image, wait_until

# Bounds on what one event costs to reach the index on loopback: milliseconds in
# practice (see docs/benchmarks.md), seconds here so a loaded CI machine stays green.
EVENT_BOUND = 5.0
FLOOD = 30  # blobs committed back to back, as a pull of a many-layer image does


def _envelope(topic: str, payload: bytes) -> SimpleNamespace:
    return SimpleNamespace(topic=topic, event=SimpleNamespace(value=payload))


def test_content_create_decodes_digest_and_size() -> None:
    digest = "sha256:" + "ab" * 32
    payload = content_events_pb2.ContentCreate(digest=digest, size=1234).SerializeToString()
    assert decode_envelope(_envelope("/content/create", payload)) == ContentCreated(
        Digest(digest), 1234
    )
    payload = content_events_pb2.ContentDelete(digest=digest).SerializeToString()
    assert decode_envelope(_envelope("/content/delete", payload)) == ContentDeleted(Digest(digest))


@pytest.mark.parametrize(
    "payload",
    [
        content_events_pb2.ContentCreate(digest="sha256:" + "ab" * 32, size=-1).SerializeToString(),
        content_events_pb2.ContentCreate(digest="sha256:../../etc", size=1).SerializeToString(),
        content_events_pb2.ContentCreate(digest="", size=1).SerializeToString(),
        b"\xff\xff\xff",
    ],
    ids=["negative-size", "bad-digest", "no-digest", "garbage"],
)
def test_a_broken_content_create_is_dropped(payload: bytes) -> None:
    assert decode_envelope(_envelope("/content/create", payload)) is None


# --- real containerd -----------------------------------------------------------------


def _ingest(node: PrivateContainerd, data: bytes) -> Digest:
    digest = Digest("sha256:" + hashlib.sha256(data).hexdigest())
    node.ctr(
        "content",
        "ingest",
        "--expected-digest",
        digest,
        "--expected-size",
        str(len(data)),
        f"test-{digest[7:19]}",
        input=data,
    )
    return digest


async def ingest(node: PrivateContainerd, data: bytes) -> Digest:
    return await trio.to_thread.run_sync(_ingest, node, data)


async def ctr(node: PrivateContainerd, *args: str) -> None:
    await trio.to_thread.run_sync(lambda: node.ctr(*args))


@asynccontextmanager
async def started_store(node: PrivateContainerd) -> AsyncIterator[ContainerdStore]:
    # A resync every hour: the tests drive resyncs themselves with sync().
    async with open_containerd(node.socket, node.namespace) as client:
        store = ContainerdStore(client, node.content_path, resync_interval=3600)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(store.run)
            yield store
            nursery.cancel_scope.cancel()


@pytest.fixture
async def store2(containerd2: PrivateContainerd) -> AsyncIterator[ContainerdStore]:
    # containerd collects once 100 ms after start whatever it holds, then only after a
    # deletion or 100 mutations: collect now, so a blob a test ingests (held by no
    # lease or image) stays until the test deletes it or collects again itself.
    await trio.to_thread.run_sync(containerd2.gc)
    async with started_store(containerd2) as store:
        yield store


@pytest.mark.containerd2
async def test_an_ingested_blob_is_held_at_once_and_withdrawn_on_delete(
    containerd2: PrivateContainerd, store2: ContainerdStore
) -> None:
    data = os.urandom(3000)
    with trio.fail_after(30):
        async with store2.watch() as (_, changes):
            digest = await ingest(containerd2, data)
            assert await changes.receive() == KeysChanged(frozenset({digest}), frozenset())
            desc = store2.descriptor(digest)
            assert (desc.digest, desc.size) == (digest, len(data))
            blob = await store2.open(digest)
            assert blob.path is not None, "a loose blob is served from its file too"
            assert b"".join([c async for c in blob.chunks]) == data
            assert store2.statistics().loose_blobs == 1

            await ctr(containerd2, "content", "rm", digest)
            assert await changes.receive() == KeysChanged(frozenset(), frozenset({digest}))
            assert digest not in store2.list().digests
            assert store2.statistics().loose_blobs == 0


@pytest.mark.containerd2
async def test_a_flood_of_commits_costs_no_resync(
    containerd2: PrivateContainerd, store2: ContainerdStore
) -> None:
    blobs = [os.urandom(100 + n) for n in range(FLOOD)]
    with trio.fail_after(60):
        syncs = store2.statistics().full_syncs
        digests = {await ingest(containerd2, data) for data in blobs}
        await wait_until(
            lambda: digests <= store2.list().keys(), EVENT_BOUND, f"{FLOOD} ingested blobs"
        )
        stats = store2.statistics()
        assert stats.full_syncs == syncs, "each commit is applied alone, never by a resync"
        assert stats.loose_blobs == FLOOD


@pytest.mark.containerd2
async def test_layers_committed_before_their_image_are_served_then_owned_by_it(
    containerd2: PrivateContainerd, store2: ContainerdStore, tmp_path: Path
) -> None:
    # A pull half-way: config and layers committed, no manifest or image record yet.
    image = build_image("example.com/team/early:v1", [2000, 3000, 4000], seed=31)
    platform = image.platforms[0]
    early = {Digest(d) for d in (platform.config, *platform.layers)}
    with trio.fail_after(30):
        for digest in sorted(early):
            assert await ingest(containerd2, image.read_blob(digest)) == digest
        await wait_until(lambda: early <= store2.list().keys(), EVENT_BOUND, "early blobs")
        assert not store2.list().tags, "a loose blob never brings a tag"

        await import_image(containerd2, image, trio.Path(tmp_path))
        want = expected_keys(image)
        # The import also commits its archive's index, which no image keeps: the GC
        # takes it silently and the recheck after the image event drops it.
        await wait_until(lambda: store2.list().keys() == want, EVENT_BOUND, "the whole image")
        layer = Digest(platform.layers[0])
        assert store2.descriptor(layer).media_type == image.blobs[layer].media_type
        assert store2.statistics().loose_blobs == 0, "the image took its blobs over"

        # The image goes and the GC takes its content without a content event: the
        # blobs it took over leave with it.
        await remove_image(containerd2, image.name)
        await wait_until(lambda: not store2.list().keys(), EVENT_BOUND, "an empty index")


@pytest.mark.containerd2
async def test_a_resync_drops_loose_blobs_gone_or_left_unclaimed(
    containerd2: PrivateContainerd, store2: ContainerdStore
) -> None:
    with trio.fail_after(30):
        orphan = await ingest(containerd2, os.urandom(500))
        kept = await ingest(containerd2, os.urandom(600))
        # A GC root survives containerd's GC: it stays present but no image names it.
        await ctr(containerd2, "content", "label", kept, "containerd.io/gc.root=test")
        both = {orphan, kept}
        await wait_until(lambda: both <= store2.list().keys(), EVENT_BOUND, "both blobs")

        await trio.to_thread.run_sync(containerd2.gc)  # deletes the orphan, silently
        assert orphan not in containerd2.content_digests()
        assert kept in containerd2.content_digests()
        await store2.sync()
        assert orphan not in store2.list().digests, "gone from containerd: dropped"
        assert kept in store2.list().digests, "committed since the last resync: kept once"
        await store2.sync()
        assert kept not in store2.list().digests, "still unclaimed a resync later: dropped"


async def test_containerd_16_holds_nothing_before_an_image_names_it(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    """1.6 publishes no ``/content/create``: there an image brings its blobs in."""
    image = build_image("example.com/team/late:v1", [2000], seed=32)
    platform = image.platforms[0]
    with trio.fail_after(30):
        async with started_store(containerd) as store:
            layer = await ingest(containerd, image.read_blob(platform.layers[0]))
            other = build_image("example.com/team/marker:v1", [1000], seed=33)
            # Events arrive in order: once the later import is indexed, a create event
            # for the ingest would have been applied already.
            await import_image(containerd, other, trio.Path(tmp_path))
            await wait_until(
                lambda: expected_keys(other) <= store.list().keys(), EVENT_BOUND, "marker"
            )
            assert layer not in store.list().digests
            assert store.statistics().loose_blobs == 0

            await import_image(containerd, image, trio.Path(tmp_path))
            await wait_until(
                lambda: expected_keys(image) <= store.list().keys(), EVENT_BOUND, "the image"
            )


class _SlowRefresh(ContainerdStore):
    """Walks one image slowly, as a containerd under load answers: a stand-in for a delay
    real containerd cannot be made to take at a chosen moment."""

    slow_name = ""

    async def _refresh_image(self, name: str) -> None:
        if name == self.slow_name:
            await trio.sleep(IMAGE_RECHECK_DELAY + 1)  # a timer falls due meanwhile
        await super()._refresh_image(name)


async def test_an_event_applied_while_a_timer_falls_due_is_not_lost(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    first = build_image("example.com/team/first:v1", [1000], seed=34)
    second = build_image("example.com/team/second:v1", [1000], seed=35)
    async with open_containerd(containerd.socket, containerd.namespace) as client:
        store = _SlowRefresh(client, containerd.content_path, resync_interval=3600)
        store.slow_name = second.name
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await nursery.start(store.run)
                await import_image(containerd, first, trio.Path(tmp_path))
                await wait_until(lambda: expected_keys(first) <= store.list().keys(), 5, "first")
                # The first image's rechecks are pending while the second is walked.
                await import_image(containerd, second, trio.Path(tmp_path))
                await wait_until(
                    lambda: expected_keys(second) <= store.list().keys(),
                    IMAGE_RECHECK_DELAY + 1 + EVENT_BOUND,
                    "the second image, walked across a timer",
                )
            nursery.cancel_scope.cancel()
