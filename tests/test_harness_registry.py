"""The upstream registry harness: a real Distribution registry, pushes, pulls through ctr."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from spegeld_harness import (
    BuiltImage,
    PrivateContainerd,
    UpstreamError,
    UpstreamRegistry,
    build_image,
    default_repository,
    host_platform,
    parse_access_log,
    registry_unavailable_reason,
)

HOST = host_platform()
OTHER = "linux/arm64" if HOST != "linux/arm64" else "linux/amd64"
# Distribution negotiates manifests by Accept: ask for every type we push.
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def registry_pids(config: Path) -> list[int]:
    """PIDs of any process still running a registry on ``config`` (ours only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in argv and b"serve" in argv:
            pids.append(int(entry.name))
    return pids


def _require_registry() -> None:
    reason = registry_unavailable_reason()
    if reason is not None:
        if os.environ.get("SPEGELD_ALLOW_SKIP") == "1":
            pytest.skip(reason)
        pytest.fail(f"{reason} (set SPEGELD_ALLOW_SKIP=1 to skip these tests)")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[UpstreamRegistry]:
    """A started registry under tmp_path; afterwards, no registry process of ours is left."""
    _require_registry()
    reg = UpstreamRegistry(tmp_path / "registry", ready_timeout=10.0)
    try:
        reg.start()
        yield reg
    finally:
        reg.close()
        assert registry_pids(reg.config_path) == []


def multi_platform(name: str, *, docker: bool = False) -> BuiltImage:
    return build_image(name, [1000, 150_000], platforms=[HOST, OTHER], docker_media_types=docker)


def verify_pushed(reg: UpstreamRegistry, img: BuiltImage, repo: str, tag: str) -> None:
    """Every object of ``img`` is in ``reg`` under ``repo`` with its own digest."""
    r = reg.request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
    assert r.status == 200, r.body
    assert r.header("Docker-Content-Digest") == img.digest
    assert r.header("Content-Type") == img.media_type
    assert r.body == img.read_blob(img.digest)
    manifests = {p.manifest for p in img.platforms}
    for digest in manifests:
        r = reg.request("GET", f"/v2/{repo}/manifests/{digest}", headers={"Accept": ACCEPT})
        assert r.status == 200, r.body
        assert r.header("Docker-Content-Digest") == digest
        assert r.header("Content-Type") == img.media_types.manifest
        assert sha256(r.body) == digest
    for digest, info in img.blobs.items():
        if digest in manifests or digest == img.digest:
            continue
        r = reg.request("GET", f"/v2/{repo}/blobs/{digest}")
        assert r.status == 200, (digest, r.body)
        assert sha256(r.body) == digest
        assert len(r.body) == info.size


# -- no registry process ----------------------------------------------------------------------


def test_parse_access_log_real_lines() -> None:
    # Copied from a Distribution 2.8.2 log: logrus lines are skipped, access lines parsed.
    text = (
        'time="2026-11-27T03:25:44.959391043Z" level=info msg="response completed" '
        "http.request.method=GET http.request.uri=/v2/ http.response.status=200\n"
        '127.0.0.1 - - [27/Nov/2026:03:25:44 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"\n'
        '127.0.0.1 - - [27/Nov/2026:03:25:44 +0000] "HEAD /v2/foo/blobs/sha256:00 HTTP/1.1" '
        '404 157 "" "curl/7.88.1"\n'
        '127.0.0.1 - - [27/Nov/2026:03:26:22 +0000] "GET /v2/foo/blobs/sha256:79 HTTP/1.1" '
        '206 1000 "http://r/" "say \\"hi\\""\n'
        '127.0.0.1 - - [27/Nov/2026:03:26:22 +0000] "PUT /v2/foo/blobs/uploads/u?_state=x&'
        'digest=sha256:79 HTTP/1.1" 201 0 "" "containerd/1.6.20~ds1"\n'
        "--- spegeld harness: starting registry\n"
    )
    reqs = parse_access_log(text)
    assert [str(r) for r in reqs] == [
        "GET /v2/",
        "HEAD /v2/foo/blobs/sha256:00",
        "GET /v2/foo/blobs/sha256:79",
        "PUT /v2/foo/blobs/uploads/u",
    ]
    assert [(r.status, r.size) for r in reqs] == [(200, 2), (404, 157), (206, 1000), (201, 0)]
    assert reqs[2].user_agent == 'say "hi"'
    assert reqs[2].is_blob_get
    assert not reqs[1].is_blob_get  # HEAD
    assert reqs[3].uri.endswith("&digest=sha256:79")
    assert reqs[0].remote == "127.0.0.1"


def test_default_repository() -> None:
    assert default_repository(build_image("example.com:5000/team/app:v1", [1])) == "team/app"
    assert default_repository(build_image("localhost/app:v1", [1])) == "app"
    assert default_repository(build_image("team/app:v1", [1])) == "team/app"
    assert default_repository(build_image("app", [1])) == "app"


# -- lifecycle ---------------------------------------------------------------------------------


def test_start_stop_restart(registry: UpstreamRegistry) -> None:
    assert registry.running
    pid = registry.pid
    assert pid is not None and pid_alive(pid)
    assert registry.address == f"127.0.0.1:{registry.port}"
    assert registry.url == f"http://127.0.0.1:{registry.port}"
    assert registry.last_start_seconds is not None and registry.last_start_seconds < 10
    r = registry.request("GET", "/v2/")
    assert r.status == 200
    assert r.header("Docker-Distribution-Api-Version") == "registry/2.0"
    config = registry.config_path.read_text()
    for unwanted in ("debug", "proxy", "auth", "notifications"):
        assert unwanted not in config
    assert registry.storage_path.is_dir()

    img = build_image("example.com/app:v1", [100])
    registry.push(img)
    port = registry.port
    registry.restart()
    assert registry.port == port
    assert registry.pid not in (None, pid)
    assert not pid_alive(pid)
    verify_pushed(registry, img, "app", "v1")

    pid = registry.pid
    assert pid is not None
    registry.stop()
    assert not registry.running and registry.pid is None
    assert not pid_alive(pid)
    assert registry_pids(registry.config_path) == []
    registry.stop()  # idempotent
    registry.start()
    verify_pushed(registry, img, "app", "v1")


def test_kill_then_start(registry: UpstreamRegistry) -> None:
    pid = registry.pid
    assert pid is not None
    registry.kill()
    assert not pid_alive(pid)
    assert registry.pid is None
    registry.start()
    assert registry.request("GET", "/v2/").status == 200


def test_context_manager_owns_temp_dir() -> None:
    _require_registry()
    with UpstreamRegistry() as reg:
        base, pid, config = reg.base_dir, reg.pid, reg.config_path
        assert base.is_dir() and str(base).startswith("/tmp/spg-reg-")
        assert pid is not None and pid_alive(pid)
    assert not pid_alive(pid)
    assert not base.exists()
    assert registry_pids(config) == []
    with pytest.raises(RuntimeError, match="closed"):
        reg.start()


def test_start_fails_clearly_when_port_taken(tmp_path: Path) -> None:
    _require_registry()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        reg = UpstreamRegistry(tmp_path / "reg", port=port, ready_timeout=5.0)
        with pytest.raises(RuntimeError, match="address already in use") as info:
            reg.start()
        assert "last lines of" in str(info.value)
        assert not reg.running
        reg.close()
    assert registry_pids(reg.config_path) == []


def test_picked_port_taken_before_start_picks_another(tmp_path: Path) -> None:
    _require_registry()
    reg = UpstreamRegistry(tmp_path / "reg")
    try:
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", reg.port))
            blocker.listen()
            taken = reg.port
            reg.start()
            assert reg.port != taken
            assert reg.request("GET", "/v2/").status == 200
    finally:
        reg.close()


# -- push --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("docker", "platforms"),
    [(False, [HOST, OTHER]), (True, [HOST, OTHER]), (False, [HOST]), (True, [HOST])],
    ids=["oci-index", "docker-list", "oci-manifest", "docker-manifest"],
)
def test_push_api(registry: UpstreamRegistry, docker: bool, platforms: list[str]) -> None:
    img = build_image(
        "example.com/team/app:v1", [1000, 150_000], platforms=platforms, docker_media_types=docker
    )
    pos = registry.log_position()
    ref = registry.push(img)
    assert ref == f"127.0.0.1:{registry.port}/team/app:v1"
    verify_pushed(registry, img, "team/app", "v1")
    seen = registry.requests_seen(pos)
    uploads = len(img.blobs) - len(img.platforms) - (1 if img.is_index else 0)
    assert seen.count("POST /v2/team/app/blobs/uploads/") == uploads
    assert seen.count("PUT /v2/team/app/manifests/v1") == 1

    # Again, under another tag: every blob is already there (HEAD only, no uploads).
    pos = registry.log_position()
    assert registry.push(img, tag="v2").endswith("/team/app:v2")
    seen = registry.requests_seen(pos)
    assert not any(s.startswith("POST") for s in seen)
    assert sum(s.startswith("HEAD /v2/team/app/blobs/") for s in seen) == uploads
    verify_pushed(registry, img, "team/app", "v2")


def test_push_api_from_disk(registry: UpstreamRegistry, tmp_path: Path) -> None:
    img = build_image("app:big", [3 << 20], platforms=[HOST, OTHER], workdir=tmp_path / "img")
    assert img.blob_paths and not img.blob_data
    registry.push(img, repository="some/where")
    verify_pushed(registry, img, "some/where", "big")


def test_push_rejects_bad_names(registry: UpstreamRegistry) -> None:
    img = build_image("app:v1", [10])
    with pytest.raises(ValueError, match="repository"):
        registry.push(img, repository="Upper/Case")
    with pytest.raises(ValueError, match="tag"):
        registry.push(img, tag="no/slash")


def test_registry_error_carries_status(registry: UpstreamRegistry) -> None:
    img = build_image("app:v1", [10])
    # Only the manifest, none of its blobs: Distribution refuses the manifest PUT.
    manifest_only = dataclasses.replace(img, blobs={img.digest: img.blobs[img.digest]})
    with pytest.raises(UpstreamError) as info:
        registry.push(manifest_only)
    assert info.value.status == 400
    assert info.value.method == "PUT"
    assert "MANIFEST_BLOB_UNKNOWN" in str(info.value)


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_push_with_skopeo(registry: UpstreamRegistry, docker: bool) -> None:
    img = multi_platform("example.com/team/app:v1", docker=docker)
    pos = registry.log_position()
    ref = registry.push_with_skopeo(img, repository="mirror/app", tag="v3")
    assert ref == f"127.0.0.1:{registry.port}/mirror/app:v3"
    verify_pushed(registry, img, "mirror/app", "v3")
    seen = registry.requests_seen(pos)
    assert "PUT /v2/mirror/app/manifests/v3" in seen
    assert not list((registry.base_dir / "tmp").iterdir())  # scratch space cleaned up


# -- a real pull through containerd --------------------------------------------------------------


def write_hosts_dir(tmp_path: Path, reg: UpstreamRegistry) -> Path:
    hosts = tmp_path / "hosts"
    d = hosts / reg.address
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(f'server = "{reg.url}"\n')
    return hosts


@pytest.mark.containerd
@pytest.mark.parametrize(
    ("docker", "pusher"), [(False, "api"), (True, "skopeo")], ids=["oci-api", "docker-skopeo"]
)
def test_ctr_pull_from_registry(
    registry: UpstreamRegistry,
    containerd: PrivateContainerd,
    tmp_path: Path,
    docker: bool,
    pusher: str,
) -> None:
    img = multi_platform("example.com/team/app:v1", docker=docker)
    push = registry.push if pusher == "api" else registry.push_with_skopeo
    ref = push(img)
    hosts = write_hosts_dir(tmp_path, registry)

    pos = registry.log_position()
    containerd.ctr("images", "pull", "--hosts-dir", hosts, ref, timeout=60)
    assert ref in containerd.images()
    host = img.platform(HOST)
    for digest in (img.digest, host.manifest, host.config, *host.layers):
        assert containerd.has_blob(digest), digest
    other = img.platform(OTHER)
    assert not any(containerd.has_blob(d) for d in (other.config, *other.layers))

    reqs = registry.requests(pos)
    seen = [str(r) for r in reqs]
    assert "HEAD /v2/team/app/manifests/v1" in seen
    assert f"GET /v2/team/app/manifests/{img.digest}" in seen
    assert f"GET /v2/team/app/manifests/{host.manifest}" in seen
    for digest in (host.config, *host.layers):
        assert f"GET /v2/team/app/blobs/{digest}" in seen
    assert not any(d in s for s in seen for d in (other.manifest, other.config, *other.layers))
    assert all(r.user_agent.startswith("containerd/") for r in reqs)
    wanted = sum(img.blobs[d].size for d in (host.config, *host.layers))
    assert registry.blob_bytes_served(pos) == wanted

    # Pulling again: containerd has everything, so no blob reaches the upstream.
    pos = registry.log_position()
    containerd.ctr("images", "pull", "--hosts-dir", hosts, ref, timeout=60)
    assert registry.blob_bytes_served(pos) == 0
    assert not any("/blobs/" in s for s in registry.requests_seen(pos))
