"""Writing an image as an OCI image layout: a tar archive, or a directory.

Both hold ``oci-layout``, ``index.json`` (given by the caller: one descriptor for the top
object) and ``blobs/sha256/<hex>``.  Entries get mode 0644/0755 and mtime 0, so the same
image always makes the same archive.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Final

__all__ = ["write_archive", "write_directory"]

_OCI_LAYOUT: Final = b'{"imageLayoutVersion":"1.0.0"}'


def write_archive(
    path: Path,
    index_json: bytes,
    sizes: Mapping[str, int],
    open_blob: Callable[[str], IO[bytes]],
) -> Path:
    """An OCI image-layout tar at ``path`` with the blobs ``sizes`` names, streamed."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", _OCI_LAYOUT)
        _add_bytes(tar, "index.json", index_json)
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        for digest, size in sorted(sizes.items()):
            member = "blobs/sha256/" + digest.removeprefix("sha256:")
            with open_blob(digest) as f:
                tar.addfile(_tarinfo(member, size), f)
    return path


def write_directory(
    directory: Path,
    index_json: bytes,
    blob_paths: Mapping[str, Path],
    blob_data: Mapping[str, bytes],
) -> Path:
    """An OCI image-layout directory: blobs copied from disk or written from memory."""
    blob_dir = directory / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_bytes(_OCI_LAYOUT)
    (directory / "index.json").write_bytes(index_json)
    for digest in (*blob_paths, *blob_data):
        dest = blob_dir / digest.removeprefix("sha256:")
        if digest in blob_paths:
            src = blob_paths[digest]
            if src.resolve() == dest.resolve():
                continue
            shutil.copyfile(src, dest)
        else:
            dest.write_bytes(blob_data[digest])
    return directory


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    ti.mtime = 0
    tar.addfile(ti)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0
    return ti
