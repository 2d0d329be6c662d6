"""The harness itself: the OCI image builder and the private containerd."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from spegeld_harness import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    DOCKER_MEDIA_TYPES,
    OCI_MEDIA_TYPES,
    BuiltImage,
    CtrError,
    HarnessUnavailable,
    PrivateContainerd,
    build_image,
    containerd_unavailable_reason,
    host_platform,
)

HOST = host_platform()
OTHER = "linux/arm64" if HOST != "linux/arm64" else "linux/amd64"

needs_containerd = pytest.mark.containerd  # conftest fails (or skips on request) without it


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- image builder (no containerd) ------------------------------------------------------------


def check_layer(img: BuiltImage, digest: str, size: int, diff_id: str) -> None:
    data = img.read_blob(digest)
    assert sha256(data) == digest
    assert len(data) == img.blobs[digest].size
    raw = gzip.decompress(data)
    assert sha256(raw) == diff_id
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
        assert len(members) == 1
        assert members[0].isfile()
        assert members[0].size == size
        f = tar.extractfile(members[0])
        assert f is not None
        assert len(f.read()) == size


def test_single_platform_oci_image() -> None:
    sizes = [0, 1000, 300_000]
    img = build_image("example.com/team/app:v1", sizes, seed=7)
    assert img.name == "example.com/team/app:v1"
    assert (img.repository, img.tag) == ("example.com/team/app", "v1")
    assert not img.is_index
    assert img.index_digest is None
    assert img.media_type == OCI_MEDIA_TYPES.manifest
    (p,) = img.platforms
    assert p.platform == HOST
    assert img.digest == p.manifest == img.manifests[HOST]
    assert len(p.layers) == len(set(p.layers)) == 3
    assert set(img.blobs) == {p.manifest, p.config, *p.layers} == img.digests(HOST)

    for digest, info in img.blobs.items():
        assert sha256(img.read_blob(digest)) == digest
        assert info.size == len(img.read_blob(digest))

    manifest = img.read_json(p.manifest)
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == OCI_MEDIA_TYPES.manifest
    assert manifest["config"] == {
        "mediaType": OCI_MEDIA_TYPES.config,
        "digest": p.config,
        "size": img.blobs[p.config].size,
    }
    assert [layer["digest"] for layer in manifest["layers"]] == list(p.layers)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {OCI_MEDIA_TYPES.layer}
    assert [layer["size"] for layer in manifest["layers"]] == [img.blobs[d].size for d in p.layers]

    config = img.read_json(p.config)
    os_, arch = HOST.split("/")[:2]
    assert (config["os"], config["architecture"]) == (os_, arch)
    assert config["rootfs"] == {"type": "layers", "diff_ids": list(p.diff_ids)}
    for digest, size, diff_id in zip(p.layers, sizes, p.diff_ids, strict=True):
        check_layer(img, digest, size, diff_id)


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_multi_platform_index(docker: bool) -> None:
    mt = DOCKER_MEDIA_TYPES if docker else OCI_MEDIA_TYPES
    img = build_image(
        "example.com/team/app:v2",
        [500, 2000],
        platforms=["linux/amd64", "linux/arm64", "linux/arm/v7"],
        docker_media_types=docker,
        seed=1,
    )
    assert img.is_index
    assert img.media_type == mt.index
    assert img.blobs[img.digest].media_type == mt.index
    index = img.read_json(img.digest)
    assert index["mediaType"] == mt.index
    assert [(m["digest"], m["platform"]) for m in index["manifests"]] == [
        (img.manifests["linux/amd64"], {"os": "linux", "architecture": "amd64"}),
        (img.manifests["linux/arm64"], {"os": "linux", "architecture": "arm64"}),
        (img.manifests["linux/arm/v7"], {"os": "linux", "architecture": "arm", "variant": "v7"}),
    ]
    all_layers = [d for p in img.platforms for d in p.layers]
    assert len(set(all_layers)) == 6, "every platform has its own layers"
    assert len(set(img.configs.values())) == 3
    assert len(img.blobs) == 1 + 3 * (1 + 1 + 2)
    for p in img.platforms:
        manifest = img.read_json(p.manifest)
        assert manifest["mediaType"] == mt.manifest
        assert manifest["config"]["mediaType"] == mt.config
        assert {layer["mediaType"] for layer in manifest["layers"]} == {mt.layer}
        assert img.blobs[p.manifest].media_type == mt.manifest
        assert img.blobs[p.config].media_type == mt.config
        for digest, size, diff_id in zip(p.layers, [500, 2000], p.diff_ids, strict=True):
            assert img.blobs[digest].media_type == mt.layer
            check_layer(img, digest, size, diff_id)
        assert img.digests(p.platform) == {img.digest, p.manifest, p.config, *p.layers}


def test_seeded_builds_are_deterministic_and_unseeded_unique(tmp_path: Path) -> None:
    a = build_image("example.com/a:v1", [1000, 5000], platforms=[HOST, OTHER], seed=3)
    b = build_image("example.com/a:v1", [1000, 5000], platforms=[HOST, OTHER], seed=3)
    assert a.digest == b.digest
    assert a.blobs == b.blobs
    assert build_image("example.com/a:v1", [1000, 5000], seed=4).digests().isdisjoint(a.blobs)
    u1 = build_image("example.com/a:v1", [1000], seed=None)
    u2 = build_image("example.com/a:v1", [1000], seed=None)
    assert u1.digests().isdisjoint(u2.digests())

    # Streaming to a workdir gives the same blobs, on disk instead of in memory.
    w = build_image(
        "example.com/a:v1", [1000, 5000], platforms=[HOST, OTHER], seed=3, workdir=tmp_path / "w"
    )
    assert w.digest == a.digest
    assert w.blobs == a.blobs
    assert not w.blob_data
    assert set(w.blob_paths) == set(w.blobs)
    for digest, path in w.blob_paths.items():
        assert path == tmp_path / "w" / "blobs" / "sha256" / digest.removeprefix("sha256:")
        assert sha256(path.read_bytes()) == digest
    assert sorted(p.name for p in (tmp_path / "w" / "blobs" / "sha256").iterdir()) == sorted(
        d.removeprefix("sha256:") for d in w.blobs
    ), "no temp files left behind"


def test_names() -> None:
    assert build_image("localhost:5000/app", [10]).name == "localhost:5000/app:latest"
    img = build_image("localhost:5000/team/app:1.2", [10])
    assert (img.repository, img.tag) == ("localhost:5000/team/app", "1.2")
    with pytest.raises(ValueError, match="digest"):
        build_image("example.com/app@sha256:" + "0" * 64, [10])
    with pytest.raises(ValueError, match="platform"):
        build_image("example.com/app:v1", [10], platforms=["amd64"])


@pytest.mark.parametrize("workdir", [False, True], ids=["memory", "workdir"])
def test_oci_archive_layout(tmp_path: Path, workdir: bool) -> None:
    img = build_image(
        "example.com/team/app:v1",
        [1000, 70_000],
        platforms=[HOST, OTHER],
        seed=2,
        workdir=tmp_path / "blobs" if workdir else None,
    )
    archive = img.write_oci_archive(tmp_path / "app.tar")
    with tarfile.open(archive) as tar:
        files = {m.name: m for m in tar.getmembers() if m.isfile()}
        assert set(files) == {"oci-layout", "index.json"} | {
            "blobs/sha256/" + d.removeprefix("sha256:") for d in img.blobs
        }

        def read(name: str) -> bytes:
            f = tar.extractfile(name)
            assert f is not None
            return f.read()

        assert json.loads(read("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(read("index.json"))
        assert index["schemaVersion"] == 2
        assert index["manifests"] == [
            {
                "mediaType": OCI_MEDIA_TYPES.index,
                "digest": img.digest,
                "size": img.size,
                "annotations": {
                    ANNOTATION_IMAGE_NAME: "example.com/team/app:v1",
                    ANNOTATION_REF_NAME: "v1",
                },
            }
        ]
        for digest in img.blobs:
            assert sha256(read("blobs/sha256/" + digest.removeprefix("sha256:"))) == digest

    layout = img.write_oci_layout(tmp_path / "layout")
    assert json.loads((layout / "index.json").read_text()) == index


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_skopeo_reads_the_archive(tmp_path: Path, docker: bool) -> None:
    img = build_image(
        "example.com/team/app:v1", [1000], platforms=[HOST, OTHER], docker_media_types=docker
    )
    archive = img.write_oci_archive(tmp_path / "app.tar")
    refs = [f"oci-archive:{archive}"]
    if not docker:
        # skopeo (containers/image) only matches ":tag" against OCI manifest/index
        # descriptors in index.json; a Docker manifest list is only found untagged.
        refs.append(f"oci-archive:{archive}:v1")
    for ref in refs:
        raw = subprocess.run(
            ["skopeo", "inspect", "--raw", ref], check=True, capture_output=True
        ).stdout
        assert sha256(raw) == img.digest
    if docker:
        return  # an oci: destination would convert Docker media types, changing digests
    # Copying everything to another layout keeps every digest (no manifest rewriting).
    subprocess.run(
        ["skopeo", "copy", "-q", "--all", f"oci-archive:{archive}", f"oci:{tmp_path / 'out'}:v1"],
        check=True,
        capture_output=True,
    )
    copied = {p.name for p in (tmp_path / "out" / "blobs" / "sha256").iterdir()}
    assert copied == {d.removeprefix("sha256:") for d in img.blobs}


# -- private containerd -----------------------------------------------------------------------


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    c = PrivateContainerd(tmp_path, containerd_bin="no-such-containerd-binary")
    with pytest.raises(HarnessUnavailable, match=r"apt-get install -y containerd runc"):
        c.start()
    assert c.pid is None
    assert containerd_unavailable_reason(ctr_bin="no-such-ctr") is not None


def test_long_base_dir_gets_a_short_socket(tmp_path: Path) -> None:
    long_dir = tmp_path / ("x" * 120)
    c = PrivateContainerd(long_dir)
    try:
        assert len(str(c.socket)) < 100
        assert str(c.socket).startswith("/tmp/spg-")
        assert c.root == long_dir / "root"
        assert c.content_path == long_dir / "root" / "io.containerd.content.v1.content"
        sock_dir = c.socket.parent
        assert sock_dir.is_dir()
    finally:
        c.close()
    assert not sock_dir.exists(), "the short socket dir is ours to remove"
    assert long_dir.is_dir(), "the caller's base_dir is not"


@pytest.mark.containerd
@needs_containerd
def test_startup_failure_reports_the_log(tmp_path: Path) -> None:
    c = PrivateContainerd(tmp_path, extra_config="this is [[[ not toml", ready_timeout=5)
    with pytest.raises(RuntimeError, match=r"(?s)containerd exited with .*containerd\.log") as exc:
        c.start()
    assert "toml" in str(exc.value).lower()
    assert c.pid is None
    c.close()


@pytest.mark.containerd
@needs_containerd
def test_lifecycle_context_manager_and_ctr(tmp_path: Path) -> None:
    cni_before = Path("/etc/cni").exists()
    with PrivateContainerd(tmp_path / "node") as c:
        pid = c.pid
        assert pid is not None
        assert pid_alive(pid)
        assert c.socket.is_socket()
        assert c.content_path.is_dir()
        assert c.last_start_seconds is not None
        assert c.last_start_seconds < 10
        assert "Server:" in c.ctr("version")
        assert c.images() == []
        with pytest.raises(CtrError, match="not found") as exc:
            c.ctr("content", "get", "sha256:" + "0" * 64)
        assert exc.value.returncode != 0
        text = (tmp_path / "node" / "config.toml").read_text()
        assert '"io.containerd.grpc.v1.cri"' in text
    assert c.pid is None
    assert not pid_alive(pid)
    assert Path("/etc/cni").exists() == cni_before, "CRI must stay disabled"


@pytest.mark.containerd
def test_import_single_platform(containerd: PrivateContainerd) -> None:
    img = build_image("example.com/team/app:v1", [1000, 200_000, 3], seed=11)
    archive = img.write_oci_archive(containerd.base_dir / "app.tar")
    containerd.import_image(archive)

    assert containerd.images() == ["example.com/team/app:v1"]
    have = containerd.content_digests()
    (p,) = img.platforms
    expected = {p.manifest, p.config, *p.layers}
    assert expected <= have
    for digest in expected:
        path = containerd.blob_path(digest)
        assert path.is_file()
        assert sha256(path.read_bytes()) == digest
    listing = containerd.ctr("images", "ls")
    assert img.digest in listing
    assert OCI_MEDIA_TYPES.manifest in listing

    containerd.remove_image(img.name)
    assert containerd.images() == []
    assert containerd.content_digests().isdisjoint(expected), "sync rm GCs the content"


@pytest.mark.containerd
@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_import_multi_platform_default_takes_host_platform_only(
    containerd: PrivateContainerd, docker: bool
) -> None:
    img = build_image(
        "example.com/team/multi:v1",
        [1000, 50_000],
        platforms=["linux/amd64", "linux/arm64"],
        docker_media_types=docker,
        seed=5,
    )
    archive = img.write_oci_archive(containerd.base_dir / "multi.tar")
    containerd.import_image(archive)  # default platform matcher, then a synchronous GC

    assert containerd.images() == ["example.com/team/multi:v1"]
    have = containerd.content_digests()
    host, other = img.platform(HOST), img.platform(OTHER)
    assert img.digest in have, "the index itself is kept"
    assert {host.manifest, host.config, *host.layers} <= have
    assert have.isdisjoint({other.manifest, other.config, *other.layers})
    assert not containerd.blob_path(other.layers[0]).exists()
    # The image still points at the full index, which names a platform we don't have.
    listing = containerd.ctr("images", "ls")
    assert img.digest in listing
    assert img.media_type in listing
    assert "linux/amd64,linux/arm64" in listing


@pytest.mark.containerd
def test_import_explicit_platform_and_all_platforms(containerd: PrivateContainerd) -> None:
    img = build_image(
        "example.com/team/multi:v2", [1000], platforms=["linux/amd64", "linux/arm64"], seed=6
    )
    archive = img.write_oci_archive(containerd.base_dir / "multi.tar")
    host, other = img.platform(HOST), img.platform(OTHER)

    containerd.import_image(archive, platform=OTHER)
    have = containerd.content_digests()
    assert {img.digest, other.manifest, other.config, *other.layers} <= have
    assert have.isdisjoint({host.manifest, host.config, *host.layers})

    containerd.import_image(archive, all_platforms=True)
    assert set(img.blobs) <= containerd.content_digests()

    with pytest.raises(ValueError, match="mutually exclusive"):
        containerd.import_image(archive, all_platforms=True, platform=OTHER)


@pytest.mark.containerd
def test_import_with_unpack(containerd: PrivateContainerd) -> None:
    img = build_image("example.com/team/unpacked:v1", [1000, 4000], seed=8)
    out = containerd.import_image(
        img.write_oci_archive(containerd.base_dir / "u.tar"), no_unpack=False
    )
    assert "unpacking example.com/team/unpacked:v1" in out
    snapshots = containerd.ctr("snapshots", "ls")
    assert img.platforms[0].diff_ids[0] in snapshots  # the first chain ID is the diff ID
    assert {img.digest, img.platforms[0].config} <= containerd.content_digests()


@pytest.mark.containerd
def test_kill_and_restart_keep_content(containerd: PrivateContainerd) -> None:
    img = build_image("example.com/team/persist:v1", [1000, 30_000], seed=9)
    containerd.import_image(img.write_oci_archive(containerd.base_dir / "p.tar"))
    socket_before, pid_before = containerd.socket, containerd.pid
    assert pid_before is not None

    containerd.kill()
    assert containerd.pid is None
    assert not pid_alive(pid_before)
    with pytest.raises(CtrError):
        containerd.ctr("version", timeout=10)
    assert all(containerd.blob_path(d).is_file() for d in img.blobs), "blobs stay on disk"

    containerd.restart()
    assert containerd.socket == socket_before
    assert containerd.pid not in (None, pid_before)
    assert containerd.images() == [img.name]
    assert set(img.blobs) <= containerd.content_digests()

    containerd.restart()  # a graceful stop + start, too
    assert containerd.images() == [img.name]
    assert set(img.blobs) <= containerd.content_digests()


@pytest.mark.containerd
def test_two_nodes_are_independent(containerd: PrivateContainerd, tmp_path: Path) -> None:
    img = build_image("example.com/team/one:v1", [100], seed=10)
    with PrivateContainerd(tmp_path / "second") as second:
        assert second.socket != containerd.socket
        second.import_image(img.write_oci_archive(tmp_path / "one.tar"))
        assert second.images() == [img.name]
        assert containerd.images() == []
        assert not containerd.content_digests() & set(img.blobs)
