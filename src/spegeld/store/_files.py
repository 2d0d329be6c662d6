"""Serving blobs from their files in containerd's content directory (for sendfile).

Decided per blob when it is served, never once at start: on a fresh node the blobs
directory appears only with the first pull, and containerd may move its root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from spegeld.errors import NotFound
from spegeld.oci import Digest, digest_hex

CHUNK_SIZE = 1024 * 1024


def readable_file(blobs_dir: Path, digest: Digest, size: int | None = None) -> Path | None:
    """``blobs/sha256/<hex>`` when it is a readable regular file of the expected size.

    One stat and one access per blob served: cheap next to the body, and it is what
    lets a store started before the directory existed use files once they appear.
    A file of another size is not the blob the index describes (a content path that
    belongs to another containerd, or a truncated file): stream it over gRPC instead.
    """
    if not digest.startswith("sha256:"):
        return None
    path = blobs_dir / digest_hex(digest)
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
        return None
    return path if os.access(path, os.R_OK) else None


async def no_chunks() -> AsyncIterator[bytes]:
    return
    yield


async def file_chunks(path: Path, offset: int, length: int | None) -> AsyncIterator[bytes]:
    remaining = length
    try:
        opened = await trio.open_file(path, "rb")
    except FileNotFoundError as exc:  # the GC took it since it was looked up; an open file stays
        raise NotFound(f"{path.name} left the content store while being opened") from exc
    async with opened as f:
        await f.seek(offset)
        while remaining is None or remaining > 0:
            want = CHUNK_SIZE if remaining is None else min(CHUNK_SIZE, remaining)
            chunk = await f.read(want)
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
