"""Build real OCI / Docker images (random layers) and write them as OCI image-layout archives.

Plain synchronous stdlib code: usable from sync fixtures, scripts and trio tests alike.

Layers are gzip'd tars holding one file of random bytes of the requested size.  With ``seed``
the whole image is deterministic (same seed, name and layout => same digests); without it every
build is unique.  Blobs are kept in memory unless ``workdir`` is given, in which case they are
streamed to ``<workdir>/blobs/sha256/<hex>`` (``_blobs``: the layer builder); ``_oci_layout``
writes the archives.
"""

from __future__ import annotations

import io
import json
import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from spegeld_harness import _oci_layout
from spegeld_harness._blobs import BlobSink, canonical_json, layer_rng

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
        sizes = {digest: info.size for digest, info in self.blobs.items()}
        return _oci_layout.write_archive(Path(path), self._layout_index(), sizes, self.open_blob)

    def write_oci_layout(self, directory: Path | str) -> Path:
        """Write an OCI image-layout directory (``skopeo ... oci:DIR:TAG``); returns it."""
        return _oci_layout.write_directory(
            Path(directory), self._layout_index(), self.blob_paths, self.blob_data
        )


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
    sink = BlobSink(Path(workdir) if workdir is not None else None)
    blobs: dict[str, BlobInfo] = {}

    def put_json(obj: Any, media_type: str) -> tuple[str, int]:
        data = canonical_json(obj)
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
            rng = layer_rng(seed, full_name, plat, i)
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
