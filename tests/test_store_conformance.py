"""One conformance suite for the Store seam, run against the in-memory twin and real containerd."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import pytest
import trio
from spegeld_harness import BuiltImage, PrivateContainerd, build_image

from spegeld.containerd import open_containerd
from spegeld.errors import NotFound
from spegeld.oci import Digest, parse_reference
from spegeld.store import ContainerdStore, KeysChanged, MemoryStore, Store

from ._support import expected_keys, import_image, memory_blobs, remove_image, wait_until

EVENT_TIMEOUT = 5.0


class Driver(Protocol):
    store: Store

    async def add(self, image: BuiltImage) -> None: ...
    async def remove(self, name: str) -> None: ...


class MemoryDriver:
    def __init__(self) -> None:
        self.memory = MemoryStore()
        self.store: Store = self.memory

    async def add(self, image: BuiltImage) -> None:
        tag_key = parse_reference(image.name).tag_key()
        assert tag_key is not None
        self.memory.add_image(image.name, memory_blobs(image), {tag_key: Digest(image.digest)})

    async def remove(self, name: str) -> None:
        self.memory.remove_image(name)


class ContainerdDriver:
    def __init__(self, node: PrivateContainerd, store: ContainerdStore, tmp: Path) -> None:
        self.node, self.store, self.tmp = node, store, trio.Path(tmp)

    async def add(self, image: BuiltImage) -> None:
        await import_image(self.node, image, self.tmp)
        want = expected_keys(image)
        await wait_until(lambda: want <= self.store.list().keys(), EVENT_TIMEOUT, "import event")
        # containerd 2.1+: blobs are held from their /content/create event, and the import
        # commits its archive's index, which the GC then takes silently; the store drops
        # it on its loose-blob recheck (LOOSE_RECHECK_DELAY after the image event).
        await wait_until(
            lambda: self.store.statistics().loose_blobs == 0, EVENT_TIMEOUT, "import's leftovers"
        )

    async def remove(self, name: str) -> None:
        await remove_image(self.node, name)
        key = parse_reference(name).tag_key()
        await wait_until(lambda: key not in self.store.list().tags, EVENT_TIMEOUT, "delete event")


@pytest.fixture(
    params=[
        "memory",
        pytest.param("containerd", marks=pytest.mark.containerd),
        pytest.param("containerd2", marks=[pytest.mark.containerd, pytest.mark.containerd2]),
    ]
)
async def driver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver]:
    if request.param == "memory":
        yield MemoryDriver()
        return
    # "containerd": Debian's 1.6; "containerd2": the 2.3 built by scripts/build-components.
    node: PrivateContainerd = request.getfixturevalue(request.param)
    async with open_containerd(node.socket, node.namespace) as client:
        store = ContainerdStore(client, node.content_path)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(store.run)
            yield ContainerdDriver(node, store, tmp_path)
            nursery.cancel_scope.cancel()


def _image(name: str, sizes: list[int], seed: int) -> BuiltImage:
    return build_image(name, sizes, seed=seed)


async def test_an_added_image_is_indexed_exactly(driver: Driver) -> None:
    with trio.fail_after(20):
        image = _image("example.com/team/app:v1", [3000, 5000], seed=1)
        assert driver.store.list().keys() == frozenset()
        await driver.add(image)
        assert driver.store.list().keys() == expected_keys(image)
        for digest, info in image.blobs.items():
            desc = driver.store.descriptor(Digest(digest))
            assert (desc.media_type, desc.size) == (info.media_type, info.size)
        assert driver.store.resolve("example.com/team/app:v1") == image.digest


async def test_open_returns_the_blob_bytes_and_ranges(driver: Driver) -> None:
    with trio.fail_after(20):
        image = _image("example.com/team/app:v1", [300_000], seed=2)
        await driver.add(image)
        layer = Digest(next(iter(image.layers.values()))[0])
        data = image.read_blob(layer)
        whole = await driver.store.open(layer)
        got = b"".join([chunk async for chunk in whole.chunks])
        assert hashlib.sha256(got).hexdigest() == layer.removeprefix("sha256:")
        part = await driver.store.open(layer, offset=1000, length=70_000)
        assert b"".join([chunk async for chunk in part.chunks]) == data[1000:71_000]
        tail = await driver.store.open(layer, offset=len(data) - 10)
        assert b"".join([chunk async for chunk in tail.chunks]) == data[-10:]


async def test_unknown_content_is_not_found(driver: Driver) -> None:
    missing = Digest("sha256:" + "0" * 64)
    with pytest.raises(NotFound):
        driver.store.descriptor(missing)
    with pytest.raises(NotFound):
        await driver.store.open(missing)
    with pytest.raises(NotFound):
        driver.store.resolve("example.com/none:v1")


async def test_watch_sees_the_snapshot_then_every_change(driver: Driver) -> None:
    with trio.fail_after(20):
        first = _image("example.com/team/one:v1", [1000, 2000], seed=3)
        second = _image("example.com/team/two:v1", [4000], seed=4)
        await driver.add(first)
        async with driver.store.watch() as (snapshot, changes):
            assert snapshot.keys() == expected_keys(first)
            await driver.add(second)
            await driver.remove(first.name)
            seen = set(snapshot.keys())
            while seen != expected_keys(second):
                change: KeysChanged = await changes.receive()
                seen = (seen - change.removed) | change.added
        assert driver.store.list().keys() == expected_keys(second)


async def test_shared_layers_stay_until_the_last_image_goes(driver: Driver) -> None:
    with trio.fail_after(20):
        a = _image("example.com/team/shared:a", [5000], seed=5)
        b = dataclasses.replace(a, name="example.com/team/shared:b")  # same blobs, two names
        shared = a.digests()
        await driver.add(a)
        await driver.add(b)
        await driver.remove(a.name)
        keys = driver.store.list().keys()
        assert shared <= keys
        assert "example.com/team/shared:a" not in keys
        await driver.remove(b.name)
        assert driver.store.list().keys() == frozenset()
