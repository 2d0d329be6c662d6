"""Helpers shared by tests: bounded waits and image plumbing."""

from __future__ import annotations

from collections.abc import Callable

import trio

from spegeld.harness import BuiltImage, PrivateContainerd
from spegeld.oci import Digest, parse_reference

POLL = 0.01  # seconds between checks of a condition that events make true


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition()`` holds; return how long it took, or fail after ``timeout``."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(POLL)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def expected_keys(image: BuiltImage, platform: str | None = None) -> set[str]:
    tag_key = parse_reference(image.name).tag_key()
    assert tag_key is not None
    return image.digests(platform) | {tag_key}


async def import_image(node: PrivateContainerd, image: BuiltImage, tmp: trio.Path) -> None:
    archive = await trio.to_thread.run_sync(image.write_oci_archive, tmp / "image.tar")
    await trio.to_thread.run_sync(node.import_image, archive)


async def remove_image(node: PrivateContainerd, name: str) -> None:
    await trio.to_thread.run_sync(node.remove_image, name)


def memory_blobs(image: BuiltImage) -> dict[Digest, tuple[str, bytes]]:
    return {Digest(d): (info.media_type, image.read_blob(d)) for d, info in image.blobs.items()}
