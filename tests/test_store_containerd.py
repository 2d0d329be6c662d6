"""The containerd-backed store: what the index holds, and how it follows containerd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from spegeld_harness import PrivateContainerd, build_image, host_platform

from spegeld.containerd import open_containerd
from spegeld.oci import DOCKER_LAYER_GZIP, DOCKER_MANIFEST, Digest
from spegeld.store import ContainerdStore

from ._support import expected_keys, import_image, remove_image, wait_until

pytestmark = pytest.mark.containerd

HOST = host_platform()
OTHER = "linux/arm64" if HOST != "linux/arm64" else "linux/amd64"


@pytest.fixture
async def store(containerd: PrivateContainerd) -> AsyncIterator[ContainerdStore]:
    async with open_containerd(containerd.socket, containerd.namespace) as client:
        running = ContainerdStore(client, containerd.content_path, resync_interval=60)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(running.run)
            yield running
            nursery.cancel_scope.cancel()


async def test_single_platform_image_indexes_exactly_its_digests_and_tag(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    image = build_image("example.com/team/app:v1", [2000, 3000, 4000], seed=21)
    with trio.fail_after(20):
        await import_image(containerd, image, trio.Path(tmp_path))
        async with open_containerd(containerd.socket, "k8s.io") as client:
            store = ContainerdStore(client, containerd.content_path)
            await store.sync()
        platform = image.platforms[0]
        want = {platform.manifest, platform.config, *platform.layers}
        assert set(store.list().digests) == want
        assert dict(store.list().tags) == {"example.com/team/app:v1": image.digest}


async def test_multi_platform_import_indexes_only_what_is_present(
    containerd: PrivateContainerd, store: ContainerdStore, tmp_path: Path
) -> None:
    image = build_image("example.com/team/multi:v1", [1500, 2500], platforms=[HOST, OTHER], seed=22)
    with trio.fail_after(20):
        await import_image(containerd, image, trio.Path(tmp_path))  # host platform only
        want = expected_keys(image, HOST)
        await wait_until(lambda: store.list().keys() == want, 5, "the host platform's keys")
        absent = image.digests(OTHER) - image.digests(HOST)
        assert absent, "the other platform must have blobs of its own"
        assert not absent & store.list().keys()
        assert store.resolve("example.com/team/multi:v1") == image.index_digest


async def test_docker_media_types_are_indexed(
    containerd: PrivateContainerd, store: ContainerdStore, tmp_path: Path
) -> None:
    image = build_image("registry.local:5000/legacy/app:2.0", [1000], docker_media_types=True)
    with trio.fail_after(20):
        await import_image(containerd, image, trio.Path(tmp_path))
        await wait_until(lambda: store.list().keys() == expected_keys(image), 5, "docker image")
        platform = image.platforms[0]
        assert store.descriptor(Digest(platform.manifest)).media_type == DOCKER_MANIFEST
        assert store.descriptor(Digest(platform.layers[0])).media_type == DOCKER_LAYER_GZIP
        assert "registry.local:5000/legacy/app:2.0" in store.list().tags


async def test_docker_manifest_list_is_indexed(
    containerd: PrivateContainerd, store: ContainerdStore, tmp_path: Path
) -> None:
    image = build_image(
        "example.com/legacy/multi:v1", [1000], platforms=[HOST, OTHER], docker_media_types=True
    )
    with trio.fail_after(20):
        await import_image(containerd, image, trio.Path(tmp_path))
        want = expected_keys(image, HOST)
        await wait_until(lambda: store.list().keys() == want, 5, "docker manifest list")


async def test_a_deleted_image_leaves_the_index_within_a_second(
    containerd: PrivateContainerd, store: ContainerdStore, tmp_path: Path
) -> None:
    keep = build_image("example.com/team/keep:v1", [1000], seed=23)
    drop = build_image("example.com/team/drop:v1", [1000], seed=24)
    with trio.fail_after(20):
        await import_image(containerd, keep, trio.Path(tmp_path))
        await import_image(containerd, drop, trio.Path(tmp_path))
        both = expected_keys(keep) | expected_keys(drop)
        await wait_until(lambda: store.list().keys() == both, 5, "both images")
        syncs = store.statistics().full_syncs
        await remove_image(containerd, drop.name)
        took = await wait_until(
            lambda: store.list().keys() == expected_keys(keep), 1.0, "the deleted image to go"
        )
        assert took < 1.0
        assert store.statistics().full_syncs == syncs, "events, not a resync, removed it"


async def test_index_resyncs_after_containerd_restarts(
    containerd: PrivateContainerd, store: ContainerdStore, tmp_path: Path
) -> None:
    before = build_image("example.com/team/before:v1", [1000], seed=25)
    after = build_image("example.com/team/after:v1", [1000], seed=26)
    with trio.fail_after(30):
        await import_image(containerd, before, trio.Path(tmp_path))
        await wait_until(lambda: store.list().keys() == expected_keys(before), 5, "first image")
        syncs = store.statistics().full_syncs
        await trio.to_thread.run_sync(containerd.kill)
        await trio.sleep(0.3)
        await trio.to_thread.run_sync(containerd.restart)
        await wait_until(lambda: store.statistics().full_syncs > syncs, 10, "a resync")
        assert store.list().keys() == expected_keys(before)
        # The new subscription follows changes made after the restart.
        await import_image(containerd, after, trio.Path(tmp_path))
        await remove_image(containerd, before.name)
        await wait_until(lambda: store.list().keys() == expected_keys(after), 5, "new events")


async def test_unknown_namespace_gives_an_empty_index_and_a_warning(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    await import_image(containerd, build_image("example.com/a:v1", [10]), trio.Path(tmp_path))
    with trio.fail_after(10):
        async with open_containerd(containerd.socket, "not-a-namespace") as client:
            store = ContainerdStore(client, containerd.content_path)
            await store.sync()
    assert store.list().keys() == frozenset()
    (warning,) = store.statistics().warnings
    assert "'not-a-namespace' does not exist" in warning


async def test_documents_are_read_over_grpc_when_the_content_dir_is_unreadable(
    containerd: PrivateContainerd, tmp_path: Path
) -> None:
    image = build_image("example.com/team/grpc:v1", [5000], platforms=[HOST, OTHER], seed=27)
    with trio.fail_after(20):
        await import_image(containerd, image, trio.Path(tmp_path))
        async with open_containerd(containerd.socket, "k8s.io") as client:
            store = ContainerdStore(client, tmp_path / "no-content-dir")
            await store.sync()
            assert not store.statistics().direct_reads
            assert store.list().keys() == expected_keys(image, HOST)
            layer = Digest(image.platform(HOST).layers[0])
            blob = await store.open(layer)
            assert blob.path is None
            assert b"".join([c async for c in blob.chunks]) == image.read_blob(layer)
