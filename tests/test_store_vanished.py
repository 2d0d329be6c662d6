"""A blob that leaves containerd's content store while the store serves it is NotFound.

containerd's GC deletes files at any moment (a removed image, a failed pull's lease): the
store looks a blob up, then opens its file. Between the two the file may go; the reader
then raises ``NotFound`` (the mirror answers 404 or asks a peer), never a bare
``FileNotFoundError`` (a 500 and an error in the log: seen in the 2.3 chaos soak for a
manifest whose image the rollout had just removed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from spegeld_harness import PrivateContainerd, build_image

from spegeld.containerd import open_containerd
from spegeld.errors import NotFound
from spegeld.oci import Digest
from spegeld.store import ContainerdStore

from ._support import expected_keys, import_image, remove_image, wait_until

pytestmark = [pytest.mark.containerd]


@pytest.fixture
async def store(any_containerd: PrivateContainerd) -> AsyncIterator[ContainerdStore]:
    async with open_containerd(any_containerd.socket, any_containerd.namespace) as client:
        running = ContainerdStore(client, any_containerd.content_path, resync_interval=60)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                await nursery.start(running.run)
            yield running
            nursery.cancel_scope.cancel()


async def test_a_file_removed_between_lookup_and_read_is_not_found(
    any_containerd: PrivateContainerd, store: ContainerdStore, tmp_path: Path
) -> None:
    image = build_image("example.com/team/gone:v1", [3000], seed=31)
    manifest = Digest(image.platforms[0].manifest)
    with trio.fail_after(30):
        await import_image(any_containerd, image, trio.Path(tmp_path))
        await wait_until(lambda: store.list().keys() == expected_keys(image), 5, "the image")
        blob = await store.open(manifest)  # looked up: its file is there
        assert blob.path is not None
        await remove_image(any_containerd, image.name)  # --sync: the GC deletes the files
        assert not blob.path.exists()
        with pytest.raises(NotFound):
            async for _ in blob.chunks:
                pass
