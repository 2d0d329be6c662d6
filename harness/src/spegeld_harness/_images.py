"""Build real OCI / Docker images (random layers) and write them as OCI image-layout archives.

Plain synchronous stdlib code: usable from sync fixtures, scripts and trio tests alike.

Layers are gzip'd tars holding one file of random bytes of the requested size.  With ``seed``
the whole image is deterministic (same seed, name and layout => same digests); without it every
build is unique.  Blobs are kept in memory unless ``workdir`` is given, in which case they are
streamed to ``<workdir>/blobs/sha256/<hex>`` (an OCI image-layout directory) so layers of
hundreds of MiB never sit in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol

__all__ = [
    "ANNOTATION_IMAGE_NAME",
    "ANNOTATION_REF_NAME",
    "BlobInfo",
    "BuiltImage",
    "MediaTypes",
    "PlatformImage",
    "build_image",
    "host_platform",
    "split_name",
    "DOCKER_MEDIA_TYPES",
    "OCI_MEDIA_TYPES",
]

_CHUNK: Final = 1 << 20
_BLOCK: Final = 512
_RECORD: Final = 20 * _BLOCK
# Fixed timestamp so seeded builds are byte-for-byte reproducible.
_CREATED: Final = "1970-01-01T00:00:00Z"

ANNOTATION_IMAGE_NAME: Final = "io.containerd.image.name"
ANNOTATION_REF_NAME: Final = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class MediaTypes:
    """The four media types an image is made of."""

    index: str
    manifest: str
    config: str
    layer: str


OCI_MEDIA_TYPES: Final = MediaTypes(
    index="application/vnd.oci.image.index.v1+json",
    manifest="application/vnd.oci.image.manifest.v1+json",
    config="application/vnd.oci.image.config.v1+json",
    layer="application/vnd.oci.image.layer.v1.tar+gzip",
)
DOCKER_MEDIA_TYPES: Final = MediaTypes(
    index="application/vnd.docker.distribution.manifest.list.v2+json",
    manifest="application/vnd.docker.distribution.manifest.v2+json",
    config="application/vnd.docker.container.image.v1+json",
    layer="application/vnd.docker.image.rootfs.diff.tar.gzip",
)


@dataclass(frozen=True)
class BlobInfo:
    """What a descriptor needs to know about a blob."""

    media_type: str
    size: int


@dataclass(frozen=True)
class PlatformImage:
    """One platform's manifest, config and layers."""

    platform: str  # "linux/amd64", "linux/arm/v7"
    manifest: str  # digest
    config: str  # digest
    layers: tuple[str, ...]  # compressed layer digests, in manifest order
    diff_ids: tuple[str, ...]  # sha256 of the uncompressed layer tars


_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm/v7",
    "armv6l": "arm/v6",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_platform() -> str:
    """The host's platform as containerd's default matcher sees it, e.g. ``linux/amd64``."""
    machine = _platform.machine().lower()
    return f"linux/{_GOARCH.get(machine, machine)}"


def _platform_json(spec: str) -> dict[str, str]:
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must look like os/arch[/variant], got {spec!r}")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


def split_name(name: str) -> tuple[str, str]:
    """``example.com:5000/team/app:v1`` -> (``example.com:5000/team/app``, ``v1``)."""
    if "@" in name:
        raise ValueError(f"image name must be tagged, not pinned by digest: {name!r}")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        repo, tag = name[:colon], name[colon + 1 :]
    else:
        repo, tag = name, "latest"
    if not repo or not _TAG_RE.match(tag):
        raise ValueError(f"bad image name {name!r}")
    return repo, tag


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(obj: Any) -> bytes:
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


class _BlobSink:
    """Where built blobs go: memory, or ``<workdir>/blobs/sha256``."""

    def __init__(self, workdir: Path | None) -> None:
        self.data: dict[str, bytes] = {}
        self.paths: dict[str, Path] = {}
        self.blob_dir: Path | None = None
        if workdir is not None:
            self.blob_dir = Path(workdir) / "blobs" / "sha256"
            self.blob_dir.mkdir(parents=True, exist_ok=True)

    def put_bytes(self, data: bytes) -> str:
        digest = _sha256(data)
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


@dataclass(frozen=True)
class BuiltImage:
    """A built image: every blob, and which digest is what.

    ``blobs`` maps every digest (top object, manifests, configs, layers) to its media type and
    size.  Blob bytes live either in memory (``blob_data``) or on disk (``blob_paths``).
    """

    name: str  # full reference, always tagged: "example.com/team/app:v1"
    digest: str  # the top object: the index if there is one, else the manifest
    media_type: str  # media type of the top object
    size: int  # size of the top object
    platforms: tuple[PlatformImage, ...]
    blobs: Mapping[str, BlobInfo]
    blob_data: Mapping[str, bytes]
    blob_paths: Mapping[str, Path]
    media_types: MediaTypes

    # -- convenience views --------------------------------------------------------------------

    @property
    def repository(self) -> str:
        return split_name(self.name)[0]

    @property
    def tag(self) -> str:
        return split_name(self.name)[1]

    @property
    def is_index(self) -> bool:
        return self.media_type == self.media_types.index

    @property
    def index_digest(self) -> str | None:
        return self.digest if self.is_index else None

    @property
    def manifests(self) -> dict[str, str]:
        """platform -> manifest digest."""
        return {p.platform: p.manifest for p in self.platforms}

    @property
    def configs(self) -> dict[str, str]:
        """platform -> config digest."""
        return {p.platform: p.config for p in self.platforms}

    @property
    def layers(self) -> dict[str, tuple[str, ...]]:
        """platform -> layer digests."""
        return {p.platform: p.layers for p in self.platforms}

    def platform(self, spec: str) -> PlatformImage:
        for p in self.platforms:
            if p.platform == spec:
                return p
        raise KeyError(f"{self.name} has no platform {spec!r} (has {list(self.manifests)})")

    def digests(self, platform: str | None = None) -> set[str]:
        """Every blob digest, or those one platform needs (including the index, if any)."""
        if platform is None:
            return set(self.blobs)
        p = self.platform(platform)
        out = {p.manifest, p.config, *p.layers}
        if self.is_index:
            out.add(self.digest)
        return out

    def descriptor(self) -> dict[str, Any]:
        """OCI descriptor of the top object."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    # -- blob access ----------------------------------------------------------------------------

    def open_blob(self, digest: str) -> IO[bytes]:
        if digest in self.blob_data:
            return io.BytesIO(self.blob_data[digest])
        if digest in self.blob_paths:
            return self.blob_paths[digest].open("rb")
        raise KeyError(digest)

    def read_blob(self, digest: str) -> bytes:
        """The blob's bytes (reads the whole blob into memory: careful with big layers)."""
        with self.open_blob(digest) as f:
            return f.read()

    def read_json(self, digest: str) -> Any:
        return json.loads(self.read_blob(digest))

    # -- OCI image layout -----------------------------------------------------------------------

    def _layout_index(self) -> bytes:
        desc = self.descriptor()
        desc["annotations"] = {ANNOTATION_IMAGE_NAME: self.name, ANNOTATION_REF_NAME: self.tag}
        return json.dumps({"schemaVersion": 2, "manifests": [desc]}, indent=None).encode()

    def write_oci_archive(self, path: Path | str) -> Path:
        """Write an OCI image-layout tar (``ctr images import`` / ``skopeo oci-archive:``).

        Contains ``oci-layout``, ``index.json`` (one descriptor for the top object, annotated
        with ``io.containerd.image.name`` = full name and ``org.opencontainers.image.ref.name``
        = tag) and ``blobs/sha256/<hex>``.  Streams blobs from disk; returns ``path``.
        """
        path = Path(path)
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            self._add_bytes(tar, "oci-layout", _OCI_LAYOUT)
            self._add_bytes(tar, "index.json", self._layout_index())
            self._add_dir(tar, "blobs")
            self._add_dir(tar, "blobs/sha256")
            for digest, info in sorted(self.blobs.items()):
                member = "blobs/sha256/" + digest.removeprefix("sha256:")
                ti = _tarinfo(member, info.size)
                with self.open_blob(digest) as f:
                    tar.addfile(ti, f)
        return path

    def write_oci_layout(self, directory: Path | str) -> Path:
        """Write an OCI image-layout directory (``skopeo ... oci:DIR:TAG``); returns it."""
        directory = Path(directory)
        blob_dir = directory / "blobs" / "sha256"
        blob_dir.mkdir(parents=True, exist_ok=True)
        (directory / "oci-layout").write_bytes(_OCI_LAYOUT)
        (directory / "index.json").write_bytes(self._layout_index())
        for digest in self.blobs:
            dest = blob_dir / digest.removeprefix("sha256:")
            if digest in self.blob_paths:
                src = self.blob_paths[digest]
                if src.resolve() == dest.resolve():
                    continue
                shutil.copyfile(src, dest)
            else:
                dest.write_bytes(self.blob_data[digest])
        return directory

    @staticmethod
    def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))

    @staticmethod
    def _add_dir(tar: tarfile.TarFile, name: str) -> None:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
        ti.mtime = 0
        tar.addfile(ti)


_OCI_LAYOUT: Final = b'{"imageLayoutVersion":"1.0.0"}'


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0
    return ti


def _layer_rng(seed: int | None, name: str, platform: str, index: int) -> random.Random:
    if seed is None:
        return random.Random(int.from_bytes(os.urandom(32), "big"))
    key = f"{seed}\0{name}\0{platform}\0{index}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest(), "big"))


def build_image(
    name: str,
    layer_sizes: list[int],
    *,
    platforms: list[str] | None = None,
    docker_media_types: bool = False,
    seed: int | None = None,
    workdir: Path | str | None = None,
    index: bool | None = None,
    compresslevel: int = 1,
) -> BuiltImage:
    """Build an image with one random layer per entry of ``layer_sizes`` (uncompressed bytes).

    ``platforms`` defaults to ``[host_platform()]``.  With more than one platform (or
    ``index=True``) the top object is a multi-platform index (an OCI index, or a Docker
    manifest list with ``docker_media_types``), with one manifest per platform, each with its
    own config and distinct layers.  ``seed`` makes the build deterministic (the seed, name and
    platform all feed the layer bytes).  ``workdir`` streams blobs to
    ``<workdir>/blobs/sha256/`` instead of holding them in memory (use it for big layers).
    ``compresslevel`` 1 is the default; 0 ("stored" deflate, still valid gzip) is ~15x faster
    for big random layers, which don't compress anyway.
    """
    if any(s < 0 for s in layer_sizes):
        raise ValueError("layer sizes must be >= 0")
    repo, tag = split_name(name)
    full_name = f"{repo}:{tag}"
    plats = list(platforms) if platforms else [host_platform()]
    if len(set(plats)) != len(plats):
        raise ValueError(f"duplicate platforms: {plats}")
    use_index = len(plats) > 1 if index is None else index
    if not use_index and len(plats) > 1:
        raise ValueError("more than one platform needs an index")
    mt = DOCKER_MEDIA_TYPES if docker_media_types else OCI_MEDIA_TYPES
    sink = _BlobSink(Path(workdir) if workdir is not None else None)
    blobs: dict[str, BlobInfo] = {}

    def put_json(obj: Any, media_type: str) -> tuple[str, int]:
        data = _canonical_json(obj)
        digest = sink.put_bytes(data)
        blobs[digest] = BlobInfo(media_type, len(data))
        return digest, len(data)

    built: list[PlatformImage] = []
    manifest_descs: list[dict[str, Any]] = []
    for plat in plats:
        pjson = _platform_json(plat)
        layer_descs: list[dict[str, Any]] = []
        digests: list[str] = []
        diff_ids: list[str] = []
        for i, size in enumerate(layer_sizes):
            rng = _layer_rng(seed, full_name, plat, i)
            filename = f"spegeld/{plat.replace('/', '-')}/layer-{i}.bin"
            digest, diff_id, csize = sink.put_layer(filename, rng, size, compresslevel)
            blobs[digest] = BlobInfo(mt.layer, csize)
            layer_descs.append({"mediaType": mt.layer, "digest": digest, "size": csize})
            digests.append(digest)
            diff_ids.append(diff_id)
        config = {
            **pjson,
            "created": _CREATED,
            "config": {"Labels": {"spegeld.test/image": full_name}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": _CREATED, "created_by": f"spegeld harness layer {i}"}
                for i in range(len(layer_sizes))
            ],
        }
        config_digest, config_size = put_json(config, mt.config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": mt.manifest,
            "config": {"mediaType": mt.config, "digest": config_digest, "size": config_size},
            "layers": layer_descs,
        }
        manifest_digest, manifest_size = put_json(manifest, mt.manifest)
        built.append(
            PlatformImage(plat, manifest_digest, config_digest, tuple(digests), tuple(diff_ids))
        )
        manifest_descs.append(
            {
                "mediaType": mt.manifest,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": pjson,
            }
        )

    if use_index:
        top_digest, top_size = put_json(
            {"schemaVersion": 2, "mediaType": mt.index, "manifests": manifest_descs}, mt.index
        )
        top_type = mt.index
    else:
        top_digest, top_type = built[0].manifest, mt.manifest
        top_size = blobs[top_digest].size

    return BuiltImage(
        name=full_name,
        digest=top_digest,
        media_type=top_type,
        size=top_size,
        platforms=tuple(built),
        blobs=blobs,
        blob_data=sink.data,
        blob_paths=sink.paths,
        media_types=mt,
    )
