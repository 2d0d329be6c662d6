"""Where built blobs come from and go: random layer tars, gzip'd and hashed as they stream.

Blobs are kept in memory, or streamed to ``<workdir>/blobs/sha256/<hex>`` (an OCI
image-layout directory) so layers of hundreds of MiB never sit in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final, Protocol

__all__ = ["BlobSink", "canonical_json", "layer_rng", "sha256_digest"]

_CHUNK: Final = 1 << 20  # random bytes are generated and written 1 MiB at a time
_BLOCK: Final = 512  # a tar block
_RECORD: Final = 20 * _BLOCK  # a tar record: GNU and Go pad archives to whole records


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _Writer(Protocol):
    def write(self, b: bytes, /) -> object: ...


class _HashingWriter:
    """Write-through to ``sink``, hashing and counting the bytes (a GzipFile fileobj)."""

    def __init__(self, sink: _Writer) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes, /) -> int:
        self.hash.update(b)
        self.size += len(b)
        self._sink.write(b)
        return len(b)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _random_chunks(rng: random.Random, size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        n = min(left, _CHUNK)
        yield rng.randbytes(n)
        left -= n


def _write_layer_tar(out: _Writer, filename: str, rng: random.Random, size: int) -> None:
    """A POSIX tar with one regular file of ``size`` random bytes (ustar/pax, mtime 0)."""
    info = tarfile.TarInfo(filename)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    out.write(header)
    for chunk in _random_chunks(rng, size):
        out.write(chunk)
    written = len(header) + size
    pad = (-size) % _BLOCK
    end = 2 * _BLOCK
    written += pad + end
    record_pad = (-written) % _RECORD
    out.write(b"\0" * (pad + end + record_pad))


class BlobSink:
    """Where built blobs go: memory, or ``<workdir>/blobs/sha256``."""

    def __init__(self, workdir: Path | None) -> None:
        self.data: dict[str, bytes] = {}
        self.paths: dict[str, Path] = {}
        self.blob_dir: Path | None = None
        if workdir is not None:
            self.blob_dir = Path(workdir) / "blobs" / "sha256"
            self.blob_dir.mkdir(parents=True, exist_ok=True)

    def put_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        if self.blob_dir is None:
            self.data[digest] = data
        else:
            path = self.blob_dir / digest.removeprefix("sha256:")
            if not path.exists():
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            self.paths[digest] = path
        return digest

    def put_layer(
        self, filename: str, rng: random.Random, size: int, compresslevel: int
    ) -> tuple[str, str, int]:
        """Build one layer; returns (digest, diff_id, compressed size)."""
        if self.blob_dir is None:
            buf = io.BytesIO()
            digest, diff_id, csize = self._gzip_layer(buf, filename, rng, size, compresslevel)
            self.data[digest] = buf.getvalue()
            return digest, diff_id, csize
        fd, tmp_name = tempfile.mkstemp(prefix=".layer-", dir=self.blob_dir)
        tmp = Path(tmp_name)
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                digest, diff_id, csize = self._gzip_layer(f, filename, rng, size, compresslevel)
            path = self.blob_dir / digest.removeprefix("sha256:")
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.paths[digest] = path
        return digest, diff_id, csize

    @staticmethod
    def _gzip_layer(
        out: IO[bytes], filename: str, rng: random.Random, size: int, compresslevel: int
    ) -> tuple[str, str, int]:
        compressed = _HashingWriter(out)
        with gzip.GzipFile(
            filename="", fileobj=compressed, mode="wb", compresslevel=compresslevel, mtime=0
        ) as gz:
            uncompressed = _HashingWriter(gz)
            _write_layer_tar(uncompressed, filename, rng, size)
        return compressed.digest, uncompressed.digest, compressed.size


def layer_rng(seed: int | None, name: str, platform: str, index: int) -> random.Random:
    if seed is None:
        return random.Random(int.from_bytes(os.urandom(32), "big"))
    key = f"{seed}\0{name}\0{platform}\0{index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest(), "big"))
